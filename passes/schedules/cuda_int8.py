"""CUDA schedule of the int8 GEMM kernels: shared-memory tiles, register tiles, the exact ``__dp4a``.

Each contraction kernel (``IntLinear*``, ``IntMatMul*``, one-group
``IntConv2d_*``) is read as a batched GEMM by ``cuda_plans`` and rebuilt
here as::

    lhs_tile[b, i, k] = lhs(b, i, k) if i < M and k < K else 0                  int8  [.., Mp, Kp]
    rhs_tile[b, j, k] = rhs(b, j, k) if j < N and k < K else 0                  int8  [.., Np, Kp]
    acc[b, i, j]      = sum_{k < Kp} int32(lhs_tile[b, i, k]) * int32(rhs_tile[b, j, k])   int32
    out[b, i, j]      = E(acc[b, i, j], b, i, j)         the kernel's own epilogue, for i < M, j < N

``M``, ``N``, ``K`` (any may be symbolic) padded up to the tile: ``Mp``,
``Np``, ``Kp``.  The padded products are ``x * 0``; rows and columns past
``M``, ``N`` are never stored.  ``k`` is innermost in both tiles, so the 4
``k`` of one ``__dp4a`` are one 32-bit word of shared memory.

The schedule (``GpuTiles``): a thread block computes ``rows x cols``
outputs with ``threads_y x threads_x`` threads, each thread a register tile
of ``rows / threads_y x cols / threads_x`` int32 accumulators:

- thread blocks over ``(batch, M / rows, N / cols)`` (``blockIdx.z, y, x``);
- per ``depth`` of ``K``, the block's threads copy its ``lhs`` and ``rhs``
  tiles into shared memory (``cuda_plans`` says how: 4-byte loads where the
  layout proves them aligned, else byte by byte along the source's unit
  stride), with a barrier before and after;
- each thread updates its accumulators with ``C = __dp4a(a4, b4, C)``, one
  instruction per output and 4 ``k`` (``DP4A``, put in by
  ``compat.tensorize``);
- the epilogue runs per thread on its registers and stores inside ``M x N``.

Exactness: ``__dp4a(a, b, c)`` on signed bytes (PTX ``dp4a.s32.s32``) is
``c + a0 b0 + a1 b1 + a2 b2 + a3 b3`` in 32-bit two's complement: each
product is exact (``|a b| <= 2**14``), and the accumulator is the int32 sum
of the kernel's products in another order.  int32 addition wraps, hence is
associative and commutative, and the exporter's accumulator bound keeps the
true sum inside int32: the same value as the unscheduled kernel's and
onnxruntime's.  ``E`` is the kernel's expression, so the output is the
kernel's bit for bit.  (Tensor cores, ``mma`` int8, would be exact too; this
schedule does not use them.)

Call sites: ``IntMatMul`` keeps its params (``schedule_matmul``); a linear's
``x`` and output are flattened to ``[M, K]``, ``[M, N]`` around the call
(``rewrite_linear_call``, as the CPU schedule does) and a convolution's
output ``[B, O, OH OW]`` is reshaped to ``[B, O, OH, OW]``
(``rewrite_conv_call``).  A kernel ``cuda_plans`` refuses gets
``cuda_rows.fallback`` instead (``schedules.CUDA_SCHEDULES``).

Not measured: no GPU was at hand when this was written; the tile is the
textbook one (64 x 64 outputs, 256 threads, 16 accumulators per thread,
4 KiB of shared memory), not a tuned one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from tvm.script import tirx as T

from intq.passes import compat
from intq.passes.compat import relax, s_tir, te, tensor_type, tirx, tvm
from intq.passes.schedules.cuda_plans import ALONG_ROWS, VECTOR, GemmPlan, conv_plan, i64, linear_plan, matmul_plan
from intq.passes.schedules.cuda_rows import KERNEL_ATTRS

DP4A = "dp4a_s8s8s32_acc"  # the TensorIntrin name of the dot below
REDUCE = 4  # k per __dp4a
SCHEDULE_NAME = "cuda_dp4a_gemm"


@T.prim_func(s_tir=True)
def dp4a_desc(
    A: T.Buffer((4,), "int8", offset_factor=1, scope="shared"),
    B: T.Buffer((4,), "int8", offset_factor=1, scope="shared"),
    C: T.Buffer((1,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0], A[0:4], B[0:4])
        T.writes(C[0])
        for k in range(4):
            with T.sblock("update"):
                vk = T.axis.remap("R", [k])
                C[0] = C[0] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vk])


def dp4a_impl() -> tirx.PrimFunc:
    """A fresh ``C[0] = __dp4a(A[0:4], B[0:4], C[0])`` (``compat.tensorize`` needs one per use)."""

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "int8", offset_factor=1, scope="shared"),
        B: T.Buffer((4,), "int8", offset_factor=1, scope="shared"),
        C: T.Buffer((1,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            # the accumulator is dp4a's own third operand: one instruction per 4 products
            C[0] = T.call_pure_extern("int32", "__dp4a", A.vload([0], "int8x4"), B.vload([0], "int8x4"), C[0])

    return impl


s_tir.TensorIntrin.register(DP4A, dp4a_desc, dp4a_impl(), override=True)


@dataclass(frozen=True)
class GpuTiles:
    """``rows x cols`` outputs per thread block, ``threads_y x threads_x`` threads, ``depth`` k per shared tile."""

    rows: int = 64
    cols: int = 64
    depth: int = 32
    threads_y: int = 16
    threads_x: int = 16

    def __post_init__(self):
        if self.rows % self.threads_y or self.cols % self.threads_x:
            raise ValueError(
                f"GpuTiles: rows {self.rows} and cols {self.cols} must be multiples of threads_y {self.threads_y} "
                f"and threads_x {self.threads_x} (each thread owns a whole register tile)"
            )
        if self.depth % REDUCE or self.depth < REDUCE:
            raise ValueError(f"GpuTiles: depth {self.depth} must be a positive multiple of {REDUCE} (one __dp4a)")
        if self.threads_y * self.threads_x > 1024:
            raise ValueError(f"GpuTiles: {self.threads_y} x {self.threads_x} threads exceed CUDA's 1024 per block")


def tiles_for(n: tirx.PrimExpr) -> GpuTiles:
    """The default tile; half as wide when a static ``N`` fits in 32 columns (attention's ``P @ V``, heads of 32)."""
    if isinstance(n, tirx.IntImm) and int(n) <= 32:
        return GpuTiles(cols=32, threads_x=8)
    return GpuTiles()


# --- the kernel --------------------------------------------------------------------------------------


def _ceil_to(extent: tirx.PrimExpr, step: int) -> tirx.PrimExpr:
    if isinstance(extent, tirx.IntImm):
        return i64(math.ceil(int(extent) / step) * step)
    return tirx.floordiv(extent + step - 1, i64(step)) * i64(step)


def _exact(extent: tirx.PrimExpr, step: int) -> bool:
    return isinstance(extent, tirx.IntImm) and int(extent) % step == 0


def gemm_te(plan: GemmPlan, tiles: GpuTiles) -> tirx.PrimFunc:
    """The padded GEMM of ``plan``, unscheduled: blocks ``lhs_tile``, ``rhs_tile``, ``acc``, ``out``."""
    m, n, k = plan.m, plan.n, plan.k
    mp, np_, kp = _ceil_to(m, tiles.rows), _ceil_to(n, tiles.cols), _ceil_to(k, tiles.depth)
    zero = tirx.const(0, "int8")

    def tile(extent, read, exact_rows):
        def body(*index):
            *b, row, kk = index
            conditions = [] if exact_rows else [row < extent]
            if not _exact(k, tiles.depth):
                conditions.append(kk < k)
            if not conditions:
                return read(tuple(b), row, kk)
            # clamped, so that no lane of a vector load reads outside the tensor
            value = read(tuple(b), te.min(row, extent - 1), te.min(kk, k - 1))
            return tirx.if_then_else(tirx.all(*conditions), value, zero)

        return body

    lhs = te.compute((*plan.batch, mp, kp), tile(m, plan.lhs, _exact(m, tiles.rows)), name="lhs_tile")
    rhs = te.compute((*plan.batch, np_, kp), tile(n, plan.rhs, _exact(n, tiles.cols)), name="rhs_tile")
    slices = te.reduce_axis((i64(0), tirx.floordiv(kp, i64(tiles.depth))), "kt")
    quads = te.reduce_axis((i64(0), i64(tiles.depth // REDUCE)), "kq")
    lanes = te.reduce_axis((i64(0), i64(REDUCE)), "kl")

    def product(*index):
        *b, i, j = index
        kk = (slices * i64(tiles.depth // REDUCE) + quads) * i64(REDUCE) + lanes
        lhs_value = lhs[(*b, i, kk)].astype("int32")
        return te.sum(lhs_value * rhs[(*b, j, kk)].astype("int32"), axis=[slices, quads, lanes])

    acc = te.compute((*plan.batch, mp, np_), product, name="acc")

    def output(*index):
        *b, i, j = index
        return plan.epilogue(acc[index], tuple(b), i, j).astype(plan.out_dtype)

    out = te.compute((*plan.batch, m, n), output, name="out")
    return te.create_prim_func([*plan.inputs, out])


def schedule_gemm(func: tirx.PrimFunc, plan: GemmPlan, tiles: GpuTiles) -> tirx.PrimFunc:
    """Tile ``gemm_te``'s PrimFunc for the GPU and substitute ``__dp4a`` (module docstring)."""
    sch = s_tir.Schedule(func)
    lhs, rhs, acc, out = (sch.get_sblock(name) for name in ("lhs_tile", "rhs_tile", "acc", "out"))
    nb = len(plan.batch)
    sch.set_scope(acc, 0, "local")
    *batch, i, j, kt, kq, kl = sch.get_loops(acc)
    bi, ty, ti = sch.split(i, [None, tiles.threads_y, tiles.rows // tiles.threads_y])
    bj, tx, tj = sch.split(j, [None, tiles.threads_x, tiles.cols // tiles.threads_x])
    sch.reorder(*batch, bi, bj, ty, tx, kt, kq, ti, tj, kl)
    if batch:
        sch.bind(sch.fuse(*batch) if len(batch) > 1 else batch[0], "blockIdx.z")
    sch.bind(bi, "blockIdx.y")
    sch.bind(bj, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    exact_k = _exact(plan.k, tiles.depth)
    for block, copy in ((lhs, plan.lhs_copy), (rhs, plan.rhs_copy)):
        sch.set_scope(block, 0, "shared")  # before compute_at: a shared tile is sized for the whole thread block
        sch.compute_at(block, kt, preserve_unit_loops=True)
        loops = sch.get_loops(block)[-(nb + 2) :]  # the batch dims (extent 1), the rows, k
        if copy == ALONG_ROWS:
            sch.reorder(loops[-1], loops[-2])
            loops = sch.get_loops(block)[-(nb + 2) :]
        vector = copy == VECTOR and exact_k  # a partial K would put the k < K test inside the vector
        parts = sch.split(sch.fuse(*loops), [None, tiles.threads_y, tiles.threads_x] + ([REDUCE] if vector else []))
        sch.bind(parts[1], "threadIdx.y")
        sch.bind(parts[2], "threadIdx.x")
        if vector:
            sch.vectorize(parts[3])
    sch.reverse_compute_at(out, tx)
    sch.decompose_reduction(acc, kt)
    dot = sch.blockize(kl)
    sch.unroll(ti)
    sch.unroll(tj)
    block = sch.get(dot)
    (written,) = [r.source for r in block.writes]
    reads = [r.source for r in block.reads if not r.source.same_as(written)]
    (lhs_buf,) = [b for b in reads if b.name.startswith("lhs_tile")]
    (rhs_buf,) = [b for b in reads if b.name.startswith("rhs_tile")]
    bind = {"A": lhs_buf.name, "B": rhs_buf.name, "C": written.name}
    return compat.tensorize(sch.mod["main"], block.name_hint, dp4a_impl(), bind)


def build_gemm(plan: GemmPlan, tiles: GpuTiles | None = None) -> tirx.PrimFunc:
    """``plan``'s scheduled kernel (private: no global symbol), tagged as scheduled and opaque."""
    tiles = tiles or tiles_for(plan.n)
    func = schedule_gemm(gemm_te(plan, tiles), plan, tiles)
    return func.without_attr("global_symbol").with_attrs({**KERNEL_ATTRS, "intq.schedule": SCHEDULE_NAME})


# --- where the schedules plug in (``schedules.CUDA_SCHEDULES`` / ``CUDA_CALL_REWRITES``) -----------------


def schedule_matmul(func: tirx.PrimFunc, _target: tvm.target.Target) -> tirx.PrimFunc | str:
    """The drop-in dp4a kernel of an ``IntMatMul`` / ``IntMatMulAcc`` kernel, or the reason it does not apply."""
    plan = matmul_plan(func)
    if isinstance(plan, str):
        return plan
    out = build_gemm(plan)
    attrs = {k: v for k, v in (func.attrs or {}).items() if k != "global_symbol"}
    return out.with_attrs(attrs)


def _emit_kernel(call, key: str, build: Callable[[], tirx.PrimFunc | str]):
    """The GlobalVar of the scheduled kernel for ``call``'s PrimFunc (built once per pass run), or a reason."""
    memo_key = (key, call.name)
    if memo_key not in call.memo:
        func = build()
        if not isinstance(func, str):
            op = str(call.func.attrs.get("intq.op", key)) if call.func.attrs else key
            func = call.builder.add_func(func.with_attr("intq.scheduled_op", op), f"{call.name}_{SCHEDULE_NAME}")
        call.memo[memo_key] = func
    return call.memo[memo_key]


def _leading_product(shape) -> tirx.PrimExpr:
    total = i64(1)
    for d in shape:
        total = total * d
    return compat.Analyzer().simplify(total)


def rewrite_linear_call(call) -> relax.Expr | str:
    """``call`` (a ``schedules.KernelCall`` of a linear kernel) through the flattened dp4a kernel, or a reason."""
    if not isinstance(tensor_type(call.args[0]).shape, relax.ShapeExpr):
        return "x has no known shape (rank): its leading dims cannot be flattened"
    plan = linear_plan(call.func)
    if isinstance(plan, str):
        return plan
    plan, rows = plan
    gv = _emit_kernel(call, "linear", lambda: build_gemm(plan))
    if isinstance(gv, str):
        return gv
    x_shape = tensor_type(call.args[0]).shape.values
    out_ty = tensor_type(call.call)
    rank = len(x_shape)
    m = _leading_product(x_shape[:-1])
    bb = call.builder

    def flat(expr, width):
        return bb.emit(relax.op.reshape(expr, [m, width])) if rank != 2 else expr

    names = [p.name for p in call.func.params[2:-1]]
    args = [flat(call.args[0], plan.k), call.args[1]]
    args += [flat(a, plan.n) if name in rows else a for name, a in zip(names, call.args[2:], strict=True)]
    y = relax.call_tir(gv, relax.Tuple(args), relax.TensorType([m, plan.n], plan.out_dtype))
    # emitted, not returned: a reshape bound to a dataflow var is a view, one bound to the output var a copy
    return bb.emit(relax.op.reshape(bb.emit(y), out_ty.shape)) if rank != 2 else y


def rewrite_conv_call(call) -> relax.Expr | str:
    """``call`` (a ``schedules.KernelCall`` of a convolution) through the implicit-GEMM dp4a kernel, or a reason."""
    plan = conv_plan(call.func)
    if isinstance(plan, str):
        return plan
    gv = _emit_kernel(call, "conv", lambda: build_gemm(plan))
    if isinstance(gv, str):
        return gv
    out_ty = tensor_type(call.call)
    if not isinstance(out_ty.shape, relax.ShapeExpr):
        return "the output has no known shape"
    batch, channels, height, width = out_ty.shape.values
    flat = relax.TensorType([batch, channels, height * width], plan.out_dtype)
    y = call.builder.emit(relax.call_tir(gv, relax.Tuple(list(call.args)), flat))
    return call.builder.emit(relax.op.reshape(y, out_ty.shape))
