"""Requantize: int32 / int16 / int8 -> int8 by a dyadic multiplier.

    y = clamp((x * m + 2**(s-1)) >> s, qmin, qmax)       (int8)

``x``: any integer tensor with ``|x| < 2**31``; ``m``: int64, scalar or a
vector broadcast along the last axis, ``|m| < 2**25``; ``s``: int64 in
``[1, 62]``, same shape as ``m``.  Bound: ``|x*m| < 2**56``, inside the
``2**62`` margin of ``dyadic``.  Rounding is half up (see ``dyadic``).
The float meaning: ``y ~= round(x * S_in / S_out)`` with ``m / 2**s ~=
S_in / S_out``.

``[qmin, qmax]`` is the clamp range, ``[-128, 127]`` by default; any other
range inside int8 (a 4-bit activation ``[-8, 7]``, an unsigned one after a
fused ReLU ``[0, 15]`` or ``[0, 127]``, see ``base.activation_range``) is
part of the op type: ``Requantize_c0x15``.
"""

from __future__ import annotations

import torch

from intq.quantizer.ops.base import IntegerOp, as_buffer, check_range, class_or_instance_method, range_suffix
from intq.quantizer.ops.dyadic import dyadic, requantize
from intq.quantizer.ops.onnx_fn import FunctionBuilder


class Requantize(IntegerOp):
    op_type = "Requantize"
    data_inputs = ("x",)
    param_names = ("m", "s")
    output_dtype = torch.int8
    qmin, qmax = -128, 127

    def __init__(self, ratio, qmin: int = -128, qmax: int = 127):
        super().__init__()
        self.qmin, self.qmax = check_range(qmin, qmax, -128, 127, type(self).op_type)
        self.op_type = type(self).op_type + range_suffix(self.qmin, self.qmax)
        m, s = dyadic(ratio)
        self.register_buffer("m", as_buffer(m, torch.int64))
        self.register_buffer("s", as_buffer(s, torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return requantize(x, self.m, self.s, self.qmin, self.qmax).to(self.output_dtype)

    @class_or_instance_method
    def function_proto(self):
        b = FunctionBuilder(self.op_type, ["x", "m", "s"], doc=__doc__)
        b.requantize(b.cast("x", "int64"), "m", "s", self.qmin, self.qmax, "int8", out="y")
        return b.build()
