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
``schedule_shiftgelu``   ``shiftgelu`` (formula) or ``lookup`` (int8 table)          ``ShiftGELU``
``schedule_add``         ``add``                                                     ``IntAdd``
``schedule_mul``         ``mul``                                                     ``IntMul``
``schedule_shiftgelu``   ``lookup`` (``passes/ops/lookup.py``)                       ``IntLookup``
``schedule_requantize``  ``requantize``                                              ``Requantize``
=======================  ==========================================================  ===============

ShiftGELU's ``SCHEDULES`` entry is ``schedule_shiftgelu_kernel(func,
target)``: ``schedule_shiftgelu``, then the table's AVX-512 VBMI gather
where the target has it (see "One lookup table" below).

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
- ShiftGELU's formula kernel: 7-10% slower at 4, 8 or 16 lanes, left to
  LLVM.  Its cost is the per-element 64-bit division ``2**62 // (ea +
  eb)``, which no x86 vector unit has; only the threads divide it.

One lookup table: ShiftGELU of an int8 ``x`` with constant ``D``, ``m``,
``s`` (every ShiftGELU the quantizer makes) is a gather from 256 bytes
that the converter computes at compile time by the same formula
(``passes/ops/shiftgelu.py``); the formula kernel remains for int16 inputs
and run-time params.  ``schedule_shiftgelu`` runs the gather's rows in
parallel and leaves the last axis to LLVM (byte loads; TVM's ``vectorize``
of a gather inserts bytes one at a time and was slower at 16, 32 and 64
lanes).  On a target with AVX-512 VBMI, ``schedule_shiftgelu_kernel``
(the registered entry) gathers 64 bytes per step instead: two
``vpermi2b`` (each a 128-entry byte table) and a select on the sign, when
the last axis is a static multiple of 64 (DeiT 768, MiniLM 1536).
Measured, ShiftGELU ``[1, 197, 768]`` int8, one thread, on this 2-core
znver4 host (``benchmarks/kernel_microbench.py --threads 1 --models
deit_tiny --kernels ShiftGELU``): the formula 0.56 ms (``x86-64-v3``) /
0.47 ms (``znver4``); the table with byte loads 0.039 ms (``x86-64-v3``);
with ``vpermi2b`` 0.003 ms (``znver4``).  ``[1, 128, 1536]``: 0.72 / 0.61
ms -> 0.049 / 0.004 ms.  DeiT-tiny, batch 1, one thread: 26.1 -> 20.3 ms,
its 12 ShiftGELU calls 6.3 -> 0.22 ms.  The other kernels compute their
formula: their inputs are wider than 8 bits or their rows are reduced.
"""

from __future__ import annotations

from tvm.script import tirx as T

from intq.passes import compat
from intq.passes.compat import s_tir, tirx, tvm

#: Rows of the innermost leading dim per parallel task, per kernel.
ROWS_PER_TASK = {"shiftmax": 8, "layernorm": 4, "elementwise": 1}

#: Blocks whose last loop TVM vectorizes, by kernel, with the lanes (int64 elements) of one vector step.
#: A static extent that is not a multiple is partitioned: the multiple vectorized, the rest serial.
VECTORIZE = {
    "shiftmax": {"exp": 8, "shiftmax": 8},
    "layernorm": {"layernorm": 16},
    "shiftgelu": {},
    "lookup": {},
    "add": {"add": 16},
    "mul": {"mul": 16},
    "requantize": {"requantize": 16},
}

#: ShiftGELU's table kernel: its block (passes/ops/shiftgelu.py), and the bytes per ``vpermi2b`` gather
LOOKUP_BLOCK = "lookup"
VBMI_LANES = 64
VPERMI2B = "llvm.x86.avx512.vpermi2var.qi.512"

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
    """Rows in parallel, the last axis left to LLVM, for either ShiftGELU kernel (formula or table).

    Any LLVM CPU; ``schedule_shiftgelu_kernel`` adds the AVX-512 VBMI gather where the target has it.
    """
    _schedule_elementwise(sch, LOOKUP_BLOCK if is_lookup(sch) else "shiftgelu")


def schedule_shiftgelu_kernel(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """The ``SCHEDULES`` entry of ShiftGELU and IntLookup: ``schedule_shiftgelu``, then, for a one-table kernel
    (offset 128 baked in) on a target with AVX-512 VBMI and a static last axis that is a multiple of 64, its
    gather by ``vpermi2b``, 64 bytes at a time (see the module docstring); any other last axis, and a kernel
    with one table per channel, stays a loop of byte loads.
    """
    sch = s_tir.Schedule(func)
    schedule_shiftgelu(sch)
    out = sch.mod["main"]
    if is_lookup(sch) and len(func.params) == 3 and has_vbmi(target):
        block = _blockize_lanes(sch, LOOKUP_BLOCK, VBMI_LANES)
        if block is not None:
            x, table, y = (p.name for p in func.params)  # lookup_te's order, the offset an immediate
            out = compat.tensorize(sch.mod["main"], block, vbmi_lookup_impl(), {"X": x, "Tab": table, "Y": y})
    return out if "global_symbol" in (func.attrs or {}) else out.without_attr("global_symbol")


def is_lookup(sch: s_tir.Schedule) -> bool:
    """Whether the kernel is ShiftGELU's table gather (``passes/ops/shiftgelu.py``) rather than its formula."""
    return any(sch.get(b).name_hint == LOOKUP_BLOCK for b in sch.get_child_blocks(sch.get_sblock("root")))


def has_vbmi(target: tvm.target.Target) -> bool:
    """Whether an LLVM target has ``vpermi2b`` on 512-bit vectors (AVX-512 VBMI; byte compares need BW)."""
    return all(tvm.target.codegen.target_has_features(f, target) for f in ("avx512vbmi", "avx512bw"))


def vbmi_lookup_impl() -> tirx.PrimFunc:
    """A fresh ``Y[0:64] = T[int32(X[0:64]) + 128]`` (``compat.tensorize`` needs one per use).

    ``vpermi2b(a, i, b)`` picks, per byte, entry ``i & 127`` of the 128 bytes
    ``a ++ b``.  For an int8 ``x``, ``x & 127 = x + 128`` when ``x < 0`` and
    ``x`` when ``x >= 0``: the first half of ``T`` serves the negative
    bytes, the second half the others, and the sign picks between the two.
    """

    @T.prim_func(s_tir=True)
    def impl(
        X: T.Buffer((64,), "int8", offset_factor=1),
        Tab: T.Buffer((256,), "int8", offset_factor=1),
        Y: T.Buffer((64,), "int8", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(X[0:64], Tab[0:256])
            T.writes(Y[0:64])
            Y[T.ramp(0, 1, 64)] = T.Select(
                X.vload([0], "int8x64") < T.Broadcast(T.int8(0), 64),
                _vpermi2b(Tab, 0, X),
                _vpermi2b(Tab, 128, X),
            )

    return impl


def schedule_add(sch: s_tir.Schedule) -> None:
    """Rows in parallel; a static last axis vectorized by 16 lanes."""
    _schedule_elementwise(sch, "add")


def schedule_mul(sch: s_tir.Schedule) -> None:
    """Rows in parallel; a static last axis vectorized by 16 lanes."""
    _schedule_elementwise(sch, "mul")


def schedule_requantize(sch: s_tir.Schedule) -> None:
    """Rows in parallel; a static last axis vectorized by 16 lanes."""
    _schedule_elementwise(sch, "requantize")


def _schedule_elementwise(sch: s_tir.Schedule, name: str) -> None:
    _schedule_rows(sch, name, (), ROWS_PER_TASK["elementwise"])
    _vectorize_last(sch, VECTORIZE[name])


def _vpermi2b(table: tirx.Buffer, start: int, x: tirx.Buffer) -> tirx.PrimExpr:
    """``table[start + (x & 127)]`` for the 64 bytes ``x[0:64]``: ``vpermi2b`` of ``table[start:start + 128]``."""
    halves = (table.vload([start], "int8x64"), table.vload([start + 64], "int8x64"))
    return tirx.call_llvm_pure_intrin("int8x64", VPERMI2B, halves[0], x.vload([0], "int8x64"), halves[1])


def _blockize_lanes(sch: s_tir.Schedule, name: str, lanes: int) -> str | None:
    """Blockize ``lanes`` consecutive iterations of the last loop of block ``name``; the new block's name.

    None, and ``sch`` unchanged, unless the loop's extent is a static
    multiple of ``lanes``.  No tail: blockizing the head of a
    ``loop_partition``-ed loop loses the outer loops' bindings in this TVM
    (the block's regions then span every row, and ``tensorize`` fails).
    """
    loop = sch.get_loops(sch.get_sblock(name))[-1]
    extent = sch.get(loop).extent
    if not isinstance(extent, tirx.IntImm) or int(extent) % lanes or int(extent) == 0:
        return None
    _, inner = sch.split(loop, [None, lanes])
    return sch.get(sch.blockize(inner)).name_hint


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
