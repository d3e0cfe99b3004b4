"""x86 schedules of ``IntConv2d``: an implicit-GEMM AVX2 kernel for dense convs, a direct one for the rest.

**Dense convs (groups = 1): ``rewrite_conv_call``.**  The convolution is the
GEMM ``acc[n, p, o] = sum_k X[n, p, k] * W[o, k]`` over output pixels
``p = oh * Wo + ow`` and reductions ``k = (r0, r1, r2)``, computed with the
exact AVX2 dot of ``x86_int8`` (8 output channels x 4 reductions, ``X``
broadcast, ``W`` in ``[-127, 127]``), as ``gemm`` does for the linears.
The call ``call_tir(conv kernel, (x, w, b[, m][, s]))`` becomes::

    y3 = call_tir(scheduled, (x, w_packed, b[, m][, s]), [B, O, Ho * Wo])
    y  = reshape(y3, [B, O, Ho, Wo])                        (a view)

The reduction order ``(r0, r1, r2)`` is ``(c, i, j)`` or ``(i, j, c)``
(``Layout``): the one whose last axis, zero-padded to a multiple of 4,
wastes fewer products (3x3 over 16 channels: ``(i, j, c)``, no padding; the
16x16 patch embedding over 3 channels: ``(c, i, j)``, none either).
``w_packed[jo, r0, r1, r2o, jj, r2i] = w[8 jo + jj, (r0, r1, 4 r2o + r2i)]``
is packed at compile time (zero beyond ``O`` and the padded axis).  The
kernel

1. copies ``x`` once into ``x_t``, zero-padded by the conv's pads and laid
   out so that 4 consecutive ``r2`` are 4 consecutive bytes (channels last
   for ``ijc``; for ``cij`` NCHW itself, and no copy at all without pads);
   this is the only im2col: the intrinsic's 4-byte operand is read from
   ``x_t`` at the pixel's window, so no panel is gathered per tile;
2. per tile of ``rows`` output pixels x ``col_blocks`` blocks of 8 channels
   (``Tiles``, ``plan_tiles`` from ``O``), accumulates ``rows x col_blocks``
   registers of 8 int32 over ``r0, r1, r2 / 4`` (pixels past ``Ho * Wo``
   repeat the last one and are not stored);
3. applies the op's epilogue, ``clamp(((acc + b) * m + 2**(s-1)) >> s,
   qmin, qmax)`` (the converter's ``dyadic.requantize``, its clamp range
   read off the op type), vectorized over 8 channels where ``Ho * Wo`` is
   static, and stores the tile's pixels and channels below ``O``.

The tiles ``(n, pixel tile)`` run in parallel.  The epilogue reads the
accumulator tile at constant offsets only (its loops unrolled): one access at
a variable offset and LLVM keeps the tile in memory, storing it at every
step.  Every output is the epilogue of the exact int32 ``acc`` (int32
addition is associative, the exporter bounds the sum), so the result is the
unscheduled kernel's bit for bit.  Refused (the kernel falls to the direct
schedule, the reason kept in ``ScheduleKernels.skipped``): a target without
AVX2, grouped convs, a weight that is not a constant nor ``UnpackInt4`` of
one, or that holds ``-128``.  A 4-bit weight keeps 4 bits in the artifact:
``w_packed`` is stored as nibbles and unpacked by an ``UnpackInt4`` kernel
at run time.

Measured (``benchmarks/kernel_microbench.py --models cnn --threads 1 --clock
cpu``, ``x86-64-v3``, one thread; the machine shared with other jobs):
ResNet-8's 3x3 16->16 at 32x32 0.49 -> 0.07 ms, its stride-2 16->32 0.26
-> 0.05 ms, DeiT's 16x16/16 patch embedding 3->192 on 224x224 1.65 -> 0.54
ms (the GEMM alone ~65 GMAC/s, the linears' 67).

**AVX-512 VNNI** (``has_vnni(target)``): the same plan on ``vpdpbusd``
(``x86_int8.dot_8x4_vnni_impl``, one instruction per 32 products, exact for
every int8 weight): ``x_t`` is always built and holds ``x + 128`` as uint8
(the conv's zero padding becomes ``128``, a padded tap adds ``128 w``, which
the compensation below takes back like any other), tiles fill 24 of the 32
ymm registers (``plan_tiles(O, 24)``), and the epilogue adds ``w_offset[o]
= -128 * sum over (c, i, j) of w[o]`` (int32, compile time).  A reduction
``C kh kw > MAX_OFFSET_K`` keeps the AVX2 dot.  Measured (same command,
``--mcpu znver4``, this AMD EPYC): 3x3 16->16 0.053 -> 0.018 ms, the
stride-2 16->32 0.038 -> 0.011 ms, the patch embedding 0.457 -> 0.154 ms
(AVX2 -> VNNI).

**Any conv: ``schedule_direct``** (depthwise, grouped, or refused above), a
schedule of the converter's own PrimFunc: the planes ``(n, o)`` in parallel,
the group's padded input plane built once per plane (``pad`` at that loop),
each output row's ``acc`` computed at the row (a row-sized buffer), the
loops left to LLVM's vectorizer.  A depthwise 3x3 does 9 products per output
and its int64 requantize dominates: explicit 16-lane vectors and other
orders measured no faster on one thread than the unscheduled kernel (64
channels at 32x32: 0.09 ms either way), so this schedule only adds the
parallel planes and the locality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from intq.passes import compat
from intq.passes.compat import relax, s_tir, te, tensor_type, tirx
from intq.passes.ops import dyadic
from intq.passes.ops.base import IMMEDIATES_ATTR, OP_ATTR, kernel_operands, split_range_suffix
from intq.passes.ops.conv import ConvConfig, IntConv2d
from intq.passes.ops.unpack_int4 import emit_unpack_int4, pack_int4
from intq.passes.schedules.gemm import MAX_OFFSET_K, Tiles, register_tile
from intq.passes.schedules.x86_int8 import LANES, REDUCE, VNNI_OFFSET, dot_8x4_impl, dot_8x4_vnni_impl

SCHEDULE_NAME = "x86_avx2_conv_gemm"
VNNI_SCHEDULE_NAME = "x86_vnni_conv_gemm"


def has_vnni(target) -> bool:
    """Whether ``target`` has AVX-512 VNNI on 256-bit registers (``vpdpbusd`` ymm: ``avx512vnni`` + ``avx512vl``)."""
    return all(compat.tvm.target.codegen.target_has_features(f, target) for f in ("avx512vnni", "avx512vl"))


@dataclass(frozen=True)
class Layout:
    """The reduction order, ``"cij"`` or ``"ijc"``, and the extents of ``(r0, r1, r2)``; ``r2`` is padded to 4.

    The kernel reads 4 consecutive ``r2`` from a copy ``x_t`` of the input in
    that order: ``ijc``: ``x_t[n, y, z, c]`` (channels last, any stride and
    dilation); ``cij``: ``x_t[n, c, y, z]`` (NCHW itself, only with a column
    dilation of 1: the 4 taps ``j`` are then 4 consecutive columns).
    """

    order: str
    extents: tuple[int, int, int]  # of r0, r1, r2 (unpadded)

    @property
    def padded(self) -> int:
        return math.ceil(self.extents[2] / REDUCE) * REDUCE

    @property
    def products(self) -> int:
        return self.extents[0] * self.extents[1] * self.padded

    @classmethod
    def choose(cls, channels: int, kh: int, kw: int, col_dilation: int) -> Layout:
        """``ijc`` unless ``cij`` is possible (column dilation 1) and pads the reduction less; ``cij`` on a tie."""
        cij, ijc = cls("cij", (channels, kh, kw)), cls("ijc", (kh, kw, channels))
        return cij if col_dilation == 1 and cij.products <= ijc.products else ijc


def plan_tiles(out_channels: int, accumulators: int = 12) -> Tiles:
    """Blocks of 8 channels per tile: the count (<= 6) that pads ``O`` least, the larger on a tie; rows fill
    ``accumulators`` registers (12 of AVX2's 16, 24 of AVX-512's 32), at most ``accumulators // 2`` rows."""
    blocks = math.ceil(out_channels / LANES)
    col_blocks = min(range(1, 7), key=lambda cb: (math.ceil(blocks / cb) * cb, -cb))
    return Tiles(rows=min(accumulators // 2, accumulators // col_blocks), col_blocks=col_blocks)


def pack_conv_weight(w: np.ndarray, layout: Layout, tiles: Tiles) -> np.ndarray:
    """``w[O, C, kh, kw]`` as ``w_packed[jo, r0, r1, r2o, jj, r2i] = w[8 jo + jj, (r0, r1, 4 r2o + r2i)]``, zero
    beyond ``O`` and the last axis."""
    out_channels = w.shape[0]
    blocks = math.ceil(math.ceil(out_channels / LANES) / tiles.col_blocks) * tiles.col_blocks
    ordered = w if layout.order == "cij" else w.transpose(0, 2, 3, 1)  # [O, r0, r1, r2]
    r0, r1, r2 = layout.extents
    padded = np.zeros((blocks * LANES, r0, r1, layout.padded), np.int8)
    padded[:out_channels, :, :, :r2] = ordered
    shaped = padded.reshape(blocks, LANES, r0, r1, layout.padded // REDUCE, REDUCE)
    return np.ascontiguousarray(shaped.transpose(0, 2, 3, 4, 1, 5))


def weight_refusal(w: np.ndarray | None, offset: int = 0) -> str | None:
    """Why ``w`` cannot be packed for the intrinsic (``offset``: 128 for VNNI, 0 for AVX2), or None."""
    if w is None:
        return "the weight is not a constant nor UnpackInt4 of one (it is packed at compile time)"
    if w.dtype != np.int8 or w.ndim != 4:
        return f"the weight must be an int8 [O, C, kh, kw] array, got {w.dtype} {w.shape}"
    if not offset and (w == -128).any():
        return "the weight holds -128: sign(x) * w would wrap (x86_int8 needs w in [-127, 127])"
    return None


@dataclass(frozen=True)
class ConvGemm:
    """What the scheduled kernel is built from: the conv's static facts, read off the converter's PrimFunc."""

    x_shape: tuple  # int where static, None where symbolic
    out_channels: int
    kernel: tuple[int, int]
    config: ConvConfig
    qmin: int
    qmax: int
    m: int | tuple[int, ...]  # an immediate, or the shape of the buffer
    s: int | tuple[int, ...]
    layout: Layout
    tiles: Tiles
    offset: int = 0  # VNNI_OFFSET: x_t holds x + 128 as uint8 for vpdpbusd; 0: int8 x for the AVX2 dot


def _output_pixels(x_shape: tuple, kernel: tuple[int, int], config) -> int | None:
    """``Ho * Wo`` of the conv where the input's H and W are static, else None."""
    height, width = x_shape[2], x_shape[3]
    if height is None or width is None:
        return None
    top, left, bottom, right = config.pads
    ho = (height + top + bottom - config.dilation[0] * (kernel[0] - 1) - 1) // config.stride[0] + 1
    wo = (width + left + right - config.dilation[1] * (kernel[1] - 1) - 1) // config.stride[1] + 1
    return ho * wo


def _static_dims(shape) -> tuple:
    return tuple(int(d) if isinstance(d, tirx.IntImm) else None for d in shape)


def _i64(value: int) -> tirx.IntImm:
    return tirx.IntImm("int64", value)


def conv_gemm_te(conv: ConvGemm) -> tirx.PrimFunc:
    """The unscheduled GEMM form: ``(x, w_packed, b[, m][, s]) -> y[B, O, Ho * Wo]`` (module docstring)."""
    batch, channels, height, width = (
        _i64(v) if v is not None else tirx.Var(name, "int64")
        for v, name in zip(conv.x_shape, ("n", "c", "h", "w"), strict=True)
    )
    kh, kw = conv.kernel
    (sh, sw), (dh, dw) = conv.config.stride, conv.config.dilation
    top, left, bottom, right = conv.config.pads
    layout, tiles = conv.layout, conv.tiles
    r0, r1, r2 = layout.extents
    blocks = math.ceil(math.ceil(conv.out_channels / LANES) / tiles.col_blocks) * tiles.col_blocks
    analyzer = compat.Analyzer()
    out_h = analyzer.simplify(tirx.floordiv(height + top + bottom - dh * (kh - 1) - 1, sh) + 1)
    out_w = analyzer.simplify(tirx.floordiv(width + left + right - dw * (kw - 1) - 1, sw) + 1)
    pixels = analyzer.simplify(out_h * out_w)
    padded_pixels = analyzer.simplify(tirx.floordiv(pixels + tiles.rows - 1, tiles.rows) * tiles.rows)

    x = te.placeholder((batch, channels, height, width), "int8", "x")
    offset = conv.offset
    w_offset = te.placeholder((_i64(conv.out_channels),), "int32", "w_offset") if offset else None
    w = te.placeholder(tuple(map(_i64, (blocks, r0, r1, layout.padded // REDUCE, LANES, REDUCE))), "int8", "w_packed")
    b = te.placeholder((_i64(conv.out_channels),), "int32", "b")
    params = {}
    for name in ("m", "s"):
        value = getattr(conv, name)
        params[name] = value if isinstance(value, int) else te.placeholder(tuple(map(_i64, value)), "int64", name)

    # x_t: the zero-padded input in the reduction's order; the last tap group of ``cij`` may read up to
    # ``padded - kw`` columns past the padded input (multiplied by zero weights), so those are allocated too.
    over = layout.padded - r2 if layout.order == "cij" else 0
    rows_t = analyzer.simplify(height + top + bottom)
    cols_t = analyzer.simplify(width + left + right + over)

    def padded_x(n, c, y, z):
        inside = [y >= top, y < height + top, z >= left, z < width + left]
        if layout.order == "ijc" and layout.padded != r2:
            inside.append(c < channels)
        value = tirx.if_then_else(tirx.all(*inside), x[n, c, y - top, z - left], tirx.const(0, "int8"))
        return (value.astype("int16") + offset).astype("uint8") if offset else value

    if layout.order == "ijc":
        x_t = te.compute(
            (batch, rows_t, cols_t, _i64(layout.padded)), lambda n, y, z, c: padded_x(n, c, y, z), name="x_t"
        )
    elif any(conv.config.pads) or over or offset:
        x_t = te.compute((batch, channels, rows_t, cols_t), padded_x, name="x_t")
    else:
        x_t = x

    def tap(n, p, a0, a1, a2):
        """``x_t`` at output pixel ``p`` (clamped to the last) and reduction index ``(a0, a1, a2)``."""
        pixel = te.min(p, pixels - 1)
        y, z = tirx.floordiv(pixel, out_w) * sh, tirx.floormod(pixel, out_w) * sw
        if layout.order == "ijc":
            return x_t[n, y + a0 * dh, z + a1 * dw, a2]
        return x_t[n, a0, y + a1 * dh, z + a2]

    reduce = [te.reduce_axis((_i64(0), _i64(e)), f"a{k}") for k, e in enumerate((r0, r1, layout.padded // REDUCE))]
    a2i = te.reduce_axis((_i64(0), _i64(REDUCE)), "a2i")
    a0, a1, a2o = reduce
    acc = te.compute(
        (batch, padded_pixels, _i64(blocks), _i64(LANES)),
        lambda n, p, jo, jj: te.sum(
            tap(n, p, a0, a1, a2o * REDUCE + a2i).astype("int32") * w[jo, a0, a1, a2o, jj, a2i].astype("int32"),
            axis=[a0, a1, a2o, a2i],
        ),
        name="acc",
    )

    def epilogue(n, o, p):
        index = (n, o, tirx.floordiv(p, out_w), tirx.floormod(p, out_w))
        total = acc[n, p, tirx.floordiv(o, LANES), tirx.floormod(o, LANES)].astype("int64") + b[o].astype("int64")
        if w_offset is not None:
            total = total + w_offset[o].astype("int64")
        m, s = (tirx.const(v, "int64") if isinstance(v, int) else _read(v, index) for v in params.values())
        return dyadic.requantize(total, m, s, conv.qmin, conv.qmax, "int8")

    y = te.compute((batch, _i64(conv.out_channels), pixels), epilogue, name="epilogue")
    buffers = [t for t in params.values() if not isinstance(t, int)]
    return te.create_prim_func([x, w, *([] if w_offset is None else [w_offset]), b, *buffers, y])


def _read(param: te.Tensor, index: tuple) -> tirx.PrimExpr:
    """``param`` at the 4-D output ``index`` under numpy broadcasting (trailing dims aligned)."""
    shape = [int(d) for d in param.shape]
    tail = index[len(index) - len(shape) :] if shape else ()
    return param[tuple(0 if d == 1 else i for d, i in zip(shape, tail, strict=True))]


def schedule_conv_gemm(func: tirx.PrimFunc, tiles: Tiles, offset: int = 0) -> tirx.PrimFunc:
    """Tile, fuse and tensorize ``conv_gemm_te``'s PrimFunc (see the module docstring)."""
    sch = s_tir.Schedule(func)
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    acc, epilogue = sch.get_sblock("acc"), sch.get_sblock("epilogue")
    if "x_t" in names:
        copy = sch.get_sblock("x_t")
        sch.parallel(sch.fuse(*sch.get_loops(copy)[:2]))
    n, p, jo, jj, a0, a1, a2o, a2i = sch.get_loops(acc)
    p_tile, p_in = sch.split(p, [None, tiles.rows])
    jo_tile, jo_in = sch.split(jo, [None, tiles.col_blocks])
    sch.reorder(n, p_tile, jo_tile, a0, a1, a2o, p_in, jo_in, jj, a2i)
    task = sch.fuse(n, p_tile)
    sch.reverse_compute_at(epilogue, jo_tile)
    sch.parallel(task)
    dot = register_tile(sch, acc, a0, jj, p_in, jo_in)
    # The epilogue's accesses to acc at constant offsets (every loop unrolled but the lanes), so that LLVM keeps
    # the accumulator tile in registers: one access at a variable offset and the tile stays in memory.
    # Vectorized over 8 channels where the pixel count is static; with a symbolic one the rows loop carries a
    # predicate and cannot be moved outside the channels, so both are unrolled (scalar, 15% slower measured).
    e_loops = sch.get_loops(epilogue)
    e_cols, e_rows = e_loops[-2:] if tiles.rows > 1 else (e_loops[-1], None)
    if isinstance(func.params[-1].ty.shape[-1], tirx.IntImm):
        e_blocks, e_lanes = sch.split(e_cols, [None, LANES])
        if e_rows is not None:
            sch.reorder(e_rows, e_blocks, e_lanes)
            sch.unroll(e_rows)
        sch.unroll(e_blocks)
        sch.vectorize(e_lanes)
    else:
        sch.unroll(e_cols)
        if e_rows is not None:
            sch.unroll(e_rows)

    block = sch.get(dot)
    (written,) = [r.source for r in block.writes]
    reads = [r.source for r in block.reads if not r.source.same_as(written)]
    (weights,) = [buf for buf in reads if buf.name == "w_packed"]
    (activations,) = [buf for buf in reads if not buf.same_as(weights)]
    make_impl = dot_8x4_vnni_impl if offset else dot_8x4_impl
    impl = make_impl(*(compat.buffer_scope(buf) for buf in (activations, weights, written)))
    bind = {"A": activations.name, "B": weights.name, "C": written.name}
    return compat.tensorize(sch.mod["main"], block.name_hint, impl, bind)


def _params_of(func: tirx.PrimFunc) -> dict[str, int | tuple[int, ...]]:
    """``m`` and ``s`` of the converter's kernel: the immediate, or the buffer param's static shape."""
    immediates = func.attrs.get(IMMEDIATES_ATTR, {}) if func.attrs else {}
    names = [name for name in IntConv2d.inputs if name not in immediates]
    out = {}
    for name in ("m", "s"):
        if name in immediates:
            out[name] = int(immediates[name])
        else:
            out[name] = tuple(int(d) for d in func.params[names.index(name)].ty.shape)
    return out


def match_conv(func: tirx.PrimFunc, vnni: bool = False) -> ConvGemm | str:
    """The ``ConvGemm`` of a converter's dense conv kernel, or the reason it is not one.

    ``vnni``: plan for ``vpdpbusd`` (the offset input, 24 accumulators) unless the reduction
    ``C kh kw`` exceeds ``MAX_OFFSET_K`` (the offset sum could leave int32).
    """
    op_type = str(func.attrs[OP_ATTR])
    base, qmin, qmax = split_range_suffix(op_type)
    try:
        config = ConvConfig.parse(base)
    except ValueError as err:
        return str(err)
    if config.groups != 1:
        return f"a grouped convolution (groups={config.groups}) is left to the direct schedule"
    x, w = func.params[0], func.params[1]
    out_channels, channels, kh, kw = (int(d) for d in w.ty.shape)
    if _output_pixels(_static_dims(x.ty.shape), (kh, kw), config) == 1:
        # a squeeze-and-excitation fc on a pooled [B, C, 1, 1]: one pixel leaves the row tiles nothing to span
        return "a single output pixel (a matrix-vector product) is left to the direct schedule"
    params = _params_of(func)
    offset = VNNI_OFFSET if vnni and channels * kh * kw <= MAX_OFFSET_K else 0
    return ConvGemm(
        x_shape=_static_dims(x.ty.shape),
        out_channels=out_channels,
        kernel=(kh, kw),
        config=config,
        qmin=-128 if qmin is None else qmin,
        qmax=127 if qmax is None else qmax,
        m=params["m"],
        s=params["s"],
        layout=Layout.choose(channels, kh, kw, config.dilation[1]),
        tiles=plan_tiles(out_channels, 24 if offset else 12),
        offset=offset,
    )


def rewrite_conv_call(call) -> relax.Expr | str:
    """The scheduled replacement of ``call`` (a ``schedules.KernelCall``), or the reason it does not apply."""
    if not compat.tvm.target.codegen.target_has_features("avx2", call.target):
        return f"the target {call.target.export().get('mcpu', '')!r} has no AVX2"
    key = ("conv", call.name)
    if key not in call.memo:
        conv = match_conv(call.func, has_vnni(call.target))
        call.memo[key] = (
            conv if isinstance(conv, str) else (conv, schedule_conv_gemm(conv_gemm_te(conv), conv.tiles, conv.offset))
        )
    if isinstance(call.memo[key], str):
        return call.memo[key]
    conv, scheduled = call.memo[key]
    int4 = call.int4[1] if call.int4 else None
    w = call.constants[1] if int4 is None else int4
    refusal = weight_refusal(w, conv.offset)
    if refusal:
        return refusal
    operands = kernel_operands(call.func, call.call, IntConv2d.inputs)
    if operands is None:
        return "the kernel's arguments are not the op's inputs"
    bb = call.builder
    packed = pack_conv_weight(w, conv.layout, conv.tiles)
    if int4 is not None:
        w_packed = bb.emit(emit_unpack_int4(bb, relax.const(pack_int4(packed)), packed.shape, "UnpackInt4"))
    else:
        w_packed = relax.const(packed)
    args = [operands["x"], w_packed]
    if conv.offset:  # -offset * sum over the reduction of w: turns sum (x + offset) w back into sum x w
        args.append(relax.const((-conv.offset * w.astype(np.int64).sum(axis=(1, 2, 3))).astype(np.int32)))
    args.append(operands["b"])
    args += [operands[name] for name in ("m", "s") if not isinstance(operands[name], int)]
    gv_key = ("conv_gv", call.name)
    name = VNNI_SCHEDULE_NAME if conv.offset else SCHEDULE_NAME
    if gv_key not in call.memo:
        attrs = {
            "intq.scheduled_op": str(call.func.attrs[OP_ATTR]),
            "intq.schedule": name,
            "op_pattern": 8,  # kOpaque: TVM's FuseOps must not merge the scheduled kernel into another
            "tirx.is_scheduled": True,
        }
        func = scheduled.without_attr("global_symbol").with_attrs(attrs)
        call.memo[gv_key] = bb.add_func(func, f"{call.name}_{name}")
    out_shape = list(tensor_type(call.call).shape.values)
    flat = [out_shape[0], out_shape[1], out_shape[2] * out_shape[3]]
    y = bb.emit(relax.call_tir(call.memo[gv_key], relax.Tuple(args), relax.TensorType(flat, "int8")))
    return bb.emit(relax.op.reshape(y, out_shape))


# --- the direct schedule ---------------------------------------------------------------------------


def schedule_direct(sch: s_tir.Schedule) -> None:
    """Planes ``(n, o)`` in parallel; the padded input plane and each output row's ``acc`` computed at them."""
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    out, acc = sch.get_sblock("requantize"), sch.get_sblock("acc")
    n, o, row, _ = sch.get_loops(out)
    plane = sch.fuse(n, o)
    sch.parallel(plane)
    sch.compute_at(acc, row)
    if "pad" in names:
        groups = ConvConfig.parse(split_range_suffix(str(sch.mod["main"].attrs[OP_ATTR]))[0]).groups
        pad = sch.get_sblock("pad")
        if groups > 1:  # the plane of one group's channels; with one group, every o would pad all of x again
            sch.compute_at(pad, plane)
        else:
            sch.parallel(sch.fuse(*sch.get_loops(pad)[:2]))
