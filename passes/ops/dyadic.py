"""The dyadic requantize primitive as a TIR expression (see ``quantizer/ops/dyadic.py``).

    y = clamp((x * m + 2**(s-1)) >> s, qmin, qmax)

Every step is int64: ``x`` is widened before the product, ``m`` and ``s``
are int64, and ``>>`` on a signed TIR integer is an arithmetic (floor) shift
(LLVM ``ashr``), so the ``+ 2**(s-1)`` rounds half up exactly as the torch
emulation and the ONNX function do.  The callers' contract keeps ``|x * m| +
2**(s-1) < 2**62`` and ``s`` in ``[1, 62]``, so nothing overflows and no
shift amount reaches 64 (where ``ashr`` would be undefined).  The ONNX form
needs its unsigned-shift detour only because ONNX ``BitShift`` is unsigned;
TIR has the signed shift, and the two are equal on the contract's domain.
"""

from __future__ import annotations

from intq.passes.compat import te, tirx


def round_shift(x: tirx.PrimExpr, m: tirx.PrimExpr, s: tirx.PrimExpr) -> tirx.PrimExpr:
    """``(x*m + 2**(s-1)) >> s`` in int64; ``x``, ``m``, ``s`` int64 expressions."""
    one = tirx.const(1, "int64")
    return (x * m + (one << (s - one))) >> s


def clamp(x: tirx.PrimExpr, qmin: int, qmax: int) -> tirx.PrimExpr:
    """``min(max(x, qmin), qmax)`` on an int64 expression."""
    return te.max(te.min(x, tirx.const(qmax, "int64")), tirx.const(qmin, "int64"))


def requantize(x: tirx.PrimExpr, m: tirx.PrimExpr, s: tirx.PrimExpr, qmin: int, qmax: int, out_dtype: str):
    """``clamp((x*m + 2**(s-1)) >> s, qmin, qmax)`` cast to ``out_dtype``; ``x`` int64."""
    return clamp(round_shift(x, m, s), qmin, qmax).astype(out_dtype)
