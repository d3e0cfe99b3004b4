"""The shift-based integer exp as a TIR expression (spec: ``quantizer/ops/shift_exp.py``).

For int64 ``t <= 0`` and ``D`` in ``[1, 2**20]``, with ``N = 15``::

    t2 = max(t + (t >> 1) - (t >> 4), -N*D)
    q  = (-t2) // D;  r = -t2 - q*D
    e  = (D - (r >> 1)) << (N - q)             # int64 in [D, D * 2**N]

Not an op of its own: Shiftmax and ShiftGELU inline it into their blocks.
The ONNX function's floor shifts (``floor_shift``, exact for ``|t| <
2**62``, far beyond the spec's ``t >= -2**32``) are TIR's signed ``>>``
(``ashr``).  Its ``Div`` truncates; both operands are non-negative, so it
is ``truncdiv`` here too, which LLVM turns into a multiply when ``D`` is an
immediate (``floordiv`` would add sign fix-ups).  The left shift is by
``N - q`` in ``[0, 15]`` of ``v`` in ``[1, D]``: no overflow, and the
unsigned detour of the ONNX form changes nothing.
"""

from __future__ import annotations

from intq.passes.compat import te, tirx

EXP_BITS = 15  # N, as in quantizer.ops.shift_exp
MAX_DIVISOR = 1 << 20


def shift_exp(t: tirx.PrimExpr, D: tirx.PrimExpr | int) -> tirx.PrimExpr:
    """``e ~ exp(t/D) * D * 2**15`` (int64) of an int64 expression ``t <= 0``; ``D`` an int64 expression or int."""
    D = tirx.const(D, "int64") if isinstance(D, int) else D
    one, four, n = (tirx.const(v, "int64") for v in (1, 4, EXP_BITS))
    t2 = te.max(t + (t >> one) - (t >> four), tirx.const(-EXP_BITS, "int64") * D)
    neg = -t2
    q = tirx.truncdiv(neg, D)
    v = D - ((neg - q * D) >> one)
    return v << (n - q)


def check_divisor(cls, node: str, D: int) -> None:
    """Refuse a constant ``D`` outside ``[1, 2**20]``, the range ``exp_divisor`` produces."""
    if not 1 <= D <= MAX_DIVISOR:
        raise cls.fail(node, f"D = {D} lies outside [1, 2**20]; re-export the model (exp_divisor computes D)")
