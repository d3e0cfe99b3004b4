"""Schedules of the row-wise and elementwise ``intq`` kernels for a multi-core CPU (LLVM).

Each ``schedule_<op>(sch)`` transforms, in place, a ``tvm.s_tir.Schedule`` of
the PrimFunc that ``passes/ops/<op>.py`` builds, finding its blocks by the
names the converter gives them:

=======================  ==========================================================  ===============
function                 blocks (dataflow order; the output block last)              kernel's intq.op
=======================  ==========================================================  ===============
``schedule_shiftmax``    ``row_max``, ``exp``, ``row_sum``, ``factor``, ``shiftmax``  ``Shiftmax``
``schedule_layernorm``   ``sum_x``, ``mean``, ``sum_sq``, ``var``, ``isqrt_1`` ...     ``ILayerNorm``
                         ``isqrt_24``, ``factor``, ``layernorm``
``schedule_shiftgelu``   ``shiftgelu``                                               ``ShiftGELU``
``schedule_add``         ``add``                                                     ``IntAdd``
``schedule_requantize``  ``requantize``                                              ``Requantize``
=======================  ==========================================================  ===============

A schedule reorders and distributes the same integer operations; it never
changes one of them, so the scheduled kernel equals the unscheduled one (and
onnxruntime) bit for bit.  The shapes may be symbolic; a dim's value is read
only to decide how the last loop is vectorized.

The plan, for an output ``[..., rows, C]``:

- the leading loops are fused into one loop over rows and split into tasks
  of ``ROWS_PER_TASK`` consecutive rows of the innermost leading dim (a task
  never straddles a batch or head boundary: a fused-then-split loop would,
  and ``compute_at`` would then size its stages by the bounding box of the
  rows, the whole sequence);
- the task loop is ``parallel`` (TVM's thread pool, ``TVM_NUM_THREADS``);
- every per-row stage is ``compute_at`` the task loop, so a task reads its
  rows of ``x`` while they are in L1 and its intermediates (``exp``: one
  int64 per element) live in a task-sized buffer instead of a tensor-sized
  one;
- the loop over ``C`` is vectorized by TVM where ``VECTORIZE`` names the
  block and ``C`` is static (split into vectors of ``lanes``; a tail that
  is not a whole vector is partitioned off and stays serial), else left to
  LLVM's loop vectorizer.  A symbolic ``C`` (Shiftmax over MiniLM's
  sequence) cannot be split without a predicate, which TVM's ``vectorize``
  scalarizes, so it stays with LLVM.

Why tasks of several rows rather than one row: ILayerNorm's 24 Newton steps
are a chain of dependent 64-bit divisions per row; within a task, the steps
of different rows are independent and the divider overlaps them.  One row
per task made ILayerNorm ``[1, 197, 192]`` 27% slower on one thread than the
unscheduled kernel, whose step loops run over all rows; four rows brought it
back to par.

Vectorizing: every op here computes in int64.  AVX2 has int64 add, sub,
compare and shifts by a vector, but no int64 multiply (LLVM emits three
``vpmuludq``), no arithmetic right shift and no division.  Measured on one
thread (``mcpu=x86-64-v3``), TVM-vectorized against LLVM's choice:

- Shiftmax, ``exp`` and the output, 8 lanes, ``D = 73``: ``[1, 12, 128,
  128]`` (static ``L``) 0.49 -> 0.30 ms; ``[1, 3, 197, 197]`` (192 lanes
  and a tail of 5) 0.29 -> 0.18 ms;
- ILayerNorm's output ``[1, 197, 192]``: 0.052 -> 0.045 ms (16 lanes; 8:
  0.047);
- IntAdd ``[1, 197, 192]``: 0.027 -> 0.023 ms, Requantize ``[1, 197, 768]``:
  0.124 -> 0.104 ms (16 lanes);
- ShiftGELU: 7-10% slower at 4, 8 or 16 lanes, left to LLVM.  Its cost is
  the per-element 64-bit division ``2**62 // (ea + eb)``, which no x86
  vector unit has; only the threads divide it.

No lookup tables: every kernel computes its formula.
"""

from __future__ import annotations

from intq.passes.compat import s_tir, tirx

#: Rows of the innermost leading dim per parallel task, per kernel.
ROWS_PER_TASK = {"shiftmax": 8, "layernorm": 4, "elementwise": 1}

#: Blocks whose last loop TVM vectorizes, by kernel, with the lanes (int64 elements) of one vector step.
#: A static extent that is not a multiple is partitioned: the multiple vectorized, the rest serial.
VECTORIZE = {
    "shiftmax": {"exp": 8, "shiftmax": 8},
    "layernorm": {"layernorm": 16},
    "shiftgelu": {},
    "add": {"add": 16},
    "requantize": {"requantize": 16},
}

#: ILayerNorm's per-row stages in reverse dataflow order (consumers before producers, as compute_at needs).
LAYERNORM_ROW_STAGES = (
    "factor",
    *(f"isqrt_{step}" for step in range(24, 0, -1)),
    "var",
    "sum_sq",
    "mean",
    "sum_x",
)
SHIFTMAX_ROW_STAGES = ("factor", "row_sum", "exp", "row_max")


def schedule_shiftmax(sch: s_tir.Schedule) -> None:
    """Tasks of rows in parallel; max, exp, sum and factor computed per task (see the module docstring)."""
    _schedule_rows(sch, "shiftmax", SHIFTMAX_ROW_STAGES, ROWS_PER_TASK["shiftmax"])
    _vectorize_last(sch, VECTORIZE["shiftmax"])


def schedule_layernorm(sch: s_tir.Schedule) -> None:
    """Tasks of rows in parallel; the two row sums and the 24 Newton steps per task, the steps unrolled."""
    task = _schedule_rows(sch, "layernorm", LAYERNORM_ROW_STAGES, ROWS_PER_TASK["layernorm"])
    if task is not None:
        for name in LAYERNORM_ROW_STAGES:
            loops = sch.get_loops(sch.get_sblock(name))
            if name.startswith("isqrt") and len(loops) > 1:
                # the task's rows: independent divisions; LLVM unrolls 4 trips too, this does not rely on it
                sch.unroll(loops[-1])
    _vectorize_last(sch, VECTORIZE["layernorm"])


def schedule_shiftgelu(sch: s_tir.Schedule) -> None:
    """Rows in parallel; the last axis left to LLVM's vectorizer (see the module docstring)."""
    _schedule_elementwise(sch, "shiftgelu")


def schedule_add(sch: s_tir.Schedule) -> None:
    """Rows in parallel; a static last axis vectorized by 16 lanes."""
    _schedule_elementwise(sch, "add")


def schedule_requantize(sch: s_tir.Schedule) -> None:
    """Rows in parallel; a static last axis vectorized by 16 lanes."""
    _schedule_elementwise(sch, "requantize")


def _schedule_elementwise(sch: s_tir.Schedule, name: str) -> None:
    _schedule_rows(sch, name, (), ROWS_PER_TASK["elementwise"])
    _vectorize_last(sch, VECTORIZE[name])


def _schedule_rows(sch: s_tir.Schedule, output: str, stages: tuple[str, ...], rows_per_task: int):
    """Split the output's rows into parallel tasks and compute ``stages`` at the task loop; the task loop or None.

    None when the output has no leading dim (a single row): nothing to distribute.
    """
    block = sch.get_sblock(output)
    *lead, _ = sch.get_loops(block)
    if not lead:
        return None
    if rows_per_task > 1:
        task, _ = sch.split(lead[-1], [None, rows_per_task])
        lead[-1] = task
    for name in stages:
        sch.compute_at(sch.get_sblock(name), lead[-1])
    task = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    sch.parallel(task)
    return task


def _vectorize_last(sch: s_tir.Schedule, blocks: dict[str, int]) -> None:
    """Vectorize the last loop of each block by its lanes, where that loop's extent is static.

    A multiple of the lanes is split and vectorized; otherwise the loop is
    first partitioned into the largest multiple (vectorized) and a serial
    tail.  A symbolic extent is left to LLVM: a split of it would add a
    predicate, and TVM scalarizes a predicated vector loop.
    """
    for name, lanes in blocks.items():
        loop = sch.get_loops(sch.get_sblock(name))[-1]
        extent = sch.get(loop).extent
        if not isinstance(extent, tirx.IntImm) or int(extent) < lanes:
            continue
        body, tail = divmod(int(extent), lanes)
        if tail:
            head, _ = sch.loop_partition(loop, [body * lanes])
            (block,) = sch.get_child_blocks(head)
            loop = sch.get_loops(block)[-1]
        _, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)
