"""Integer matmul of two activations (attention's ``Q @ K^T`` and ``P @ V``).

``IntMatMul`` (requantized to int8, one scalar multiplier)::

    acc = a @ b                                          (int32)
    y   = clamp((acc * m + 2**(s-1)) >> s, -128, 127)    (int8)

``IntMatMulAcc`` (no params)::

    y = a @ b                                            (int32)

- ``a``: int8 ``[..., M, K]``, ``b``: int8 ``[..., K, N]``, both at least
  2-D; the batch dimensions broadcast as in ``numpy.matmul``.  ``m``, ``s``:
  int64 scalars, ``(m, s) = dyadic(ratio)`` with ``ratio = S_a * S_b / S_y``.
- Accumulator bound: ``|acc| <= K * 2**14 < 2**31`` requires ``K <= 131071``
  (``linear.MAX_K``).  ``K`` is only known from the data, so ``forward``
  checks it (a shape check, no data scan); the constructor checks the
  requantize margin ``2**31 * |m| + 2**(s-1) < 2**62`` for the worst int32
  accumulator, which refuses only ratios near ``2**30`` and above.
- Rounding: half up, once.  Float meaning: with ``v = acc * ratio``,
  ``|y - clip(v, -128, 127)| <= 1/2 + |v| * 2**-24``.
- Torch emulation: ``int_matmul`` (float64, exact below ``2**53``).
- ONNX body: ``MatMulInteger(a, b)`` (int8 x int8 -> int32, exact by the
  bound), ``Cast`` to int64, ``FunctionBuilder.requantize``; ``IntMatMulAcc``
  is the bare ``MatMulInteger``.
"""

from __future__ import annotations

import numpy as np
import torch

from intq.quantizer.ops.base import IntegerOp, as_buffer
from intq.quantizer.ops.dyadic import dyadic, int_matmul, requantize
from intq.quantizer.ops.linear import ACC_LIMIT, MAX_K, check_requantize_margin
from intq.quantizer.ops.onnx_fn import FunctionBuilder


def _check_k(op_type: str, a: torch.Tensor) -> None:
    k = a.shape[-1]
    if k > MAX_K:
        raise ValueError(
            f"{op_type}: reduction length K={k} can overflow the int32 accumulator "
            f"(K * 128 * 128 >= 2**31); K must stay <= {MAX_K}: split the reduction"
        )


class IntMatMul(IntegerOp):
    op_type = "IntMatMul"
    data_inputs = ("a", "b")
    param_names = ("m", "s")
    output_dtype = torch.int8
    qmin, qmax = -128, 127

    def __init__(self, ratio: float):
        super().__init__()
        if np.ndim(ratio) != 0:
            raise ValueError(f"{self.op_type}: ratio must be a scalar (one scale per tensor), got {np.shape(ratio)}")
        m, s = dyadic(float(ratio))
        check_requantize_margin(ACC_LIMIT, m, s, self.op_type)
        self.register_buffer("m", as_buffer(m, torch.int64))
        self.register_buffer("s", as_buffer(s, torch.int64))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _check_k(self.op_type, a)
        return requantize(int_matmul(a, b), self.m, self.s, self.qmin, self.qmax).to(self.output_dtype)

    @classmethod
    def function_proto(cls):
        fb = FunctionBuilder(cls.op_type, ["a", "b", "m", "s"], doc=__doc__)
        acc = fb.cast(fb.op("MatMulInteger", "a", "b"), "int64")
        fb.requantize(acc, "m", "s", cls.qmin, cls.qmax, "int8", out="y")
        return fb.build()


class IntMatMulAcc(IntegerOp):
    op_type = "IntMatMulAcc"
    data_inputs = ("a", "b")
    param_names = ()
    output_dtype = torch.int32

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _check_k(self.op_type, a)
        return int_matmul(a, b).to(self.output_dtype)

    @classmethod
    def function_proto(cls):
        fb = FunctionBuilder(cls.op_type, ["a", "b"], doc=__doc__)
        fb.op("MatMulInteger", "a", "b", out="y")
        return fb.build()
