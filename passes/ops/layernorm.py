"""TVM lowering of ``intq.ILayerNorm`` (spec: ``quantizer/ops/layernorm.py``).

Over the last axis of ``x`` (int16 or int8, ``[..., C]``, leading dims may be
symbolic, ``C`` static), with ``K = 36``, ``OFF = 2**32``, per row::

    sum_x  = sum(x)                                        int64
    mean   = (sum_x + C//2 + C*OFF) // C - OFF             rounded mean, half up
    sum_sq = sum((x - mean)**2)
    std    = isqrt(sum_sq + E)                             24 Newton steps (see isqrt)
    factor = 2**K // std
    out_c  = clamp(((x_c - mean) * factor * m_c + bias_c + 2**(s_c-1)) >> s_c, -128, 127)   int8

``E`` is one element (baked into the kernel when it is a constant); ``m``,
``bias``, ``s`` are int64 and broadcast along the last axis (``[C]``, one per
channel, also when the output scale is per channel; a single element is an
immediate).  All arithmetic is int64.  The divisions have non-negative
operands (``sum_x + C*OFF > 0`` because ``|sum_x| <= C * 2**15 < OFF``;
``std >= 1``), so they are emitted as ``truncdiv``: ONNX ``Div``, and cheaper
than TIR's ``floordiv``; the division by the static ``C`` becomes a
multiplication in LLVM.  The final ``>>`` is the arithmetic shift, equal to
the ONNX function's unsigned-offset ``floor_shift`` because the spec keeps the
accumulator below ``2**62`` in magnitude.

One PrimFunc per node.  Its stages: two row reductions (``sum_x``,
``sum_sq``), the per-row scalars (``mean``, ``var``, 24 Newton steps,
``factor``), and the elementwise requantize.  The per-row stages keep the
trailing axis with extent 1 (ONNX's ``keepdims=1``).
"""

from __future__ import annotations

from intq.passes.compat import relax, te, tirx
from intq.passes.ops import dyadic
from intq.passes.ops.base import (
    IntqConverter,
    Operand,
    check_trailing_broadcast,
    dtype_of,
    kernel_attrs,
    param_operand,
    read_param,
    static_shape,
)
from intq.passes.ops.isqrt import isqrt_te

K = 36  # quantizer.ops.layernorm.K
OFF = 1 << 32  # quantizer.ops.layernorm.OFF
MAX_CHANNELS = 4096  # quantizer.ops.layernorm.MAX_CHANNELS: the int64 bounds hold up to here
E_MAX = 1 << 46  # quantizer.ops.layernorm.E_MAX: keeps var < 2**48, isqrt's domain
QMIN, QMAX = -128, 127


def _i64(value: int) -> tirx.PrimExpr:
    return tirx.const(value, "int64")


def layernorm_te(x: te.Tensor, e: Operand, m: Operand, bias: Operand, s: Operand) -> te.Tensor:
    channels = int(x.shape[-1])
    rows = (*x.shape[:-1], 1)

    def row_sum(body, name):
        c = te.reduce_axis((0, channels), name="c")
        return te.compute(rows, lambda *r: te.sum(body(r[:-1], c), axis=c), name=name)

    sum_x = row_sum(lambda r, c: x[(*r, c)].astype("int64"), "sum_x")

    def mean_body(*r):
        numerator = sum_x[r] + _i64(channels // 2 + channels * OFF)
        return tirx.truncdiv(numerator, _i64(channels)) - _i64(OFF)

    mean = te.compute(rows, mean_body, name="mean")

    def centered(r, c):
        return x[(*r, c)].astype("int64") - mean[(*r, 0)]

    sum_sq = row_sum(lambda r, c: centered(r, c) * centered(r, c), "sum_sq")
    var = te.compute(rows, lambda *r: sum_sq[r] + read_param(e, r), name="var")
    std = isqrt_te(var)
    factor = te.compute(rows, lambda *r: tirx.truncdiv(_i64(1 << K), std[r]), name="factor")

    def out_body(*i):
        row = (*i[:-1], 0)
        s_i = read_param(s, i)
        product = (x[i].astype("int64") - mean[row]) * factor[row] * read_param(m, i)
        acc = product + read_param(bias, i) + (_i64(1) << (s_i - _i64(1)))
        return dyadic.clamp(acc >> s_i, QMIN, QMAX).astype("int8")

    return te.compute(x.shape, out_body, name="layernorm")


class ILayerNorm(IntqConverter):
    op_type = "ILayerNorm"
    inputs = ("x", "E", "m", "bias", "s")

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr]) -> relax.Expr:
        x = args["x"]
        if dtype_of(x) not in ("int8", "int16"):
            raise cls.fail(node, f"x must be int8 or int16 (the spec's |x| <= 2**15), got {dtype_of(x)}")
        for name in ("E", "m", "bias", "s"):
            if dtype_of(args[name]) != "int64":
                raise cls.fail(node, f"param {name!r} must be int64, got {dtype_of(args[name])}")
        x_shape = static_shape(x)
        if not x_shape or x_shape[-1] is None or not 1 <= x_shape[-1] <= MAX_CHANNELS:
            raise cls.fail(
                node, f"x must have a static last dim C in [1, {MAX_CHANNELS}] (the channels), got shape {x_shape}"
            )
        e_shape = static_shape(args["E"])
        if None in e_shape or len(e_shape) > len(x_shape) or any(d != 1 for d in e_shape):
            raise cls.fail(node, f"param 'E' must hold one element, got shape {e_shape}")
        e = param_operand(args["E"])
        if isinstance(e, int) and not 0 <= e <= E_MAX:
            raise cls.fail(node, f"E = {e} is outside [0, 2**46], where var stays in isqrt's domain; re-export")
        for name in ("m", "bias", "s"):
            check_trailing_broadcast(cls, node, name, args[name], x_shape)
        return bb.call_te(
            layernorm_te,
            x,
            e,
            param_operand(args["m"]),
            param_operand(args["bias"]),
            param_operand(args["s"]),
            primfunc_name_hint="intq_layernorm",
            primfunc_attrs=kernel_attrs(cls.op_type),
        )
