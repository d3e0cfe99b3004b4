"""Integer 2-D convolution, NCHW, requantized per output channel to int8.

    acc[n, o] = sum_{c, i, j} xpad[n, g(o)*Cg + c, h*sh + i*dh, w*sw + j*dw] * w[o, c, i, j] + b[o]   (int32)
    y         = clamp((acc * m[o] + 2**(s[o]-1)) >> s[o], qmin, qmax)                               (int8)

- ``x``: int8 ``[B, C, H, W]``; ``w``: int8 ``[O, C/groups, kh, kw]``
  (``weight_bits=4``: values in ``[-8, 7]``, stored packed as ONNX INT4 and
  cast to int8 in front of the function, see ``base.packed_int4``);
  ``b``: int32 ``[O]``; ``m``, ``s``: int64 ``[O, 1, 1]`` (per output
  channel, broadcast along axis 1), ``(m, s) = dyadic(ratio)``.  ``xpad`` is
  ``x`` zero-padded by ``padding = (top, left, bottom, right)``.
- Accumulator bound: with ``K = C/groups * kh * kw``, ``|acc| <= K * 2**14 +
  max|b| < 2**31``, checked in the constructor (``K <= 131071`` without
  bias; a 16x16 patch embedding of 3 channels has ``K = 768``).
- Requantize margin: ``|acc * m| + 2**(s-1) < 2**62``, checked likewise.
- Clamp: ``[qmin, qmax]``, ``[-128, 127]`` by default; another range inside
  int8 (a 4-bit activation, or a fused ReLU: ``base.activation_range``)
  appends ``range_suffix`` to the op type.
- Rounding: half up, once.  Float meaning: with ``v = acc * ratio[o]``,
  ``|y - clip(v, qmin, qmax)| <= 1/2 + |v| * 2**-24``.
- Torch emulation: ``F.pad`` then ``F.conv2d`` in float64 on the integer
  values: every partial sum is an integer of magnitude ``< 2**31 < 2**53``,
  so the result is exact whatever the summation order.
- ONNX body: onnxruntime's ``ConvInteger`` takes uint8 x uint8 only, so the
  int8 input is first zero-padded by an explicit ``Pad`` (a padded cell must
  mean 0, not the zero point), then both operands are offset by +128 into
  uint8 and passed with ``x_zero_point = w_zero_point = 128``:
  ``sum (x+128-128) * (w+128-128)`` is the signed sum, int32, exact by the
  bound.  Then ``Cast`` to int64, ``Add`` the bias (reshaped ``[O, 1, 1]``),
  ``FunctionBuilder.requantize``.

Stride, padding, dilation and groups are ``ConvInteger`` attributes, fixed
per instance; rather than ONNX function attributes, each distinct
configuration gets its own function, named after it, e.g.
``IntConv2d_s2x2_p0x0x1x1_d1x1_g1`` (``..._g1_c0x15`` with a clamp).  So ``op_type`` is an instance
attribute (the class attribute ``op_type = "IntConv2d"`` names the family)
and ``function_proto`` is an instance method.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto

from intq.quantizer.ops.base import IntegerOp, as_buffer, check_range, range_suffix
from intq.quantizer.ops.dyadic import dyadic, requantize
from intq.quantizer.ops.linear import (
    accumulator_bound,
    channel_ratio,
    check_requantize_margin,
    int_array,
    weight_range,
)
from intq.quantizer.ops.onnx_fn import FunctionBuilder

UINT8_OFFSET = 128  # int8 + 128 is uint8; ConvInteger subtracts it back as the zero point


def _pair(value, name: str, where: str, minimum: int) -> tuple[int, int]:
    pair = (value, value) if np.ndim(value) == 0 else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < minimum for v in pair):
        raise ValueError(f"{where}: {name} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _pads(padding, where: str) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` from an int, a symmetric ``(ph, pw)`` or a 4-tuple."""
    if np.ndim(padding) == 0 or len(padding) == 2:
        ph, pw = _pair(padding, "padding", where, 0)
        return ph, pw, ph, pw
    pads = tuple(padding)
    if len(pads) != 4 or any(int(v) != v or v < 0 for v in pads):
        raise ValueError(
            f"{where}: padding must be an int, (ph, pw) or (top, left, bottom, right) of ints >= 0, got {padding!r}"
        )
    return tuple(int(v) for v in pads)


class IntConv2d(IntegerOp):
    op_type = "IntConv2d"
    data_inputs = ("x",)
    param_names = ("w", "b", "m", "s")
    output_dtype = torch.int8
    qmin, qmax = -128, 127

    def __init__(
        self,
        weight,
        bias,
        ratio,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        qmin: int = -128,
        qmax: int = 127,
        weight_bits: int = 8,
    ):
        super().__init__()
        where = type(self).op_type
        self.qmin, self.qmax = check_range(qmin, qmax, -128, 127, where)
        w = int_array(weight, *weight_range(weight_bits, where), "weight", where)
        if w.ndim != 4 or w.size == 0:
            raise ValueError(f"{where}: weight must be a non-empty [O, C/groups, kh, kw] array, got shape {w.shape}")
        out_channels, in_per_group, kh, kw = w.shape
        if int(groups) != groups or groups < 1 or out_channels % groups:
            raise ValueError(f"{where}: groups={groups!r} must be a positive int dividing O={out_channels}")
        b = np.zeros(out_channels, np.int64) if bias is None else int_array(bias, -(2**31), 2**31 - 1, "bias", where)
        if b.shape != (out_channels,):
            raise ValueError(f"{where}: bias must have shape [{out_channels}] (one per output channel), got {b.shape}")
        acc_bound = accumulator_bound(in_per_group * kh * kw, b, where)
        m, s = dyadic(channel_ratio(ratio, out_channels, where))
        check_requantize_margin(acc_bound, m, s, where)

        self.stride = _pair(stride, "stride", where, 1)
        self.padding = _pads(padding, where)
        self.dilation = _pair(dilation, "dilation", where, 1)
        self.groups = int(groups)
        self.op_type = (
            f"{where}_s{self.stride[0]}x{self.stride[1]}_p{'x'.join(map(str, self.padding))}"
            f"_d{self.dilation[0]}x{self.dilation[1]}_g{self.groups}" + range_suffix(self.qmin, self.qmax)
        )
        self.packed_int4 = frozenset({"w"}) if weight_bits == 4 else frozenset()
        self.register_buffer("w", as_buffer(w, torch.int8))
        self.register_buffer("b", as_buffer(b, torch.int32))
        self.register_buffer("m", as_buffer(m.reshape(-1, 1, 1), torch.int64))
        self.register_buffer("s", as_buffer(s.reshape(-1, 1, 1), torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, left, bottom, right = self.padding
        xpad = F.pad(x.to(torch.float64), (left, right, top, bottom))
        acc = F.conv2d(
            xpad, self.w.to(torch.float64), stride=self.stride, dilation=self.dilation, groups=self.groups
        ).to(torch.int64)
        acc = acc + self.b.view(-1, 1, 1)
        return requantize(acc, self.m, self.s, self.qmin, self.qmax).to(self.output_dtype)

    def function_proto(self) -> onnx.FunctionProto:
        fb = FunctionBuilder(self.op_type, ["x", "w", "b", "m", "s"], doc=__doc__)
        x = "x"
        if any(self.padding):
            top, left, bottom, right = self.padding
            x = fb.op("Pad", x, fb.const([0, 0, top, left, 0, 0, bottom, right], "int64", "pads"), fb.const(0, "int8"))
        offset = fb.const(UINT8_OFFSET, "int16", "offset_i16")
        zero_point = fb.const(UINT8_OFFSET, "uint8", "zero_point")

        def to_uint8(t: str) -> str:
            return fb.op("Cast", fb.op("Add", fb.cast(t, "int16"), offset), to=TensorProto.UINT8)

        acc = fb.op(
            "ConvInteger",
            to_uint8(x),
            to_uint8("w"),
            zero_point,
            zero_point,
            strides=list(self.stride),
            dilations=list(self.dilation),
            group=self.groups,
        )
        bias = fb.op("Reshape", fb.cast("b", "int64"), fb.const([-1, 1, 1], "int64", "bias_shape"))
        fb.requantize(fb.op("Add", fb.cast(acc, "int64"), bias), "m", "s", self.qmin, self.qmax, "int8", out="y")
        return fb.build()
