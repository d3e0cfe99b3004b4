"""TVM lowering of ``intq.IntConv2d_*`` (spec: ``quantizer/ops/conv.py``).

    acc[n, o, h, w] = sum_{c, i, j} xpad[n, g(o)*Cg + c, h*sh + i*dh, w*sw + j*dw] * wt[o, c, i, j]   (int32)
    y               = clamp(((acc + b[o]) * m[o] + 2**(s[o]-1)) >> s[o], qmin, qmax)             (int8)

``x``: int8 NCHW ``[B, C, H, W]`` (any dim but ``C`` may be symbolic);
``wt``: int8 ``[O, Cg, kh, kw]`` with ``Cg = C / groups``; ``b``: int32
``[O]``; ``m``, ``s``: int64 ``[O, 1, 1]`` (per output channel) or scalars.
``xpad`` is ``x`` zero-padded by ``(top, left, bottom, right)``, a ``pad``
block of the same PrimFunc (absent without padding).  Products are widened to
int32 and summed in an int32 accumulator, exact by the constructor's bound
``Cg * kh * kw * 2**14 + max|b| < 2**31``; as in the ONNX function the bias
is added after widening to int64.  So no ``uint8`` offset: the ONNX body's
``+128`` / zero-point detour exists only because onnxruntime's
``ConvInteger`` takes uint8, and it cancels exactly.

The configuration is not an attribute: every distinct one is its own ONNX
function, named ``IntConv2d_s<sh>x<sw>_p<top>x<left>x<bottom>x<right>_d<dh>x<dw>_g<groups>``.
``IntConv2d`` declares ``configured_by_name``, so ``onnx_import`` routes
every ``IntConv2d_<config>`` node to a subclass whose ``op_type`` is that
name; ``convert`` parses it and refuses, naming the node, one that does not
parse or does not fit the operands.  ``[qmin, qmax]`` is ``[-128, 127]``, or
the range of a clamp suffix after the configuration
(``IntConv2d_s1x1_p1x1x1x1_d1x1_g1_c0x15``: a fused ReLU into 4 bits).

The kernel is tagged ``intq.op`` (the node's op type, configuration and
range included) with ``m``, ``s`` as ``intq.immediates`` when baked in, so
the schedules (``passes/schedules/conv.py``) can rebuild it from its
operands; the pad, reduction and requantize blocks are named ``pad``,
``acc``, ``requantize``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from intq.passes.compat import Analyzer, relax, te, tirx
from intq.passes.ops import dyadic
from intq.passes.ops.base import (
    IntqConverter,
    Operand,
    check_trailing_broadcast,
    dtype_of,
    kernel_attrs,
    param_operand,
    read_param,
    split_range_suffix,
    static_shape,
)

FAMILY = "IntConv2d"
_NAME = re.compile(rf"{FAMILY}_s(\d+)x(\d+)_p(\d+)x(\d+)x(\d+)x(\d+)_d(\d+)x(\d+)_g(\d+)")


@dataclass(frozen=True)
class ConvConfig:
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    groups: int

    @classmethod
    def parse(cls, op_type: str) -> ConvConfig:
        """The configuration encoded in ``op_type``; ``ValueError`` saying what is wrong."""
        match = _NAME.fullmatch(op_type)
        if match is None:
            raise ValueError(
                f"op type {op_type!r} does not encode a convolution as "
                f"{FAMILY}_s<sh>x<sw>_p<top>x<left>x<bottom>x<right>_d<dh>x<dw>_g<groups>: re-export the model"
            )
        v = [int(g) for g in match.groups()]
        config = cls(stride=(v[0], v[1]), pads=(v[2], v[3], v[4], v[5]), dilation=(v[6], v[7]), groups=v[8])
        if min(*config.stride, *config.dilation, config.groups) < 1:
            raise ValueError(f"op type {op_type!r}: stride, dilation and groups must be >= 1")
        return config


def conv2d_te(
    x: te.Tensor,
    wt: te.Tensor,
    b: te.Tensor,
    m: Operand,
    s: Operand,
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
    qmin: int = -128,
    qmax: int = 127,
) -> te.Tensor:
    """The whole op; the configuration as plain ints, which ``call_te`` passes through."""
    batch, channels, height, width = x.shape
    out_channels, per_group, kh, kw = (int(d) for d in wt.shape)
    (sh, sw), (dh, dw) = stride, dilation
    top, left, bottom, right = pads
    zero = tirx.const(0, "int8")
    xpad = x
    if any(pads):

        def pad(n, c, y, z):
            inside = tirx.all(y >= top, y < height + top, z >= left, z < width + left)
            return tirx.if_then_else(inside, x[n, c, y - top, z - left], zero)

        xpad = te.compute((batch, channels, height + top + bottom, width + left + right), pad, name="pad")
    analyzer = Analyzer()  # symbolic H, W: keep the output dims in a form later shape checks can compare
    out_h = analyzer.simplify(tirx.floordiv(xpad.shape[2] - dh * (kh - 1) - 1, sh) + 1)
    out_w = analyzer.simplify(tirx.floordiv(xpad.shape[3] - dw * (kw - 1) - 1, sw) + 1)
    per_out_group = out_channels // groups
    rc = te.reduce_axis((0, per_group), name="rc")
    ri = te.reduce_axis((0, kh), name="ri")
    rj = te.reduce_axis((0, kw), name="rj")

    def conv(n, o, y, z):
        c = tirx.floordiv(o, per_out_group) * per_group + rc
        pixel = xpad[n, c, y * sh + ri * dh, z * sw + rj * dw].astype("int32")
        return te.sum(pixel * wt[o, rc, ri, rj].astype("int32"), axis=[rc, ri, rj])

    acc = te.compute((batch, out_channels, out_h, out_w), conv, name="acc")

    def epilogue(*i):
        total = acc[i].astype("int64") + b[i[1]].astype("int64")
        return dyadic.requantize(total, read_param(m, i), read_param(s, i), qmin, qmax, "int8")

    return te.compute(acc.shape, epilogue, name="requantize")


class IntConv2d(IntqConverter):
    op_type = FAMILY
    inputs = ("x", "w", "b", "m", "s")
    ranged_dtype = "int8"
    #: node op types are ``IntConv2d_<config>``; ``onnx_import`` binds ``op_type`` to the node's.
    configured_by_name: ClassVar[bool] = True

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr]) -> relax.Expr:
        try:
            config = ConvConfig.parse(split_range_suffix(cls.op_type)[0])
        except ValueError as err:
            raise cls.fail(node, str(err)) from None
        qmin, qmax, _ = cls.output_range(node)
        out_shape = cls.check_operands(node, args, config)
        for name in ("m", "s"):
            check_trailing_broadcast(cls, node, name, args[name], out_shape)
        m, s = param_operand(args["m"]), param_operand(args["s"])
        return bb.call_te(
            conv2d_te,
            args["x"],
            args["w"],
            args["b"],
            m,
            s,
            config.stride,
            config.pads,
            config.dilation,
            config.groups,
            qmin,
            qmax,
            primfunc_name_hint="intq_conv2d",
            primfunc_attrs=kernel_attrs(cls.op_type, m=m, s=s),
        )

    @classmethod
    def check_operands(cls, node: str, args: dict[str, relax.Expr], config: ConvConfig) -> list[int | None]:
        """Check dtypes and shapes against ``config``; return the static output shape (None where symbolic)."""
        for name, expected in (("x", "int8"), ("w", "int8"), ("b", "int32")):
            if dtype_of(args[name]) != expected:
                raise cls.fail(node, f"{name} must be {expected}, got {dtype_of(args[name])}")
        x_shape, w_shape = static_shape(args["x"]), static_shape(args["w"])
        if len(w_shape) != 4 or None in w_shape:
            raise cls.fail(node, f"w must be a static [O, C/groups, kh, kw] tensor, got shape {w_shape}")
        out_channels, per_group, kh, kw = w_shape
        if len(x_shape) != 4 or x_shape[1] != per_group * config.groups:
            raise cls.fail(
                node,
                f"x must be NCHW with a static C = {per_group * config.groups} "
                f"(w's {per_group} per group x {config.groups} groups), got shape {x_shape}",
            )
        if out_channels % config.groups:
            raise cls.fail(node, f"groups={config.groups} does not divide the {out_channels} output channels")
        if static_shape(args["b"]) != [out_channels]:
            raise cls.fail(node, f"b must have shape [{out_channels}], got {static_shape(args['b'])}")
        top, left, bottom, right = config.pads
        out_hw = []
        for size, lo, hi, k, st, dil in (
            (x_shape[2], top, bottom, kh, config.stride[0], config.dilation[0]),
            (x_shape[3], left, right, kw, config.stride[1], config.dilation[1]),
        ):
            if size is None:
                out_hw.append(None)
                continue
            span = size + lo + hi - dil * (k - 1) - 1
            if span < 0:
                raise cls.fail(node, f"the padded input {x_shape} is smaller than the dilated {kh}x{kw} kernel")
            out_hw.append(span // st + 1)
        return [x_shape[0], out_channels, *out_hw]
