"""The two float ops allowed in an integer-only model: the input quantizer
and the output dequantizer.  Both are standard ONNX ops, so the integer
region of a graph is exactly what lies between them.

Quantize (float32 -> int8, ONNX ``QuantizeLinear`` with zero point 0)::

    q = clamp(round_half_even(x / scale), -128, 127)

computed in float32 (a division, as onnxruntime does; checked bit-exact in
tests).  Non-finite inputs are part of the integer contract, the same in the
torch emulation, onnxruntime and the TVM artifact: NaN -> 0, +Inf -> 127,
-Inf -> -128 (the infinities saturate like any out-of-range value).  The
ONNX export writes the NaN rule with standard ops before the quantizer,
``IsNaN(x) -> Where(isnan, 0.0f, x) -> QuantizeLinear``, because
``QuantizeLinear`` leaves NaN unspecified (onnxruntime gave -128, TVM's
lowering 127).  The infinities need nothing more: onnxruntime saturates
them, and TVM's lowering clamps in float before its cast to int8
(``Cast(max(min(round(x / scale), 127), -128))``), so the conversion only
ever sees a value in [-128, 127] (checked in tests/quantizer/ops/test_boundary.py).

Dequantize (int8 / int16 / int32 -> float32, ``DequantizeLinear``)::

    x = float32(q) * scale

with ``scale`` a scalar or a vector along the last axis (per output
channel of an ``IntLinearAcc``).
"""

from __future__ import annotations

import numpy as np
import torch


class Quantize(torch.nn.Module):
    qmin, qmax = -128, 127

    def __init__(self, scale: float):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        x = torch.where(torch.isnan(x), 0.0, x)  # NaN -> 0; +-Inf saturate to qmax / qmin in the clamp
        return torch.round(x / self.scale).clamp_(self.qmin, self.qmax).to(torch.int8)

    def onnx_params(self) -> dict[str, np.ndarray]:
        return {"scale": self.scale.numpy(), "zero_point": np.array(0, dtype=np.int8)}


class Dequantize(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale, dtype=np.float32)))

    @property
    def per_channel(self) -> bool:
        return self.scale.dim() == 1 and self.scale.numel() > 1

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q.to(torch.float32) * self.scale

    def onnx_params(self) -> dict[str, np.ndarray]:
        scale = self.scale.numpy()
        return {"scale": scale if self.per_channel else scale.reshape(())}
