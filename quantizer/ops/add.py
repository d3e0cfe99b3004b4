"""Integer residual add: into the int16 residual stream, or an int8 activation.

    y = clamp((a * m_a + b * m_b + 2**(s-1)) >> s, qmin, qmax)

- Default range ``[-32768, 32767]``: op type ``IntAdd``, int16 output (the
  transformer residual stream, as I-ViT).  Any other range must lie inside
  int8: the output is int8 and the op type carries the range,
  ``IntAdd_c0x127`` (``base.range_suffix``): HAWQV3's CNN residual, both
  branches requantized by one shared shift with the following ReLU fused as
  the clamp (``[0, 127]`` at 8 bits, ``[0, 15]`` at 4).

- ``a``, ``b``: int8 or int16 tensors (either, independently), broadcast as
  in numpy.  ``m_a``, ``m_b``, ``s``: int64 scalars from ``dyadic([ratio_a,
  ratio_b], shared_shift=True)`` with ``ratio_a = S_a / S_y``, ``ratio_b =
  S_b / S_y``: ONE shift, chosen for the larger ratio, so both products sit on
  the same fixed-point grid and the sum is rounded once (the smaller ratio
  keeps fewer than 24 significant bits; its absolute error is still at most
  ``2**-(s+1)``).
- Bound: ``|a|, |b| <= 2**15``, so ``|a*m_a + b*m_b| <= 2**15 * (|m_a| +
  |m_b|)``, at most ``2**40`` for ratios below ``2**23``; the constructor
  checks the requantize margin ``2**15 * (|m_a| + |m_b|) + 2**(s-1) < 2**62``.
- Rounding: half up, once, on the exact sum.  Float meaning: with ``v = a *
  ratio_a + b * ratio_b``, ``|y - clip(v, qmin, qmax)| <= 1/2 + (|a| +
  |b|) * max(|ratio_a|, |ratio_b|) * 2**-24``.
- Torch emulation and ONNX body: the int64 sum ``a*m_a + b*m_b``, then the
  shared requantize primitive with multiplier 1 and shift ``s``
  (``dyadic.requantize`` / ``FunctionBuilder.requantize``).
"""

from __future__ import annotations

import numpy as np
import torch

from intq.quantizer.ops.base import IntegerOp, as_buffer, check_range, class_or_instance_method, range_suffix
from intq.quantizer.ops.dyadic import dyadic, requantize
from intq.quantizer.ops.linear import check_requantize_margin
from intq.quantizer.ops.onnx_fn import FunctionBuilder

INPUT_BOUND = 1 << 15  # the largest |a|, |b| for int8 / int16 inputs
_INPUT_DTYPES = (torch.int8, torch.int16)


class IntAdd(IntegerOp):
    op_type = "IntAdd"
    data_inputs = ("a", "b")
    param_names = ("m_a", "m_b", "s")
    output_dtype = torch.int16
    qmin, qmax = -32768, 32767

    def __init__(self, ratio_a, ratio_b, qmin: int = -32768, qmax: int = 32767):
        super().__init__()
        family = type(self).op_type
        if (qmin, qmax) != (type(self).qmin, type(self).qmax):
            self.qmin, self.qmax = check_range(qmin, qmax, -128, 127, family)
            self.output_dtype = torch.int8
            self.op_type = family + range_suffix(self.qmin, self.qmax, default=(type(self).qmin, type(self).qmax))
        ra = np.asarray(ratio_a, dtype=np.float64)
        rb = np.asarray(ratio_b, dtype=np.float64)
        if ra.ndim > 1 or rb.ndim > 1:
            raise ValueError(f"{self.op_type}: a ratio is a scalar or one value per last-axis channel")
        # one shift for every multiplier of both inputs, so the sum is rounded once
        m, s = dyadic(np.concatenate([ra.reshape(-1), rb.reshape(-1)]), shared_shift=True)
        m_a, m_b = m[: ra.size].reshape(ra.shape), m[ra.size :].reshape(rb.shape)
        # The margin is on the sum, so the bound is 2**15 * (max|m_a| + max|m_b|), taken as acc_bound * 1.
        worst = int(np.abs(m_a).max()) + int(np.abs(m_b).max())
        check_requantize_margin(INPUT_BOUND * worst, np.int64(1), s, self.op_type)
        self.register_buffer("m_a", as_buffer(m_a, torch.int64))
        self.register_buffer("m_b", as_buffer(m_b, torch.int64))
        self.register_buffer("s", as_buffer(s[0], torch.int64))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        for name, t in (("a", a), ("b", b)):
            if t.dtype not in _INPUT_DTYPES:
                raise ValueError(f"{self.op_type}: input {name} must be int8 or int16, got {t.dtype}")
        total = a.to(torch.int64) * self.m_a + b.to(torch.int64) * self.m_b
        return requantize(total, torch.ones_like(self.s), self.s, self.qmin, self.qmax).to(self.output_dtype)

    @class_or_instance_method
    def function_proto(self):
        fb = FunctionBuilder(self.op_type, ["a", "b", "m_a", "m_b", "s"], doc=__doc__)
        total = fb.op("Add", fb.op("Mul", fb.cast("a", "int64"), "m_a"), fb.op("Mul", fb.cast("b", "int64"), "m_b"))
        out_dtype = str(self.output_dtype).removeprefix("torch.")
        fb.requantize(total, fb.const(1, "int64", "one"), "s", self.qmin, self.qmax, out_dtype, out="y")
        return fb.build()
