"""CUDA schedules of the row-wise and elementwise ``intq`` kernels, and the fallback for any other kernel.

Every kernel on a GPU needs its loops bound to blocks and threads; these
schedules bind them without changing one integer operation, so each result
equals the unscheduled kernel's (and onnxruntime's) bit for bit.  The blocks
are found by the names the converters give them (``rows.py`` lists them).

- ``schedule_rows`` (Shiftmax, I-LayerNorm): one thread block per row of
  the output ``[..., rows, C]``; the block's threads stride over ``C``.  The
  row reductions (``row_max``, ``row_sum``; ``sum_x``, ``sum_sq``) are
  cross-thread reductions (TVM lowers them to warp shuffles and shared
  memory); the per-row scalars (``factor``; ``mean``, ``var``, the 24 Newton
  steps of the integer square root) are computed once per row by thread 0
  into shared memory, where the other threads read them after a barrier.
  Shiftmax's ``exp`` is inlined into its two consumers (the row sum and the
  output): computed twice per element instead of stored, so no buffer of a
  symbolic row length ``L`` is needed.
- ``schedule_elementwise`` (ShiftGELU, IntAdd, Requantize, or any one-block
  kernel): the loops fused into one, split into thread blocks of
  ``ELEMENTWISE_THREADS``.
- ``fallback``: ``dlight.gpu.Fallback`` (every spatial loop nest bound to
  blocks and threads, reductions serial in each thread), for a kernel that
  the other schedules do not take.  Correct but slow; it is what an int8
  GEMM gets when ``cuda_int8`` refuses it.

Thread counts: ``C`` static: the smallest power of two >= ``C`` within
``[32, 256]``; symbolic: 256.
"""

from __future__ import annotations

from intq.passes.compat import s_tir, tirx, tvm
from intq.passes.schedules.rows import LAYERNORM_ROW_STAGES, SHIFTMAX_ROW_STAGES

MAX_ROW_THREADS = 256
ELEMENTWISE_THREADS = 256
KERNEL_ATTRS = {"op_pattern": 8, "tirx.is_scheduled": True}  # kOpaque: FuseOps must not merge; dlight must skip

#: the row reductions of each row kernel (cross-thread); its other per-row stages are scalars
ROW_REDUCTIONS = {"shiftmax": ("row_max", "row_sum"), "layernorm": ("sum_x", "sum_sq")}
INLINED = {"shiftmax": ("exp",), "layernorm": ()}
ROW_STAGES = {"shiftmax": SHIFTMAX_ROW_STAGES, "layernorm": LAYERNORM_ROW_STAGES}


def row_threads(extent: tirx.PrimExpr) -> int:
    if not isinstance(extent, tirx.IntImm):
        return MAX_ROW_THREADS
    threads = 32
    while threads < min(int(extent), MAX_ROW_THREADS):
        threads *= 2
    return threads


def schedule_rows(sch: s_tir.Schedule, kernel: str) -> None:
    """One thread block per row; reductions across its threads, scalars by thread 0 (module docstring)."""
    for name in INLINED[kernel]:
        sch.compute_inline(sch.get_sblock(name))
    out = sch.get_sblock(kernel)
    *lead, channels = sch.get_loops(out)
    threads = row_threads(sch.get(channels).extent)
    row = sch.fuse(*lead) if len(lead) > 1 else lead[0] if lead else sch.add_unit_loop(out)
    _, lane = sch.split(channels, [None, threads])
    sch.bind(row, "blockIdx.x")
    sch.bind(lane, "threadIdx.x")
    for name in ROW_STAGES[kernel]:
        if name in INLINED[kernel]:
            continue
        block = sch.get_sblock(name)
        reduction = name in ROW_REDUCTIONS[kernel]
        # a reduction's result is shared by the block's threads; a scalar is recomputed by each thread
        sch.set_scope(block, 0, "shared" if reduction else "local")
        sch.compute_at(block, row, preserve_unit_loops=True)
        if reduction:
            serial, lane = sch.split(sch.get_loops(block)[-1], [None, threads])
            sch.reorder(lane, serial)
            sch.bind(lane, "threadIdx.x")


def schedule_shiftmax(sch: s_tir.Schedule) -> None:
    schedule_rows(sch, "shiftmax")


def schedule_layernorm(sch: s_tir.Schedule) -> None:
    schedule_rows(sch, "layernorm")


def schedule_elementwise(sch: s_tir.Schedule) -> None:
    """The one block's loops fused, in thread blocks of ``ELEMENTWISE_THREADS``."""
    (block,) = sch.get_child_blocks(sch.get_sblock("root"))
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0] if loops else sch.add_unit_loop(block)
    outer, inner = sch.split(fused, [None, ELEMENTWISE_THREADS])
    sch.bind(outer, "blockIdx.x")
    sch.bind(inner, "threadIdx.x")


def fallback(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | str:
    """``dlight.gpu.Fallback``'s schedule of ``func`` (see the module docstring), or why it has none."""
    from tvm.s_tir import dlight

    with target:
        sch = dlight.gpu.Fallback().apply(func, target, False)
    if sch is None:
        return "dlight.gpu.Fallback found no schedule"
    out = sch.mod["main"]
    out = out if "global_symbol" in (func.attrs or {}) else out.without_attr("global_symbol")
    return out.with_attrs(KERNEL_ATTRS)
