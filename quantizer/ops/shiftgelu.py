"""ShiftGELU (I-ViT): integer GELU, int8 -> int8, ``GELU(x) ~ x * sigmoid(1.702 x)``.

``x``: int8 tensor (any shape) at scale ``S_in``; output int8 at ``S_out``.
``D = round(1/(1.702 * S_in))`` (``1 <= 1/(1.702 S_in) <= 2**20``), and
``m / 2**s = dyadic(S_in / (128 * S_out))``.  Elementwise, in int64::

    mx  = max(x, 0)
    a   = x - mx;  b = -mx                 # both <= 0, one of them is 0
    ea  = shift_exp(a, D);  eb = shift_exp(b, D)
    sig = clamp((ea * (2**62 // (ea + eb)) + 2**54) >> 55, 0, 127)   # scale 1/128
    y   = clamp((x * sig * m + 2**(s-1)) >> s, -128, 127)           # int8

In the reals ``exp(a/D) / (exp(a/D) + exp(b/D)) = sigmoid(x/D)`` exactly, and
``1/D ~ 1.702 S_in``;
``sig`` is that ratio through the shift exp, rounded half up to ``1/128``
(the ``normalize`` step of Shiftmax).  ``y`` is the HAWQV3 requantize of
``x * sig`` (scale ``S_in / 128``) to ``S_out``, rounded half up.

Why ``max(x, 0)`` and not the row maximum (the softmax habit): with the
exp floored at ``2**-15``, a row maximum above 6.1 real units (``10.4 /
(1.702 S_in)`` steps) floors both exps of every element more than that
below it, so ``sig = 64`` and a large negative ``x`` comes out as ``x / 2``
instead of ``~0`` (64 output steps wrong at ``S_in = S_out = 0.06``).  The
elementwise maximum keeps both exponents ``<= 0`` just as well, never
floors the larger exp, and makes the op elementwise (any shape, no
reduction).

Bounds: ``ea + eb <= 2 * D * 2**15 <= 2**36``; ``|x * sig| < 2**14``,
``|m| < 2**24``, so ``|x * sig * m| < 2**38``, inside ``dyadic``'s margin.

Error of ``sig / 128`` against ``sigmoid(1.702 x S_in)``, the maximum over
every int8 ``x`` and ``1/(1.702 S_in)`` anywhere in ``[D - 1/2, D + 1/2]``,
measured for each ``D < 1100`` and some above (it falls with ``D`` partly because the int8
range then spans only ``|1.702 x S_in| <= 128/D``):

==========  =========
``D >=``    ``delta``
==========  =========
1           0.162
4           0.095
8           0.061
16          0.036
64          0.024
256         0.020
==========  =========

It includes the ``1/256`` of rounding ``sig``.  Against the exact erf GELU
(``0.0204 = max |z sigmoid(1.702 z) - GELU(z)|``), and the requantize
rounding, for every int8 ``x``::

    |y * S_out - clamp(GELU(x * S_in), -128 S_out, 127 S_out)|
        <= S_out / 2 + 0.0204 + delta * |x * S_in|

The bound is loose for large ``|x|``; measured maxima over all int8 ``x``,
in output steps: 1.17 at ``S_in = S_out = 0.05``, 1.59 at 0.03, 1.00 at
0.08, 2.43 at ``S_in = 0.05, S_out = 0.02`` (the ``0.0204`` term dominates
when ``S_out`` is small).
"""

from __future__ import annotations

import math

import torch

from intq.quantizer.ops.base import IntegerOp, as_buffer
from intq.quantizer.ops.dyadic import dyadic, requantize
from intq.quantizer.ops.onnx_fn import FunctionBuilder
from intq.quantizer.ops.shift_exp import exp_divisor, shift_exp, shift_exp_onnx
from intq.quantizer.ops.shiftmax import normalize, normalize_onnx

SIGMOID_GAIN = 1.702


def shift_sigmoid(x: torch.Tensor, D) -> torch.Tensor:
    """``sig``: int64 in ``[0, 127]`` at scale ``1/128``, ``~ sigmoid(x / D)`` for integer ``x``."""
    x = x.to(torch.int64)
    mx = x.clamp(min=0)
    ea = shift_exp(x - mx, D)
    eb = shift_exp(-mx, D)
    return normalize(ea, ea + eb)


def shift_sigmoid_onnx(b: FunctionBuilder, x: str, D: str) -> str:
    """ONNX form of ``shift_sigmoid`` on int64 ``x``; returns an int64 name."""
    mx = b.op("Max", x, b.const(0, "int64", "zero"))
    ea = shift_exp_onnx(b, b.op("Sub", x, mx), D)
    eb = shift_exp_onnx(b, b.op("Neg", mx), D)
    return normalize_onnx(b, ea, b.op("Add", ea, eb))


class ShiftGELU(IntegerOp):
    op_type = "ShiftGELU"
    data_inputs = ("x",)
    param_names = ("D", "m", "s")
    output_dtype = torch.int8
    qmin, qmax = -128, 127

    def __init__(self, scale_in: float, scale_out: float):
        super().__init__()
        if not (math.isfinite(scale_out) and scale_out > 0):
            raise ValueError(f"the ShiftGELU output scale {scale_out!r} must be a positive finite number")
        D = exp_divisor(scale_in, "ShiftGELU input", gain=SIGMOID_GAIN)
        m, s = dyadic(scale_in / (128 * scale_out))
        self.register_buffer("D", as_buffer(D, torch.int64))
        self.register_buffer("m", as_buffer(m, torch.int64))
        self.register_buffer("s", as_buffer(s, torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.int64)
        return requantize(x * shift_sigmoid(x, self.D), self.m, self.s, self.qmin, self.qmax).to(self.output_dtype)

    @classmethod
    def function_proto(cls):
        b = FunctionBuilder(cls.op_type, ["x", "D", "m", "s"], doc=__doc__)
        x = b.cast("x", "int64")
        b.requantize(b.op("Mul", x, shift_sigmoid_onnx(b, x, "D")), "m", "s", cls.qmin, cls.qmax, "int8", out="y")
        return b.build()
