"""Shiftmax (I-ViT): integer softmax over the last axis, int -> int8 at scale 1/128.

``x``: integer tensor ``[..., L]`` (int32 in practice) at scale ``S``;
``D = round(1/S)`` (see ``shift_exp.exp_divisor``: ``1 <= 1/S <= 2**20``)::

    t      = x - max(x, axis=-1)               # int64, t <= 0
    e      = shift_exp(t, D)                   # int64 in [D, D * 2**15]
    sum    = sum(e, axis=-1)                   # >= D * 2**15 (the max element)
    factor = 2**62 // sum                      # non-negative operands
    y      = clamp((e * factor + 2**54) >> 55, 0, 127)      # int8

``y`` is a probability at the fixed scale ``1/128`` (``output_scale``),
rounded half up from ``e * factor / 2**55 ~ 128 * e / sum``.

Bounds: ``x`` int32, or any integers with ``max(x) - min(x) < 2**32`` per
row (so ``-2**32 < t <= 0``), and ``L * D * 2**15 < 2**62``
(``sum`` fits and ``factor >= 1``).  Then ``e * factor <= 2**62`` and the
rounding add stays below ``2**63``; the shift is of a non-negative value.
Truncating ``factor`` moves ``y`` by at most ``e / 2**55 <= L * D * 2**-40``
before rounding, negligible while ``L * D << 2**40``.

Error of ``y / 128`` against a float softmax, measured on random rows
(``1 <= L <= 512``, logits within ``+-40`` real units) and on adversarial
ones (one row maximum and ``k`` copies of a second value swept over
``[-12, 0]``), for ``1/S`` anywhere in ``[D - 1/2, D + 1/2]``:

===========  ==========================  ===========================
``1/S >=``   vs ``softmax(x / D)``       vs ``softmax(x * S)``
===========  ==========================  ===========================
15.5         ``0.04``                    ``0.09``
63.5         ``0.03``                    ``0.045``
255.5        ``0.025``                   ``0.03``
===========  ==========================  ===========================

The first column is the shift exp alone (its ``~10%`` relative error
mostly cancels in the ratio); the second adds ``D = round(1/S)``, which
scales every exponent by ``S * D``.  Below ``1/S = 15.5`` the error grows
quickly (``0.26`` at ``1/S = 3.5``).

``MaskedShiftmax(x, keep)``: the same over the kept elements of each row
only, ``keep`` an integer or boolean tensor that broadcasts onto ``x``
(nonzero: kept; the converter feeds ``attention_mask [B, L]`` unsqueezed to
``[B, 1, 1, L]``)::

    k      = keep != 0
    t      = k ? x - max(x where k, axis=-1) : 0
    e      = k ? shift_exp(t, D) : 0
    sum    = max(sum(e, axis=-1), 1)
    y      = clamp((e * (2**62 // sum) + 2**54) >> 55, 0, 127)

A masked element is exactly 0 and adds nothing to the row's maximum or
sum, so the kept elements of a row get the same integers whatever the
masked ones hold and however many there are: a sentence padded to any
length equals the sentence alone at its own tokens.  A row with no kept
element is all 0 (``e = 0``, ``sum`` clamped to 1).  The row maximum is
taken over ``where(k, x, -2**40)``, below every int32; the bounds are
Shiftmax's.

Invariants, exact by construction: each ``y_i`` is ``w_i = e_i * factor /
2**55`` rounded half up (``sum w_i`` lies in ``(128 - 2**-40 L D, 128]``),
and the clamp at 127 can lower one element by 1, for
``L * D <= 2**40``: ``128 - L/2 - 2 < sum(y) <= 128 + L/2`` (a long, flat row can round every
element to 0: ``L = 512`` equal logits give ``sum(y) = 0``); within a row
``y`` is non-decreasing in ``x``.
"""

from __future__ import annotations

import torch

from intq.quantizer.ops.base import IntegerOp, as_buffer
from intq.quantizer.ops.onnx_fn import FunctionBuilder
from intq.quantizer.ops.shift_exp import exp_divisor, shift_exp, shift_exp_onnx

NORM_SHIFT = 62  # factor = 2**62 // sum
OUT_SHIFT = 55  # 2**62 / 2**55 = 128 = 1 / output_scale


def normalize(e: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``clamp((e * (2**62 // total) + 2**54) >> 55, 0, 127)`` on int64, ``0 <= e <= total < 2**62``."""
    factor = torch.div(torch.full_like(total, 1 << NORM_SHIFT), total, rounding_mode="floor")
    return ((e * factor + (1 << (OUT_SHIFT - 1))) >> OUT_SHIFT).clamp_(0, 127)


def normalize_onnx(b: FunctionBuilder, e: str, total: str) -> str:
    """ONNX form of ``normalize``; returns an int64 name.  Every operand is non-negative."""
    factor = b.op("Div", b.const(1 << NORM_SHIFT, "int64", "two_62"), total)
    rounded = b.op("Add", b.op("Mul", e, factor), b.const(1 << (OUT_SHIFT - 1), "int64", "half"))
    # rounded < 2**63 but may exceed the 2**62 margin of floor_shift; it is >= 0, so shift it unsigned
    shifted = b.op("BitShift", b.cast(rounded, "uint64"), b.const(OUT_SHIFT, "uint64", "out_shift"), direction="RIGHT")
    return b.clamp(b.cast(shifted, "int64"), 0, 127)


class Shiftmax(IntegerOp):
    op_type = "Shiftmax"
    data_inputs = ("x",)
    param_names = ("D",)
    output_dtype = torch.int8
    output_scale = 1 / 128

    def __init__(self, scale: float):
        super().__init__()
        self.register_buffer("D", as_buffer(exp_divisor(scale, "Shiftmax input"), torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.int64)
        e = shift_exp(x - x.amax(dim=-1, keepdim=True), self.D)
        return normalize(e, e.sum(dim=-1, keepdim=True)).to(self.output_dtype)

    @classmethod
    def function_proto(cls):
        b = FunctionBuilder(cls.op_type, ["x", "D"], doc=__doc__)
        x = b.cast("x", "int64")
        last = b.const([-1], "int64", "last_axis")
        e = shift_exp_onnx(b, b.op("Sub", x, b.op("ReduceMax", x, last, keepdims=1)), "D")
        y = normalize_onnx(b, e, b.op("ReduceSum", e, last, keepdims=1))
        b.cast(y, "int8", out="y")
        return b.build()


MASKED_SENTINEL = -(1 << 40)  # below every int32 x: the row maximum of the kept elements ignores masked ones


class MaskedShiftmax(IntegerOp):
    """Shiftmax over the elements that ``keep`` marks (nonzero), the others 0; see the module docstring."""

    op_type = "MaskedShiftmax"
    data_inputs = ("x", "keep")
    param_names = ("D",)
    output_dtype = torch.int8
    output_scale = Shiftmax.output_scale

    def __init__(self, scale: float):
        super().__init__()
        self.register_buffer("D", as_buffer(exp_divisor(scale, "MaskedShiftmax input"), torch.int64))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.int64)
        kept = torch.broadcast_to(keep != 0, x.shape)
        row_max = torch.where(kept, x, MASKED_SENTINEL).amax(dim=-1, keepdim=True)
        zero = torch.zeros((), dtype=torch.int64)
        e = torch.where(kept, shift_exp(torch.where(kept, x - row_max, zero), self.D), zero)
        return normalize(e, e.sum(dim=-1, keepdim=True).clamp_min(1)).to(self.output_dtype)

    @classmethod
    def function_proto(cls):
        b = FunctionBuilder(cls.op_type, ["x", "keep", "D"], doc=__doc__)
        x = b.cast("x", "int64")
        zero = b.const(0, "int64", "zero")
        kept = b.op("Not", b.op("Equal", b.cast("keep", "int64"), zero))
        last = b.const([-1], "int64", "last_axis")
        row_max = b.op(
            "ReduceMax", b.op("Where", kept, x, b.const(MASKED_SENTINEL, "int64", "sentinel")), last, keepdims=1
        )
        t = b.op("Where", kept, b.op("Sub", x, row_max), zero)
        e = b.op("Where", kept, shift_exp_onnx(b, t, "D"), zero)
        total = b.op("Max", b.op("ReduceSum", e, last, keepdims=1), b.const(1, "int64", "one"))
        b.cast(normalize_onnx(b, e, total), "int8", out="y")
        return b.build()
