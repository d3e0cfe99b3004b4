"""Shift-based integer exp (I-ViT), shared by Shiftmax and ShiftGELU.

Input ``t``: int64, ``t <= 0``, a logit minus its row maximum in integer
units of a scale ``S``; ``D = round(1/S)``, an int64 with ``1 <= D <= 2**20``
(``exp_divisor`` checks ``1 <= 1/S <= 2**20``).  With ``N = 15``::

    t2 = t + (t >> 1) - (t >> 4)      # ~ t * log2(e); >> is a floor shift
    t2 = max(t2, -N*D)                # exp floored at 2**-N
    q  = (-t2) // D                   # non-negative operands; q in [0, N]
    r  = -t2 - q*D                    # 0 <= r < D
    v  = D - (r >> 1)                 # 2**(-r/D) ~ 1 - r/(2D), scale 1/D; v in [1, D]
    e  = v << (N - q)                 # exact

``e`` lies in ``[D, D * 2**N]`` (``e = D * 2**N`` exactly when ``t = 0``)
and ``e / (D * 2**N) ~ exp(t / D)``.  ``t >= -2**32`` is enough for every
intermediate to stay far inside int64 (``|t2| < 2**33``).

Error of ``E = e / (D * 2**N)`` against ``exp(t / D)`` (the scale the
integers carry; against ``exp(t * S)`` add the error of ``D = round(1/S)``,
``|t| * |S - 1/D| <= |t| * S / (2D)`` in the exponent), measured over every
``t`` in ``[-12 D, 0]`` for each ``D < 5000`` and sampled above:

==========  ===============================  ======================
``D >=``    relative, for ``t/D >= -10``     absolute, every ``t``
==========  ===============================  ======================
1           ``[-12%, +98%]``                 ``0.40``
16          ``[-1.2%, +19%]``                ``0.097``
128         ``[0, +11%]``                    ``0.051``
1024        ``[0, +10%]``                    ``0.045``
==========  ===============================  ======================

The large-``D`` limit is ``+9.8%``: the linear ``2**-f ~ 1 - f/2`` (up to
``+6.1%``) times ``log2 e ~ 1.4375`` (``+3.7%`` at ``t/D = -10``); the floor
shifts add ``O(1/D)``.  For ``t/D <= -10.5`` the output is the floor,
``E = 2**-15`` (``exp(-10.4) ~ 2**-15``).  ``e`` is non-decreasing in ``t``.
"""

from __future__ import annotations

import math

import torch

from intq.quantizer.ops.onnx_fn import FunctionBuilder

EXP_BITS = 15  # N: e carries D * 2**N at t = 0
MAX_DIVISOR = 1 << 20


def exp_divisor(scale: float, what: str = "input", gain: float = 1.0) -> int:
    """``D = round(1/(gain * scale))`` for the shift exp.

    ``ValueError`` unless ``1 <= 1/(gain * scale) <= 2**20`` (``D`` then
    fits the bounds of every op that uses it).
    """
    inv = 1.0 / (gain * scale) if scale else math.inf
    if not (math.isfinite(inv) and 1.0 <= inv <= MAX_DIVISOR):
        inverse = "1/scale" if gain == 1.0 else f"1/({gain} * scale)"
        raise ValueError(
            f"the {what} scale {scale!r} is out of range for the shift-based exp: {inverse} must lie in "
            f"[1, 2**20], i.e. scale in [{1 / (gain * MAX_DIVISOR):.3g}, {1 / gain:.4g}]; "
            f"calibrate the {what} to a scale inside that range"
        )
    return round(inv)


def shift_exp(t: torch.Tensor, D) -> torch.Tensor:
    """Integer exp of ``t <= 0`` (int64) at scale ``1/D``; returns int64 ``e ~ exp(t/D) * D * 2**15``."""
    t = t.to(torch.int64)
    D = torch.as_tensor(D, dtype=torch.int64)
    t2 = t + (t >> 1) - (t >> 4)
    t2 = torch.maximum(t2, -EXP_BITS * D)
    neg = -t2
    q = torch.div(neg, D, rounding_mode="floor")
    r = neg - q * D
    v = D - (r >> 1)
    return v << (EXP_BITS - q)


def shift_exp_onnx(b: FunctionBuilder, t: str, D: str) -> str:
    """The ONNX nodes of ``shift_exp`` on int64 ``t`` and ``D``; returns the name of ``e`` (int64)."""
    one = b.const(1, "int64", "one")
    four = b.const(4, "int64", "four")
    t2 = b.op("Sub", b.op("Add", t, b.floor_shift(t, one)), b.floor_shift(t, four))
    t2 = b.op("Max", t2, b.op("Mul", b.const(-EXP_BITS, "int64", "minus_n"), D))
    neg = b.op("Neg", t2)
    q = b.op("Div", neg, D)  # both operands >= 0: truncation == floor
    r = b.op("Sub", neg, b.op("Mul", q, D))
    v = b.op("Sub", D, b.floor_shift(r, one))
    return b.shift_left(v, b.op("Sub", b.const(EXP_BITS, "int64", "n"), q))
