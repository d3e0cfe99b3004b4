"""Schedule of ``intq.IntMatMul`` / ``IntMatMulAcc`` (attention's ``Q @ K^T`` and ``P @ V``) for a CPU.

The kernels (``passes/ops/matmul.py``)::

    acc[..., i, j] = sum_k int32(a[..., i, k]) * int32(b[..., k, j])      block "acc"
    y = clamp((int64(acc) * m + 2**(s-1)) >> s, -128, 127)                 block "requantize" (IntMatMul only)

Both operands are activations and any dim may be symbolic: the batch dims,
``M`` and ``N`` (the sequence, in ``Q @ K^T``) or ``K`` (the sequence, in
``P @ V``).  ``split`` of a symbolic dim adds a predicate, and TVM's
``vectorize`` turns a predicated loop back into scalar code, so only a
static ``N`` is tiled for TVM's vectorizer; otherwise the vector loop is
kept whole for LLVM's, tail included.  In every plan the rows of
``batch x M`` are the parallel tasks (one output row each; ``a``'s row and
the output row stay in L1) and IntMatMul's requantize runs per row (or per
tile) right after its ``k`` loop, so its int32 ``acc`` never leaves L1::

    "tile"   N static, a multiple of 8          for row ‖ for jo: for k: acc_tile[0:NJ] += a[row,k] * b[k, jo*NJ:+NJ]
             (P @ V: N = head dim)               NJ lanes vectorized by TVM, the tile in registers
    "stream" N symbolic, K static <= 32         for row ‖ for j: acc[row, j] = sum over k, k unrolled
             (Q @ K^T, MiniLM: K = head dim)     j vectorized by LLVM, the k products summed in registers
    "rows"   otherwise (N static, not a         for row ‖ for k: for j: acc[row, j] += a[row,k] * b[k, j]
             multiple of 8; or N, K symbolic)    j vectorized by LLVM; with a static N LLVM unrolls j
                                                 and keeps the output row in registers across k

What AVX2 runs (``mcpu=x86-64-v3``, read off the assembly of all three
plans): per 8 output lanes and one ``k``, ``vpmovsxbd`` (8 int8 of ``b``
sign-extended to int32), ``vpmulld`` by ``a[row, k]`` (``vpbroadcastd`` /
``vpbroadcastb``, hoisted out of the lane loop) and ``vpaddd``.  The
products are exact (``|a * b| <= 2**14``), the int32 sum cannot wrap
(``K <= MAX_K``, checked by the converter), and no saturating instruction
touches the accumulation (``vpmaddubsw``, whose int16 pair sums saturate,
is never emitted).  IntMatMul's requantize widens with ``vpmovsxdq`` and
multiplies with ``vpmuldq`` (int64); its ``vpackssdw`` narrows values already
clamped to ``[-128, 127]``.

Measured on one core (``[1,12,128,32] x [1,12,32,128]`` and
``[1,12,128,128] x [1,12,128,32]``, MiniLM's, and DeiT-tiny's ``[1,3,197,64]
x [1,3,64,197]`` / ``[1,3,197,197] x [1,3,197,64]``; see
``benchmarks/kernel_microbench.py``): "tile" took MiniLM's ``P @ V`` from
1.05 ms ("rows") to 0.28 ms; with a symbolic ``N``, "stream" beat "rows" by
15-25% at ``K = 32`` and lost by 15-30% at ``K = 64`` (and with a static
``N``); one-thread timings on a shared 2-core machine, +-10%.
Rejected: blocks of 2 or 4 rows (the predicate of a symbolic ``M`` lands in
the inner loop: 20-40% slower); ``b`` packed transposed so that ``k`` is
contiguous (LLVM then emits ``vpmaddwd``, but the per-task transpose is
scalar and costs more than it saves).
"""

from __future__ import annotations

from intq.passes.compat import s_tir, tirx

ACC_BLOCK = "acc"
EPILOGUE_BLOCK = "requantize"
TILE_LANES = (32, 16, 8)  # int32 lanes of a "tile": 4, 2 or 1 AVX2 registers of accumulators
STREAM_MAX_K = 32  # "stream" beat "rows" at K = 32 (MiniLM's heads) and lost at K = 64 (DeiT's)


def schedule_batch_matmul(sch: s_tir.Schedule) -> None:
    """Rows of ``batch x M`` in parallel; the plan by which of ``N`` and ``K`` are static (module docstring)."""
    block = sch.get_sblock(ACC_BLOCK)
    epilogue = sch.get_sblock(EPILOGUE_BLOCK) if EPILOGUE_BLOCK in block_names(sch) else None
    n, k = (static_extent(sch, loop) for loop in sch.get_loops(block)[-2:])
    lanes = next((lanes for lanes in TILE_LANES if n is not None and n % lanes == 0), None)
    if lanes is not None:
        _tile(sch, block, epilogue, lanes)
    elif n is None and k is not None and k <= STREAM_MAX_K:
        _stream(sch, block, epilogue)
    else:
        _rows(sch, block, epilogue, symbolic_n=n is None)


def _tile(sch: s_tir.Schedule, block: s_tir.SBlockRV, epilogue: s_tir.SBlockRV | None, lanes: int) -> None:
    if epilogue is None:
        epilogue = sch.cache_write(block, 0, "local")  # the tile's accumulators, copied out after k
    row, j, k = _parallel_rows(sch, block)
    jo, ji = sch.split(j, [None, lanes])
    sch.reorder(jo, k, ji)
    sch.reverse_compute_at(epilogue, jo)
    sch.vectorize(ji)
    sch.vectorize(sch.get_loops(epilogue)[-1])
    sch.decompose_reduction(block, k)


def _stream(sch: s_tir.Schedule, block: s_tir.SBlockRV, epilogue: s_tir.SBlockRV | None) -> None:
    row, j, k = _parallel_rows(sch, block)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, row)
    sch.decompose_reduction(block, k)
    sch.unroll(k)


def _rows(sch: s_tir.Schedule, block: s_tir.SBlockRV, epilogue: s_tir.SBlockRV | None, symbolic_n: bool) -> None:
    if epilogue is None and symbolic_n:
        # a row buffer instead of the output's row: 0.47 -> 0.36 ms on DeiT's Q @ K^T with a symbolic N
        epilogue = sch.cache_write(block, 0, "global")
    row, j, k = _parallel_rows(sch, block)
    sch.reorder(k, j)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, row)
    sch.decompose_reduction(block, k)


def _parallel_rows(sch: s_tir.Schedule, block: s_tir.SBlockRV):
    """Fuse the batch dims with ``M`` into one parallel loop; ``(row, j, k)``.

    ``parallel`` comes before ``decompose_reduction``: the update block split
    off the reduction is no longer a reduction block, which ``parallel`` and
    ``vectorize`` refuse.
    """
    *batch, i, j, k = sch.get_loops(block)
    row = sch.fuse(*batch, i) if batch else i
    sch.parallel(row)
    return row, j, k


def static_extent(sch: s_tir.Schedule, loop: s_tir.LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def block_names(sch: s_tir.Schedule) -> set[str]:
    """The names of the blocks directly under the root block (all of them, before any compute_at)."""
    return {sch.get(block).name_hint for block in sch.get_child_blocks(sch.get_sblock("root"))}
