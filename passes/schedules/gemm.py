"""The CPU schedule of the linear kernels: packed constant weights, register tiles, an exact int8 dot instruction.

One schedule, three instructions (``DotIntrinsic``): ``X86_VNNI``
(``vpdpbusd`` on ymm, 8 output channels x 4 reductions, ``x86_int8``) on an
x86 target with AVX-512 VNNI and VL, ``X86_AVX2`` (8 x 4, the ``vpsignb`` /
``vpmaddubsw`` / ``vpmaddwd`` sequence) on one with AVX2 only, and
``AARCH64_SDOT`` (4 x 4, ``sdot``, ``arm_int8``) on an aarch64 target with
the dot-product extension; ``dot_intrinsic(target)`` picks one.  Below,
``L`` is the instruction's lanes (output channels per call) and ``R`` its
reduction length (4 for all three).

The VNNI instruction multiplies unsigned by signed bytes, so its panel holds
``x + 128`` as uint8 (``activation_offset``) and the epilogue reads
``acc + w_offset[n]`` for ``acc``, with ``w_offset[n] = -128 * sum_k w[n,
k]`` an int32 constant computed at compile time: ``sum_k (x + 128) w - 128
sum_k w = sum_k x w``.  Both sums stay inside int32 when ``K <=
MAX_OFFSET_K = 65793`` (``K * 255 * 128 < 2**31``); a longer reduction takes
the AVX2 dot instead.  Every int8 weight works, ``-128`` included.

A kernel this schedule takes (``match_linear``) is one whose PrimFunc holds
two blocks: the reduction ``acc[..., n] = sum_k int32(x[..., k]) *
int32(w[n, k])`` over the first two params (``x`` int8 ``[..., K]``, ``w``
int8 ``[N, K]``), then one elementwise epilogue ``y[..., n] = E(acc[..., n],
params)`` into the last param.  ``IntLinear``, ``IntLinear16``,
``IntLinearAcc`` (``passes/ops/linear.py``) and the fused ``IntLinear16+IntAdd``
(``passes/fuse_residual_epilogue.py``) are of that form; ``E`` is taken from
the kernel as it is, so the requantize (or bias, or residual add) is the
converter's own integer expression.

The call site ``call_tir(kernel, (x, w, *params))`` becomes::

    x2 = reshape(x, [M, K])                         M = the product of x's leading dims (symbolic)
    y2 = call_tir(scheduled, (x2, w_packed, *params'), [M, N])
    y  = reshape(y2, y's shape)

where ``w_packed`` is the weight constant packed at compile time into the
intrinsic's layout, ``w_packed[jo, ko, j, k] = w[L jo + j, R ko + k]`` (zero
beyond ``N`` and ``K``), and ``params'`` are the params with an output-shaped
one (the residual) flattened to ``[M, N]`` the same way.  The scheduled
kernel, per tile of ``rows`` x ``L col_blocks`` outputs (``Tiles``):

1. copies the tile's rows of ``x`` into a panel ``[rows, R ceil(K/R)]``
   (vectorized; rows past ``M`` repeat row ``M - 1``, columns past ``K`` are 0),
   so the last tile of a symbolic ``M`` and an odd ``K`` need no special
   case: the padded products are ``x * 0`` or land in rows never stored;
2. accumulates ``rows x col_blocks`` vector registers of ``L`` int32 over
   ``K`` in steps of ``R`` with the instruction (exact, see ``x86_int8`` and
   ``arm_int8``);
3. applies ``E`` to the tile (the epilogue is computed at the tile,
   vectorized ``L`` lanes wide) and stores the rows below ``M``.

The loop over row tiles is parallel.  The accumulator tile stays in
registers because its buffer keeps the ``global`` scope: compacted to the
tile (384 bytes), under TVM's 1 KiB limit, it becomes an LLVM ``alloca``
that LLVM promotes.  A ``local`` buffer would come from
``TVMBackendAllocWorkspace``, and as ``tvm.compile``'s ``shape_func`` (any
symbolic shape) lacks ``tirx.noalias``, TVM tags every buffer of the module
as may-alias: the accumulators were stored and reloaded at every step, 3x
slower.  For the same reason the intrinsic is one expression (a named
vector temporary became a workspace buffer too).

Everything is integer and each output
is ``E`` of the exact ``acc``, so the result is the unscheduled kernel's bit
for bit.  On x86 the default tile, ``rows = 2, col_blocks = 6`` (12
accumulators of the 16 ymm registers), measured 67-69 GMAC/s on one core
for 197x192x768 and 128x384x1536; every tile from 1x4 to 4x3 came within 5%
of it: the loop is bound by its four vector instructions per 32 products
(``vpsignb``, ``vpmaddubsw``, ``vpmaddwd``, ``vpaddd``), not by loads.  With
VNNI (one ``vpdpbusd`` per 32 products; 32 ymm registers, so ``rows = 4,
col_blocks = 5``) the same shapes reached 188-213 GMAC/s on one core of this
AMD EPYC (znver4), 0.95-1.07x onnxruntime's own VNNI ``MatMulInteger``
(``benchmarks/gemm_microbench.py --mcpu znver4``).  On
aarch64 the default, ``rows = 4, col_blocks = 4`` (16 accumulators, 4
weight and 4 activation registers of the 32), is the register budget's
choice, not a measurement: no aarch64 machine was at hand (qemu's timings
say nothing).

A 4-bit weight (``UnpackInt4`` of a constant, ``KernelCall.int4``) is
packed the same way and stored as nibbles, unpacked by an ``UnpackInt4``
kernel at run time, so the artifact keeps it 4-bit.

Refused (the kernel is left as it is, the reason returned): a target
without the instruction (AVX2; aarch64's ``+dotprod``), a weight that is
not a constant (nor ``UnpackInt4`` of one) or, on x86, holds ``-128`` (see ``x86_int8``), an epilogue
that reads a param at an index other than the output channel or the full
output index, or ``x`` of unknown rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm_ffi

from intq.passes import compat
from intq.passes.compat import relax, s_tir, te, tensor_type, tirx, tvm
from intq.passes.ops.unpack_int4 import emit_unpack_int4, pack_int4
from intq.passes.schedules import arm_int8, x86_int8


@dataclass(frozen=True)
class Tiles:
    """The register tile: ``rows`` rows of ``x`` by ``col_blocks`` blocks of ``L`` output channels."""

    rows: int = 2
    col_blocks: int = 6

    def __post_init__(self):
        if self.rows < 1 or self.col_blocks < 1:
            raise ValueError(f"Tiles: rows and col_blocks must be positive, got {self.rows}, {self.col_blocks}")


@dataclass(frozen=True)
class DotIntrinsic:
    """An exact int8 dot instruction ``C[j] += sum_{k<reduce} A[k] * B[j, k]`` (``j < lanes``) and its tile budget."""

    schedule_name: str
    lanes: int  # output channels per call: the int32 lanes of one vector register
    reduce: int  # reduction indices per call
    impl: Callable[[str, str, str], tirx.PrimFunc]  # scopes of A, B, C -> a fresh implementation
    feature: str  # the LLVM target feature the instruction needs
    tiles: Tiles  # the default register tile
    registers: int  # vector registers of the ISA
    operand_registers: Callable[[Tiles], int]  # those a tile needs beside its accumulators
    refuses_minus_128: bool  # whether a weight of -128 breaks the instruction's exactness
    features: tuple[str, ...] = ()  # further LLVM features the instruction needs
    activation_offset: int = 0  # added to x to make it the instruction's unsigned operand (see the docstring)

    def check_tiles(self, tiles: Tiles) -> None:
        used = tiles.rows * tiles.col_blocks + self.operand_registers(tiles)
        if used > self.registers:
            raise ValueError(
                f"Tiles: {tiles.rows} x {tiles.col_blocks} accumulators and the operands need {used} of the "
                f"{self.registers} vector registers of {self.schedule_name}; choose a smaller tile"
            )


X86_AVX2 = DotIntrinsic(
    "x86_avx2_gemm",
    x86_int8.LANES,
    x86_int8.REDUCE,
    x86_int8.dot_8x4_impl,
    "avx2",
    Tiles(rows=2, col_blocks=6),
    registers=16,
    operand_registers=lambda _tiles: 4,  # the broadcast row, |a|, sign(a) w, the pair sums
    refuses_minus_128=True,
)
AARCH64_SDOT = DotIntrinsic(
    "aarch64_sdot_gemm",
    arm_int8.LANES,
    arm_int8.REDUCE,
    arm_int8.sdot_4x4_impl,
    "dotprod",
    Tiles(rows=4, col_blocks=4),
    registers=arm_int8.REGISTERS,
    operand_registers=lambda tiles: tiles.rows + tiles.col_blocks,  # a broadcast per row, a weight block per column
    refuses_minus_128=False,
)
X86_VNNI = DotIntrinsic(
    "x86_vnni_gemm",
    x86_int8.LANES,
    x86_int8.REDUCE,
    x86_int8.dot_8x4_vnni_impl,
    "avx512vnni",
    Tiles(rows=4, col_blocks=5),
    registers=32,  # AVX-512 VL: ymm0-31
    operand_registers=lambda tiles: tiles.rows + 1,  # a broadcast per row, a weight block
    refuses_minus_128=False,
    features=("avx512vl",),
    activation_offset=x86_int8.VNNI_OFFSET,
)
SCHEDULE_NAME = X86_AVX2.schedule_name

#: The longest reduction whose offset accumulator ``sum_k (x + 128) * w`` stays inside int32 (no wrap at all).
MAX_OFFSET_K = (2**31 - 1) // (255 * 128)


def is_aarch64(target: tvm.target.Target) -> bool:
    return bool(target.attrs.get("feature.is_aarch64", False))


def dot_intrinsic(target: tvm.target.Target) -> DotIntrinsic | str:
    """The dot instruction of an LLVM ``target``, or the reason it has none."""
    if is_aarch64(target):
        if not tvm.target.codegen.target_has_features(AARCH64_SDOT.feature, target):
            return "the aarch64 target has no dot-product extension (add '+dotprod' to its mattr)"
        return AARCH64_SDOT
    if not tvm.target.codegen.target_has_features(X86_AVX2.feature, target):
        return f"the target {target.export().get('mcpu', '')!r} has no AVX2"
    if all(tvm.target.codegen.target_has_features(f, target) for f in (X86_VNNI.feature, *X86_VNNI.features)):
        return X86_VNNI
    return X86_AVX2


@dataclass(frozen=True)
class LinearKernel:
    """A PrimFunc read as ``y = E(x @ w.T, params)`` (see ``match_linear``)."""

    n: int
    k: int
    rank: int  # of x and y
    out_dtype: str
    epilogue: tirx.PrimExpr  # E, over the epilogue block's iter vars
    acc: tvm.ir.Var  # the accumulator buffer E reads
    iter_vars: tuple[tvm.ir.Var, ...]  # the epilogue block's, the last one the output channel
    params: tuple[tvm.ir.Var, ...]  # the buffer params after x and w, before y
    row_params: frozenset[str]  # those read at the full output index (flattened with x)


# --- recognizing the kernel ------------------------------------------------------------------------


def _blocks(func: tirx.PrimFunc) -> list[s_tir.SBlock]:
    found: list[s_tir.SBlock] = []
    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, found.append), order="pre")
    return [b for b in found if b.name_hint != "root"]


def _loads(expr: tirx.PrimExpr) -> list[tvm.ir.TensorLoad]:
    found: list[tvm.ir.TensorLoad] = []
    tvm_ffi.structural_walk(expr, (tvm.ir.TensorLoad, found.append))
    return found


def _scalar_vars(expr: tirx.PrimExpr) -> list[tvm.ir.Var]:
    found: list[tvm.ir.Var] = []
    tvm_ffi.structural_walk(expr, (tvm.ir.Var, found.append))
    return [v for v in found if not isinstance(v.ty, tirx.BufferType)]


def _same_vars(exprs, variables) -> bool:
    return len(exprs) == len(variables) and all(e.same_as(v) for e, v in zip(exprs, variables, strict=True))


def _static(shape) -> list[int] | None:
    return [int(d) for d in shape] if all(isinstance(d, tirx.IntImm) for d in shape) else None


def _is_int8_load(expr, buffer) -> bool:
    return (
        isinstance(expr, tirx.Cast)
        and str(expr.ty.dtype) == "int32"
        and isinstance(expr.value, tvm.ir.TensorLoad)
        and expr.value.source.same_as(buffer)
    )


def match_linear(func: tirx.PrimFunc) -> LinearKernel | str:
    """``func`` as a ``LinearKernel``, or the reason it is not one."""
    blocks = _blocks(func)
    if [b.name_hint for b in blocks[:1]] != ["acc"] or len(blocks) != 2:
        return f"expected the blocks 'acc' and an epilogue, found {[b.name_hint for b in blocks]}"
    reduce, epi = blocks
    if len(func.params) < 3:
        return "expected the params x, w, the other inputs, and y"
    x, w, out = func.params[0], func.params[1], func.params[-1]
    spatial = [iv.var for iv in reduce.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    reduction = [iv.var for iv in reduce.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    body = reduce.body
    if len(reduction) != 1 or not isinstance(body, tirx.BufferStore) or not _same_vars(body.indices, spatial):
        return "the 'acc' block is not one reduction into acc[i...]"
    acc, (r,) = body.buffer, reduction
    value = body.value
    if not (isinstance(value, tirx.Add) and isinstance(value.a, tvm.ir.TensorLoad) and value.a.source.same_as(acc)):
        return "the 'acc' block is not acc += ..."
    prod = value.b
    if not (isinstance(prod, tirx.Mul) and _is_int8_load(prod.a, x) and _is_int8_load(prod.b, w)):
        return "the 'acc' block does not add int32(x[...]) * int32(w[...])"
    if str(x.ty.dtype) != "int8" or str(w.ty.dtype) != "int8":
        return f"x and w must be int8, got {x.ty.dtype} and {w.ty.dtype}"
    x_at, w_at = prod.a.value.indices, prod.b.value.indices
    if not (_same_vars(x_at, [*spatial[:-1], r]) and _same_vars(w_at, [spatial[-1], r])):
        return "the 'acc' block does not read x[..., k] and w[n, k]"
    w_shape = _static(w.ty.shape)
    if w_shape is None or len(w_shape) != 2 or _static(x.ty.shape[-1:]) != w_shape[1:]:
        return f"w must be a static [N, K] matching x's last dim, got {list(w.ty.shape)} and {list(x.ty.shape)}"
    n, k = w_shape

    iters = tuple(iv.var for iv in epi.iter_vars)
    store = epi.body
    if not isinstance(store, tirx.BufferStore) or not store.buffer.same_as(out) or not _same_vars(store.indices, iters):
        return "the epilogue is not one elementwise store into the output"
    params = tuple(func.params[2:-1])
    rows: set[str] = set()
    for load in _loads(store.value):
        src, where = load.source, list(load.indices)
        if src.same_as(acc):
            if not _same_vars(where, iters):
                return "the epilogue reads acc at another index than its own"
        elif any(src.same_as(p) for p in params):
            if _same_vars(where, iters) and len(src.ty.shape) == len(iters):
                rows.add(src.name)
            elif any(v.same_as(i) for i in iters[:-1] for e in where for v in _scalar_vars(e)):
                return f"the epilogue reads {src.name} at an index that mixes the batch dims"
            elif _static(src.ty.shape) is None:
                return f"the epilogue param {src.name} has a symbolic shape {list(src.ty.shape)}"
        else:
            return f"the epilogue reads {src.name}, which is neither acc nor a param"
    return LinearKernel(n, k, len(iters), str(out.ty.dtype), store.value, acc, iters, params, frozenset(rows))


# --- the kernel ------------------------------------------------------------------------------------


def weight_refusal(w: np.ndarray | None, dot: DotIntrinsic = X86_AVX2) -> str | None:
    """Why ``w`` cannot be packed for ``dot``, or None."""
    if w is None:
        return "the weight is not a constant (it is packed at compile time)"
    if w.dtype != np.int8 or w.ndim != 2:
        return f"the weight must be an int8 matrix, got {w.dtype} {w.shape}"
    if dot.refuses_minus_128 and (w == -128).any():
        return "the weight holds -128: sign(x) * w would wrap (x86_int8 needs w in [-127, 127])"
    return None


def col_blocks_padded(n: int, tiles: Tiles, dot: DotIntrinsic = X86_AVX2) -> int:
    """The number of ``L``-channel blocks the packed weight holds: ``ceil(N / L)`` rounded up to the tile."""
    return math.ceil(math.ceil(n / dot.lanes) / tiles.col_blocks) * tiles.col_blocks


def pack_weight(w: np.ndarray, tiles: Tiles, dot: DotIntrinsic = X86_AVX2) -> np.ndarray:
    """``w[N, K]`` as ``w_packed[jo, ko, j, k] = w[L jo + j, R ko + k]``, zero-padded."""
    n, k = w.shape
    lanes, reduce = dot.lanes, dot.reduce
    nb, kb = col_blocks_padded(n, tiles, dot), math.ceil(k / reduce)
    padded = np.zeros((nb * lanes, kb * reduce), np.int8)
    padded[:n, :k] = w
    return np.ascontiguousarray(padded.reshape(nb, lanes, kb, reduce).transpose(0, 2, 1, 3))


def _i64(value: int) -> tirx.IntImm:
    return tirx.IntImm("int64", value)


def gemm_te(kernel: LinearKernel, tiles: Tiles, dot: DotIntrinsic = X86_AVX2) -> tirx.PrimFunc:
    """The unscheduled 2-D kernel: ``(x[M, K], w_packed, *params) -> y[M, N]`` with the tiles' padding."""
    n, k, rows = kernel.n, kernel.k, tiles.rows
    lanes, reduce = dot.lanes, dot.reduce
    kb, nb = math.ceil(k / reduce), col_blocks_padded(n, tiles, dot)
    m = tirx.Var("m", "int64")
    x = te.placeholder((m, _i64(k)), "int8", "x")
    w = te.placeholder(tuple(map(_i64, (nb, kb, lanes, reduce))), "int8", "w_packed")
    shapes = {p.name: (m, _i64(n)) if p.name in kernel.row_params else tuple(p.ty.shape) for p in kernel.params}
    params = {p.name: te.placeholder(shapes[p.name], str(p.ty.dtype), p.name) for p in kernel.params}
    padded_rows = tirx.floordiv(m + rows - 1, rows) * rows

    offset = dot.activation_offset
    x_dtype = "uint8" if offset else "int8"

    def panel(i, j):
        row = te.min(i, m - 1)
        value = x[row, j if k % reduce == 0 else te.min(j, _i64(k - 1))]
        if offset:
            value = (value.astype("int16") + offset).astype("uint8")
        if k % reduce == 0:
            return value
        return tirx.Select(j < k, value, tirx.const(0, x_dtype))

    x_pack = te.compute((padded_rows, _i64(kb * reduce)), panel, name="x_pack")
    w_offset = te.placeholder((_i64(n),), "int32", "w_offset") if offset else None
    ko, ki = te.reduce_axis((_i64(0), _i64(kb)), "ko"), te.reduce_axis((_i64(0), _i64(reduce)), "ki")
    acc = te.compute(
        (padded_rows, _i64(nb), _i64(lanes)),
        lambda i, jo, j: te.sum(
            x_pack[i, ko * reduce + ki].astype("int32") * w[jo, ko, j, ki].astype("int32"), axis=[ko, ki]
        ),
        name="acc",
    )

    def epilogue(i, c):
        *batch, channel = kernel.iter_vars

        def load(node):
            src = node.source
            if src.same_as(kernel.acc):
                value = acc[i, tirx.floordiv(c, lanes), tirx.floormod(c, lanes)]
                return value if w_offset is None else value + w_offset[c]
            if src.name in kernel.row_params:
                return params[src.name][i, c]
            if src.name in params:
                return params[src.name][tuple(node.indices)]
            return node

        def var(node):
            return c if node.same_as(channel) else node

        return tvm_ffi.structural_map(kernel.epilogue, [(tvm.ir.Var, var), (tvm.ir.TensorLoad, load)])

    y = te.compute((m, _i64(n)), epilogue, name="epilogue")
    return te.create_prim_func([x, w, *([] if w_offset is None else [w_offset]), *params.values(), y])


def weight_offset(w: np.ndarray, dot: DotIntrinsic) -> np.ndarray:
    """``-offset * sum_k w[n, k]`` as int32 ``[N]``: what turns ``sum_k (x + offset) w`` back into ``sum_k x w``."""
    return (-dot.activation_offset * w.astype(np.int64).sum(axis=1)).astype(np.int32)


def register_tile(sch: s_tir.Schedule, acc, reduce_loop, lanes_loop, rows_loop, blocks_loop):
    """Zero the accumulator tile vectorized and unrolled, unroll the tile's rows and blocks; the dot block.

    Shared by the GEMM and the conv-as-GEMM schedules: with every tile loop unrolled, LLVM keeps the
    ``rows x col_blocks`` accumulators in registers.  Returns the blockized dot (what gets tensorized).
    """
    init = sch.decompose_reduction(acc, reduce_loop)
    dot_block = sch.blockize(lanes_loop)
    sch.unroll(rows_loop)
    sch.unroll(blocks_loop)
    *_, init_rows, init_blocks, init_lanes = sch.get_loops(init)
    sch.vectorize(init_lanes)
    sch.unroll(init_blocks)
    sch.unroll(init_rows)
    return dot_block


def schedule_gemm(func: tirx.PrimFunc, tiles: Tiles, dot: DotIntrinsic = X86_AVX2) -> tirx.PrimFunc:
    """Tile, pack, fuse and tensorize ``gemm_te``'s PrimFunc (see the module docstring)."""
    dot.check_tiles(tiles)
    sch = s_tir.Schedule(func)
    acc, panel, epilogue = (sch.get_sblock(name) for name in ("acc", "x_pack", "epilogue"))
    i, jo, j, ko, ki = sch.get_loops(acc)
    i_tile, i_in = sch.split(i, [None, tiles.rows])
    jo_tile, jo_in = sch.split(jo, [None, tiles.col_blocks])
    sch.reorder(i_tile, jo_tile, ko, i_in, jo_in, j, ki)
    sch.compute_at(panel, i_tile)
    sch.reverse_compute_at(epilogue, jo_tile)
    sch.parallel(i_tile)
    dot_block = register_tile(sch, acc, ko, j, i_in, jo_in)
    *_, e_rows, e_cols = sch.get_loops(epilogue)
    e_blocks, e_lanes = sch.split(e_cols, [None, dot.lanes])
    sch.vectorize(e_lanes)
    sch.unroll(e_blocks)
    k_panel = sch.get_loops(panel)[-1]
    width = 16 if int(sch.get(k_panel).extent) % 16 == 0 else dot.reduce
    sch.vectorize(sch.split(k_panel, [None, width])[1])

    block = sch.get(dot_block)
    (written,) = [r.source for r in block.writes]
    reads = [r.source for r in block.reads if not r.source.same_as(written)]
    (weights,) = [b for b in reads if b.name == "w_packed"]
    (activations,) = [b for b in reads if not b.same_as(weights)]
    impl = dot.impl(*(compat.buffer_scope(b) for b in (activations, weights, written)))
    bind = {"A": activations.name, "B": weights.name, "C": written.name}
    return compat.tensorize(sch.mod["main"], block.name_hint, impl, bind)


# --- the call site ---------------------------------------------------------------------------------


def _leading_product(shape) -> tirx.PrimExpr:
    out = _i64(1)
    for d in shape:
        out = out * d
    return out


def rewrite_linear_call(call, tiles: Tiles | None = None) -> relax.Expr | str:
    """The scheduled replacement of ``call`` (a ``schedules.KernelCall``), or the reason it does not apply.

    The instruction is the target's (``dot_intrinsic``); ``tiles`` defaults to its ``tiles``.
    """
    dot = dot_intrinsic(call.target)
    if isinstance(dot, str):
        return dot
    kernel = call.memo.get(("linear", call.name))
    if kernel is None:
        kernel = match_linear(call.func)
        if isinstance(kernel, LinearKernel):
            if dot.activation_offset and kernel.k > MAX_OFFSET_K:
                dot = X86_AVX2  # the offset accumulator could wrap; the AVX2 dot needs no offset
            chosen = dot.tiles if tiles is None else tiles
            kernel = (kernel, schedule_gemm(gemm_te(kernel, chosen, dot), chosen, dot), dot, chosen)
        call.memo[("linear", call.name)] = kernel
    if isinstance(kernel, str):
        return kernel
    kernel, scheduled, dot, tiles = kernel
    if not isinstance(tensor_type(call.args[0]).shape, relax.ShapeExpr):
        return "x has no known shape (rank): its leading dims cannot be flattened"
    int4 = call.int4[1] if call.int4 else None  # a 4-bit weight: packed here, kept 4-bit, unpacked at run time
    w = call.constants[1] if int4 is None else int4
    refusal = weight_refusal(w, dot)
    if refusal:
        return refusal
    x, *params = (call.args[0], *call.args[2:])
    x_shape = tensor_type(x).shape.values
    out_ty = tensor_type(call.call)
    m = _leading_product(x_shape[:-1])
    bb = call.builder
    flat = kernel.rank != 2

    def rows(expr, width):
        return bb.emit(relax.op.reshape(expr, [m, width])) if flat else expr

    names = [p.name for p in kernel.params]
    packed = pack_weight(w, tiles, dot)
    if int4 is None:
        weight = relax.const(packed)
    else:
        weight = bb.emit(emit_unpack_int4(bb, relax.const(pack_int4(packed)), packed.shape, "UnpackInt4"))
    args = [rows(x, kernel.k), weight]
    if dot.activation_offset:
        args.append(relax.const(weight_offset(w, dot)))
    args += [rows(a, kernel.n) if name in kernel.row_params else a for name, a in zip(names, params, strict=True)]
    gv = call.memo.get(("linear_gv", call.name))
    if gv is None:
        attrs = {
            "intq.scheduled_op": str(call.func.attrs.get("intq.op", "linear")) if call.func.attrs else "linear",
            "intq.schedule": dot.schedule_name,
            "op_pattern": 8,  # kOpaque: TVM's FuseOps must not merge the scheduled kernel into another
            "tirx.is_scheduled": True,
        }
        func = scheduled.without_attr("global_symbol").with_attrs(attrs)  # private, as call_te's kernels
        gv = bb.add_func(func, f"{call.name}_{dot.schedule_name}")
        call.memo[("linear_gv", call.name)] = gv
    y = relax.call_tir(gv, relax.Tuple(args), relax.TensorType([m, kernel.n], kernel.out_dtype))
    # Emitted, not returned: a reshape bound to a dataflow var is a view (RewriteDataflowReshape), one bound to
    # the block's output var would be copied.
    return bb.emit(relax.op.reshape(bb.emit(y), out_ty.shape)) if flat else y
