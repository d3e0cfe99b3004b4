"""IntMul: the product of two integer activations, requantized by one dyadic multiplier.

    y = clamp((int64(a) * int64(b) * m + 2**(s-1)) >> s, qmin, qmax)        (int8)

``a``, ``b``: int8 or int16 (independently), broadcast as in numpy (a
squeeze-and-excitation gate ``[B, C, 1, 1]`` onto ``[B, C, H, W]``; a
gated unit's two halves); either may be a constant, quantized at its own
scale.  ``(m, s) = dyadic(S_a * S_b / S_y)``, one pair for the tensor.
Bounds: ``|a * b| <= 2**30``, ``|m| < 2**24``, so ``|a * b * m| + 2**(s-1)
< 2**62``, ``dyadic``'s margin.  Rounding half up, once.  Float meaning:
``y ~= round(a S_a * b S_b / S_y)``.

``[qmin, qmax]``: ``[-128, 127]`` by default; another range inside int8 (a
fused clamp, an unsigned product of two unsigned operands) names the op
``IntMul_c0x127`` (``base.range_suffix``).
"""

from __future__ import annotations

import numpy as np
import torch

from intq.quantizer.ops.base import IntegerOp, as_buffer, check_range, class_or_instance_method, range_suffix
from intq.quantizer.ops.dyadic import dyadic, requantize
from intq.quantizer.ops.onnx_fn import FunctionBuilder


class IntMul(IntegerOp):
    op_type = "IntMul"
    data_inputs = ("a", "b")
    param_names = ("m", "s")
    output_dtype = torch.int8
    qmin, qmax = -128, 127

    def __init__(self, ratio: float, qmin: int = -128, qmax: int = 127):
        super().__init__()
        r = np.asarray(ratio, dtype=np.float64)
        if r.size != 1 or not np.isfinite(r).all() or not 0 < float(r) < 2**23:
            raise ValueError(
                f"IntMul: the scale ratio S_a * S_b / S_y must be one positive number below 2**23, got {r}"
            )
        self.qmin, self.qmax = check_range(qmin, qmax, -128, 127, type(self).op_type)
        self.op_type = type(self).op_type + range_suffix(self.qmin, self.qmax)
        m, s = dyadic(float(r))
        self.register_buffer("m", as_buffer(m, torch.int64))
        self.register_buffer("s", as_buffer(s, torch.int64))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        product = a.to(torch.int64) * b.to(torch.int64)
        return requantize(product, self.m, self.s, self.qmin, self.qmax).to(self.output_dtype)

    @class_or_instance_method
    def function_proto(self):
        fb = FunctionBuilder(self.op_type, ["a", "b", "m", "s"], doc=__doc__)
        product = fb.op("Mul", fb.cast("a", "int64"), fb.cast("b", "int64"))
        fb.requantize(product, "m", "s", self.qmin, self.qmax, "int8", out="y")
        return fb.build()
