"""Schedules of ``intq.IntMatMul`` / ``IntMatMulAcc`` (attention's ``Q @ K^T`` and ``P @ V``) for a CPU.

The kernels (``passes/ops/matmul.py``)::

    acc[..., i, j] = sum_k int32(a[..., i, k]) * int32(b[..., k, j])      block "acc"
    y = clamp((int64(acc) * m + 2**(s-1)) >> s, -128, 127)                 block "requantize" (IntMatMul only)

Both operands are activations and any dim may be symbolic: the batch dims,
``M`` and ``N`` (the sequence, in ``Q @ K^T``) or ``K`` (the sequence, in
``P @ V``).  ``schedule_matmul(func, target)``, the ``SCHEDULES`` entry,
writes the kernel anew with an exact dot instruction on an x86 CPU with
AVX2 (the "x86" plan, ``x86_matmul``; the instruction is
``x86_matmul_intrin.matmul_dot(target)``: ``vpdpbusd`` with AVX512_VNNI,
else ``vpmaddwd``), and gives any other CPU, or a kernel not of the form
above (``match_matmul`` says why), the generic plans of
``schedule_batch_matmul`` (last section).

The x86 plan
------------

``b`` cannot be packed at compile time, so it is packed at run time, once
per output batch (``B`` = the product of the batch dims: batch x heads), and
every row tile of that batch reuses it (``L`` int32 lanes per register,
``G`` reduction indices per lane and instruction, ``R x C`` the register
tile; ``x86_matmul_intrin`` for the instructions and their exactness)::

    for bt ‖ < B:                 packed[bt, ko, jb, j, t] = b[bt, G ko + t, L jb + j]      (0 past K and N)
                                  bias[bt, j] = -128 sum_k b[bt, k, j]                      (vpdpbusd only)
    for (bt, it) ‖ < B x M/R:     panel[r, k] = a[bt, min(R it + r, M - 1), k] as the dot takes it  (0 past K)
        for jt < Nb/C:            (then one tile of the Nb mod C blocks left: Nb = ceil(N / L))
            acc[r][c] = bias[bt, L (C jt + c) :+ L] or 0                  R x C vector registers
            for ko < ceil(K/G):   acc[r][c] = dot(acc[r][c], panel[r, G ko :+ G], packed[bt, ko, C jt + c])
            y[bt, R it + r, L (C jt + c) + j] = E(acc[r][c][j])           rows < M; columns < N

``E`` is the kernel's own epilogue expression (IntMatMul's requantize,
read off its "requantize" block, with ``acc`` replaced by the register's
lane), vectorized by TVM ``L`` lanes wide; IntMatMulAcc stores ``acc``.
The last block of a row whose ``N`` is not a multiple of ``L`` goes
through a masked store (``E`` at columns clamped to ``N - 1``, so that it
reads its params in bounds); rows of the last tile at or past ``M`` are
computed on a copy of row ``M - 1`` and not stored.  The loop extents are
symbolic where the dims are: no predicate enters the ``k`` loop, and tails
of ``K`` and ``N`` are zeros in the panel and ``packed``, whose products
are 0.  Every accumulator is its own ``L``-lane buffer (an ``alloca`` that
LLVM keeps in a register): with all ``R x C`` in one buffer, or with a
scalar tail loop reading them (LLVM makes it a ``memcpy``, the address
escapes), the tile went through the stack.

Tiles: ``R x C = 6 x 4`` zmm accumulators with ``vpdpbusd`` (24 + 4 ``b``
blocks + the broadcast of the 32), ``6 x 2`` ymm with ``vpmaddwd`` (12 + 2
+ the broadcast + the product of the 16); a static ``N`` of fewer blocks
takes ``C = Nb`` and more rows (``choose_tile``: ``N = 32`` gives ``12 x 2``
zmm).  Measured on one core of this znver4 (thread CPU time, the fastest of
12 round-robin timings, ms; GMAC/s in brackets; MiniLM's sequence symbolic
as the model leaves it, DeiT's static)::

                                    generic    vpdpbusd 6x4   vpdpwssd        generic v3  vpmaddwd 6x2
    DeiT  [1,3,197,64]x[1,3,64,197]  0.255 (29)   0.041 (180)   0.075 (99)     0.583 (13)  0.099 (75)
    DeiT  [1,3,197,197]x[1,3,197,64] 0.282 (26)   0.043 (173)   0.077 (97)     0.292 (26)  0.104 (72)
    MiniLM [1,12,128,32]x[..,32,128] 0.225 (28)   0.040 (159)   0.067 (94)     0.241 (26)  0.084 (75)
    MiniLM [1,12,128,128]x[..,128,32] 0.239 (26)  0.044 (143)   0.073 (86)     0.252 (25)  0.104 (61)

("generic": ``schedule_batch_matmul`` for ``znver4``, "generic v3" for
``x86-64-v3``, the AVX2 target of the last two columns.)  ``vpdpwssd``
(``VNNI_I16``: int16 operands, exact without a bias) does half the products
of ``vpdpbusd`` per instruction and ran at 0.55-0.6x its speed: ``DOTS`` prefers
``vpdpbusd``.  Other tiles came within 10% (``6 x 2``, ``8 x 3``,
``12 x 2`` with ``vpdpbusd``; ``3 x 3``, ``4 x 2`` with ``vpmaddwd``), except
with a symbolic ``N`` and ``K = 32`` (MiniLM's ``Q @ K^T``), where tiles of
fewer than 4 blocks or 6 rows ran 1.2-1.8x slower: the tile's fixed costs
(bias, epilogue, ``N`` checks) weigh against 8 steps of ``k``.

The generic plans (other CPUs)
------------------------------

``split`` of a symbolic dim adds a predicate, and TVM's
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

What the generic plans compile to on AVX2 (``mcpu=x86-64-v3``, read off
the assembly of all three plans; ``ScheduleKernels`` gives such a CPU the
x86 plan instead): per 8 output lanes and one ``k``, ``vpmovsxbd`` (8 int8 of ``b``
sign-extended to int32), ``vpmulld`` by ``a[row, k]`` (``vpbroadcastd`` /
``vpbroadcastb``, hoisted out of the lane loop) and ``vpaddd``.  The
products are exact (``|a * b| <= 2**14``), the int32 sum cannot wrap
(``K <= MAX_K``, checked by the converter), and no saturating instruction
touches the accumulation (``vpmaddubsw``, whose int16 pair sums saturate,
is never emitted).  IntMatMul's requantize widens with ``vpmovsxdq`` and
multiplies with ``vpmuldq`` (int64); its ``vpackssdw`` narrows values already
clamped to ``[-128, 127]``.

Measured on one core (the shapes above; see
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

import math
from dataclasses import dataclass

import tvm_ffi

# The TVMScript IR builder: the x86 plan writes its loops and vector statements directly (its TIR is no schedule
# of the te kernel: the packing of b and the register tile have no te form that keeps the tails vectorized).
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.op import masked_store
from tvm.tirx.script import builder as T

from intq.passes.compat import s_tir, tirx, tvm
from intq.passes.schedules.x86_matmul_intrin import MatmulDot, matmul_dot

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


# --- the x86 plan ---------------------------------------------------------------------------------


def schedule_matmul(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """The ``SCHEDULES`` entry: the x86 plan where the target has its instruction and the kernel matches, else the
    generic plans of ``schedule_batch_matmul``."""
    dot = matmul_dot(target)
    out = x86_matmul(func, dot) if isinstance(dot, MatmulDot) else dot
    if isinstance(out, str):
        sch = s_tir.Schedule(func)
        schedule_batch_matmul(sch)
        out = sch.mod["main"]
    return out if "global_symbol" in (func.attrs or {}) else out.without_attr("global_symbol")


@dataclass(frozen=True)
class MatmulKernel:
    """A PrimFunc read as ``y[..., i, j] = E(sum_k a[..., i, k] * b[..., k, j])`` (``match_matmul``)."""

    a: tvm.ir.Var
    b: tvm.ir.Var
    out: tvm.ir.Var
    batch_vars: tuple[tvm.ir.Var, ...]  # the reduction block's iter vars of the output's batch dims
    a_batch: tuple[tirx.PrimExpr, ...]  # a's batch indices over batch_vars (numpy broadcasting, as lowered)
    b_batch: tuple[tirx.PrimExpr, ...]
    k: tirx.PrimExpr  # the reduction length
    epilogue: tirx.PrimExpr | None  # E over epilogue_vars and loads of acc; None: y = acc
    epilogue_vars: tuple[tvm.ir.Var, ...]
    acc: tvm.ir.Var | None  # the accumulator buffer E reads


def _blocks(func: tirx.PrimFunc) -> list[s_tir.SBlock]:
    found: list[s_tir.SBlock] = []
    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, found.append), order="pre")
    return [b for b in found if b.name_hint != "root"]


def _same_vars(exprs, variables) -> bool:
    return len(exprs) == len(variables) and all(e.same_as(v) for e, v in zip(exprs, variables, strict=True))


def _int8_load(expr, buffer) -> list | None:
    """The indices of ``expr`` when it is ``int32(buffer[indices])``, else None."""
    if not (isinstance(expr, tirx.Cast) and str(expr.ty.dtype) == "int32"):
        return None
    load = expr.value
    return list(load.indices) if isinstance(load, tvm.ir.TensorLoad) and load.source.same_as(buffer) else None


def match_matmul(func: tirx.PrimFunc) -> MatmulKernel | str:
    """``func`` (``passes/ops/matmul.py``'s kernel) as a ``MatmulKernel``, or the reason it is not one."""
    blocks = _blocks(func)
    if not blocks or blocks[0].name_hint != ACC_BLOCK or len(blocks) > 2:
        return f"expected the block 'acc' and at most one epilogue, found {[b.name_hint for b in blocks]}"
    if len(func.params) < 3:
        return "expected the params a, b, the other inputs, and y"
    a, b, out = func.params[0], func.params[1], func.params[-1]
    if str(a.ty.dtype) != "int8" or str(b.ty.dtype) != "int8":
        return f"a and b must be int8, got {a.ty.dtype} and {b.ty.dtype}"
    reduce = blocks[0]
    spatial = [iv.var for iv in reduce.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    reduction = [iv for iv in reduce.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    store = reduce.body
    if len(reduction) != 1 or not isinstance(store, tirx.BufferStore) or not _same_vars(store.indices, spatial):
        return "the 'acc' block is not one reduction into acc[i...]"
    acc, r = store.buffer, reduction[0].var
    value = store.value
    if not (isinstance(value, tirx.Add) and isinstance(value.a, tvm.ir.TensorLoad) and value.a.source.same_as(acc)):
        return "the 'acc' block is not acc += ..."
    prod = value.b
    a_at = _int8_load(prod.a, a) if isinstance(prod, tirx.Mul) else None
    b_at = _int8_load(prod.b, b) if isinstance(prod, tirx.Mul) else None
    if a_at is None or b_at is None or str(acc.ty.dtype) != "int32":
        return "the 'acc' block does not add int32(a[...]) * int32(b[...]) into int32"
    if len(spatial) != len(out.ty.shape) or len(spatial) < 2:
        return "the 'acc' block's dims are not the output's"
    if not (_same_vars(a_at[-2:], [spatial[-2], r]) and _same_vars(b_at[-2:], [r, spatial[-1]])):
        return "the 'acc' block does not read a[..., i, k] and b[..., k, j]"
    batch = tuple(spatial[:-2])
    common = (a, b, out, batch, tuple(a_at[:-2]), tuple(b_at[:-2]), reduction[0].dom.extent)
    if len(blocks) == 1:
        if not acc.same_as(out):
            return "the 'acc' block writes no output"
        return MatmulKernel(*common, None, (), None)
    epi = blocks[1]
    iters = tuple(iv.var for iv in epi.iter_vars)
    store = epi.body
    if not isinstance(store, tirx.BufferStore) or not store.buffer.same_as(out) or not _same_vars(store.indices, iters):
        return "the epilogue is not one elementwise store into the output"
    loads: list[tvm.ir.TensorLoad] = []
    tvm_ffi.structural_walk(store.value, (tvm.ir.TensorLoad, loads.append))
    for load in loads:
        if load.source.same_as(acc) and not _same_vars(load.indices, iters):
            return "the epilogue reads acc at another index than its own"
        if not load.source.same_as(acc) and not any(load.source.same_as(p) for p in func.params[2:-1]):
            return f"the epilogue reads {load.source.name}, which is neither acc nor a param"
    return MatmulKernel(*common, store.value, iters, acc)


def _i64(value) -> tirx.PrimExpr:
    return tirx.const(value, "int64") if isinstance(value, int) else value


def _ramp(base, lanes: int) -> tirx.PrimExpr:
    return tirx.Ramp(_i64(base), _i64(1), lanes)


def _prod(dims) -> tirx.PrimExpr:
    out = _i64(1)
    for d in dims:
        out = out * d
    return out


def _static(expr) -> int | None:
    return int(expr) if isinstance(expr, tirx.IntImm) else None


def _substitute(expr: tirx.PrimExpr, pairs, load=None) -> tirx.PrimExpr:
    """``expr`` with each var ``old`` of ``pairs`` replaced by ``new`` (and each load by ``load(load)``, if given)."""

    def var(node):
        return next((new for old, new in pairs if node.same_as(old)), node)

    rules = [(tvm.ir.Var, var)] + ([(tvm.ir.TensorLoad, load)] if load is not None else [])
    return tvm_ffi.structural_map(expr, rules)


def _flat_batch(indices, dims) -> tirx.PrimExpr:
    """The row-major position of ``indices`` among the batch ``dims``."""
    out = _i64(0)
    for index, dim in zip(indices, dims, strict=True):
        out = out * dim + index
    return out


def _decode(flat: tirx.PrimExpr, dims) -> list[tirx.PrimExpr]:
    """The batch indices of the row-major position ``flat`` among ``dims`` (``_flat_batch``'s inverse)."""
    out: list[tirx.PrimExpr] = []
    for dim in dims[:0:-1]:
        out.insert(0, tirx.floormod(flat, dim))
        flat = tirx.floordiv(flat, dim)
    return [flat, *out] if len(dims) else []


def choose_tile(dot: MatmulDot, n: int | None) -> tuple[int, int]:
    """``(rows, column blocks)`` of the register tile: the dot's, with fewer column blocks (more rows) when a
    static ``N`` has fewer blocks of ``L`` lanes."""
    rows, cols = dot.tile
    if n is not None:
        cols = min(cols, math.ceil(n / dot.lanes))
        rows = min(2 * rows, rows * dot.tile[1] // cols)
    return rows, cols


def x86_matmul(func: tirx.PrimFunc, dot: MatmulDot, tile: tuple[int, int] | None = None) -> tirx.PrimFunc | str:
    """The kernel written with ``dot`` (the x86 plan of the module docstring), or the reason it does not apply."""
    kernel = match_matmul(func)
    if isinstance(kernel, str):
        return kernel
    rows, cols = tile or choose_tile(dot, _static(kernel.out.ty.shape[-1]))
    used = rows * cols + cols + 2
    if used > dot.registers:
        raise ValueError(
            f"x86_matmul: a {rows} x {cols} tile of accumulators, {cols} blocks of b, the broadcast row and a product "
            f"need {used} of the {dot.registers} vector registers of {dot.name}; choose a smaller tile"
        )
    return _X86Matmul(kernel, dot, rows, cols).build(func)


class _X86Matmul:
    """Writes the x86 plan's PrimFunc (module docstring) with the IR builder; one instance per kernel."""

    def __init__(self, kernel: MatmulKernel, dot: MatmulDot, rows: int, cols: int):
        self.kernel, self.dot, self.rows, self.cols = kernel, dot, rows, cols
        a, b, out = kernel.a, kernel.b, kernel.out
        lanes, group = dot.lanes, dot.group
        self.m, self.n, self.k = out.ty.shape[-2], out.ty.shape[-1], kernel.k
        self.a_row, self.b_row = a.ty.shape[-1], b.ty.shape[-1]  # the row strides (a's K, b's N)
        self.batch = _prod(out.ty.shape[:-2])
        self.k_groups = tirx.floordiv(self.k + group - 1, group)  # Kq
        self.k_padded = self.k_groups * group  # a panel row
        self.col_blocks = tirx.floordiv(self.n + lanes - 1, lanes)  # Nb
        self.row_tiles = tirx.floordiv(self.m + rows - 1, rows)
        self.block = lanes * group  # packed elements of one (column block, group)

    def packed_at(self, bt, jb, ko) -> tirx.PrimExpr:
        """The first element of the packed block ``(bt, jb, ko)``: ``[batch][group][column block][L][G]``."""
        return ((bt * self.k_groups + ko) * self.col_blocks + jb) * self.block

    def build(self, func: tirx.PrimFunc) -> tirx.PrimFunc:
        kernel, dot = self.kernel, self.dot
        with IRBuilder() as ib:
            with T.prim_func(s_tir=True):
                attrs = dict(func.attrs) if func.attrs else {}
                T.func_name(str(attrs.pop("global_symbol", "main")))
                for param in func.params:
                    T.arg(param.name, param)
                T.func_attr({**attrs, "tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
                a, b, out = (
                    T.decl_buffer((_prod(p.ty.shape),), str(p.ty.dtype), data=p.data)
                    for p in (kernel.a, kernel.b, kernel.out)
                )
                self.a, self.b, self.out = a, b, out
                self.packed = T.alloc_buffer((self.batch * self.col_blocks * self.k_groups * self.block,), dot.packed)
                self.bias = T.alloc_buffer((self.batch * self.col_blocks * dot.lanes,), "int32") if dot.biased else None
                with T.parallel(0, self.batch) as bt:
                    self.pack_b(bt)
                with T.parallel(0, self.batch * self.row_tiles) as task:
                    self.row_tile(task)
        out = ib.get()
        return out if "global_symbol" in (func.attrs or {}) else out.without_attr("global_symbol")

    def offsets(self, bt):
        """a's, b's and y's first element of the output batch ``bt``, and the batch indices."""
        kernel = self.kernel
        index = _decode(bt, kernel.out.ty.shape[:-2])
        pairs = list(zip(kernel.batch_vars, index, strict=True))
        a_dims, b_dims = kernel.a.ty.shape[:-2], kernel.b.ty.shape[:-2]
        a_at = _flat_batch([_substitute(e, pairs) for e in kernel.a_batch], a_dims) * _prod(kernel.a.ty.shape[-2:])
        b_at = _flat_batch([_substitute(e, pairs) for e in kernel.b_batch], b_dims) * _prod(kernel.b.ty.shape[-2:])
        return a_at, b_at, bt * self.m * self.n, index

    # --- b packed, per output batch ---------------------------------------------------------------

    def pack_b(self, bt) -> None:
        dot, b, packed = self.dot, self.b, self.packed
        lanes, group = dot.lanes, dot.group
        b_at = T.Bind(self.offsets(bt)[1])
        full_cols, full_groups = tirx.floordiv(self.n, lanes), tirx.floordiv(self.k, group)
        with T.serial(0, full_cols) as jb:
            with T.serial(0, full_groups) as ko:
                at = [b_at + (ko * group + t) * self.b_row + jb * lanes for t in range(group)]
                rows = [b.vload([start], f"int8x{lanes}") for start in at]
                T.buffer_store(packed, dot.pack_b(rows), [_ramp(self.packed_at(bt, jb, ko), self.block)])
            if not self._divides(group, self.k):
                with T.serial(full_groups, self.k_groups) as ko:
                    self.pack_scalar(bt, b_at, jb, ko)
        if not self._divides(lanes, self.n):
            with T.serial(full_cols, self.col_blocks) as jb:
                with T.serial(0, self.k_groups) as ko:
                    self.pack_scalar(bt, b_at, jb, ko)
        if self.bias is not None:
            with T.serial(0, self.col_blocks) as jb:
                total = T.alloc_buffer((lanes,), "int32")
                T.buffer_store(total, tirx.Broadcast(tirx.const(0, "int32"), lanes), [_ramp(0, lanes)])
                with T.serial(0, self.k_groups) as ko:
                    block = packed.vload([self.packed_at(bt, jb, ko)], f"int8x{self.block}")
                    T.buffer_store(total, dot.column_bias(total.vload([0], f"int32x{lanes}"), block), [_ramp(0, lanes)])
                start = (bt * self.col_blocks + jb) * lanes
                T.buffer_store(self.bias, -total.vload([0], f"int32x{lanes}"), [_ramp(start, lanes)])

    def pack_scalar(self, bt, b_at, jb, ko) -> None:
        """The block ``(jb, ko)`` element by element, zero past ``K`` and ``N`` (the tails of ``b``)."""
        dot, lanes, group = self.dot, self.dot.lanes, self.dot.group
        with T.serial(0, lanes) as j:
            for t in range(group):
                k, col = ko * group + t, jb * lanes + j
                value = tirx.if_then_else(
                    tirx.all(k < self.k, col < self.n),
                    dot.pack_b_scalar(self.b[b_at + k * self.b_row + col]),
                    tirx.const(0, dot.packed),
                )
                T.buffer_store(self.packed, value, [self.packed_at(bt, jb, ko) + j * group + t])

    @staticmethod
    def _divides(factor: int, extent) -> bool:
        return _static(extent) is not None and _static(extent) % factor == 0

    # --- a row tile: its panel, then every column tile ---------------------------------------------

    def row_tile(self, task) -> None:
        dot, rows = self.dot, self.rows
        # max(., 1): the same at run time (no task runs when M = 0), but CompactBufferAllocation's bound analysis
        # otherwise meets a divisor it evaluates to 0 (and fails) when M and K are symbolic
        tiles = tirx.max(self.row_tiles, _i64(1))
        bt = T.Bind(tirx.floordiv(task, tiles))
        first = T.Bind(tirx.floormod(task, tiles) * rows)
        a_at, _, out_at, index = self.offsets(bt)
        a_at, out_at = T.Bind(a_at), T.Bind(out_at)
        panel = T.alloc_buffer((rows * self.k_padded,), dot.packed)  # one allocation (a workspace when K is symbolic)
        width = 32
        full = tirx.floordiv(self.k, width)
        for r in range(rows):
            src = T.Bind(a_at + tirx.min(first + r, self.m - 1) * self.a_row)
            with T.serial(0, full) as kc:
                chunk = dot.pack_a(self.a.vload([src + kc * width], f"int8x{width}"))
                T.buffer_store(panel, chunk, [_ramp(r * self.k_padded + kc * width, width)])
            with T.serial(full * width, self.k_padded) as k:
                value = tirx.if_then_else(k < self.k, self.a[src + k], tirx.const(0, "int8"))
                T.buffer_store(panel, dot.pack_a(value), [r * self.k_padded + k])
        tiles = tirx.floordiv(self.col_blocks, self.cols)
        tile = (panel, bt, first, out_at, index)
        with T.serial(0, tiles) as jt:
            self.col_tile(*tile, jt * self.cols, self.cols)
        left = self.col_blocks - tiles * self.cols
        if _static(left) is not None:
            if _static(left):
                self.col_tile(*tile, tiles * self.cols, _static(left))
            return
        for count in range(1, self.cols):
            with T.If(left == count):
                with T.Then():
                    self.col_tile(*tile, tiles * self.cols, count)

    def col_tile(self, panel, bt, first, out_at, index, jb0, cols: int) -> None:
        """``rows x cols`` accumulator registers over all of ``K``, then the epilogue into y."""
        dot, lanes, group = self.dot, self.dot.lanes, self.dot.group
        vec = f"int32x{lanes}"
        acc = [[T.alloc_buffer((lanes,), "int32") for _ in range(cols)] for _ in range(self.rows)]
        for r in range(self.rows):
            for c in range(cols):
                if self.bias is not None:
                    start = self.bias.vload([(bt * self.col_blocks + jb0 + c) * lanes], vec)
                else:
                    start = tirx.Broadcast(tirx.const(0, "int32"), lanes)
                T.buffer_store(acc[r][c], start, [_ramp(0, lanes)])
        with T.serial(0, self.k_groups) as ko:
            for r in range(self.rows):
                at = r * self.k_padded + ko * group
                word = tirx.reinterpret("int32", panel.vload([at], f"{dot.packed}x{group}"))
                for c in range(cols):
                    block = self.packed.vload([self.packed_at(bt, jb0 + c, ko)], f"{dot.packed}x{self.block}")
                    T.buffer_store(acc[r][c], dot.dot(acc[r][c].vload([0], vec), word, block), [_ramp(0, lanes)])
        ragged = not self._divides(lanes, self.n)
        for r in range(self.rows):
            i = first + r
            with T.If(i < self.m):
                with T.Then():
                    for c in range(cols):
                        j0 = (jb0 + c) * lanes
                        if not ragged:
                            self.store(acc[r][c], out_at, index, i, j0)
                            continue
                        with T.If(j0 + lanes <= self.n):
                            with T.Then():
                                self.store(acc[r][c], out_at, index, i, j0)
                            with T.Else():
                                self.store_ragged(acc[r][c], out_at, index, i, j0)

    def epilogue(self, acc, index, i, j) -> tirx.PrimExpr:
        """``E(acc[jv])`` at output column ``j`` (the kernel's own epilogue expression; ``acc`` itself without one)."""
        kernel = self.kernel
        if kernel.epilogue is None:
            return acc
        pairs = list(zip(kernel.epilogue_vars, [*index, i, j], strict=True))
        return _substitute(kernel.epilogue, pairs, lambda node: acc if node.source.same_as(kernel.acc) else node)

    def store(self, acc, out_at, index, i, j0) -> None:
        """``y[bt, i, j0 + jv] = E(acc[jv])`` for ``jv < L``, vectorized by TVM."""
        with T.vectorized(0, self.dot.lanes) as jv:
            T.buffer_store(self.out, self.epilogue(acc[jv], index, i, j0 + jv), [out_at + i * self.n + j0 + jv])

    def store_ragged(self, acc, out_at, index, i, j0) -> None:
        """The last, partial block of a row: ``E`` of all ``L`` lanes (at columns clamped to ``N - 1``, so that ``E``
        reads its params in bounds) into a temporary, then a masked store of the lanes below ``N``.

        Through the temporary, not a scalar loop over ``acc``: LLVM turns such a loop into ``memcpy`` from the
        accumulator, whose address then escapes, and every accumulator of the tile goes through the stack.
        """
        lanes, dtype = self.dot.lanes, str(self.kernel.out.ty.dtype)
        tmp = T.alloc_buffer((lanes,), dtype)
        with T.vectorized(0, lanes) as jv:
            T.buffer_store(tmp, self.epilogue(acc[jv], index, i, tirx.min(j0 + jv, self.n - 1)), [jv])
        mask = _ramp(j0, lanes) < tirx.Broadcast(self.n, lanes)
        value = tmp.vload([0], f"{dtype}x{lanes}")
        T.evaluate(masked_store(self.out, value, _ramp(out_at + i * self.n + j0, lanes), mask))
