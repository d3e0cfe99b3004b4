"""Dyadic numbers and the requantize primitive (HAWQV3).

A float scale ratio ``r`` is replaced by a dyadic number ``m / 2**s`` with
integer ``m`` and shift ``s``.  Requantizing an integer ``x`` is then::

    y = clamp((x * m + 2**(s-1)) >> s, qmin, qmax)

- ``x * m`` is formed in int64; ``>>`` is an arithmetic (floor) shift, so
  the ``+ 2**(s-1)`` makes the whole expression round half up
  (towards +inf) on the exact rational ``x * m / 2**s``.
- ``m`` carries ``MULTIPLIER_BITS`` (24) significant bits: ``2**23 <= |m| <
  2**24`` whenever ``s`` is not at its limits, a relative error of at most
  ``2**-24`` on ``r``.  ``s`` lies in ``[1, 62]``.
- Contract on magnitudes (checked by the ops that call this, documented in
  each op): ``|x * m| + 2**(s-1) < 2**62``.  The ONNX form needs this margin:
  ONNX ``BitShift`` is unsigned only, so a signed floor shift is computed as
  ``((x + 2**62) >>u s) - (2**62 >> s)``, exact because ``2**62`` is a
  multiple of ``2**s``.

``m`` may be negative (I-LayerNorm folds a negative gamma into it) and may be
a vector (per output channel, broadcast along the last axis); ``s`` may be a
scalar or a vector of the same shape.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MULTIPLIER_BITS = 24
MIN_SHIFT = 1
MAX_SHIFT = 62
SHIFT_OFFSET = 1 << 62  # the offset that turns a signed floor shift into an unsigned one


def dyadic(ratio, bits: int = MULTIPLIER_BITS, shared_shift: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Return int64 arrays ``(m, s)`` with ``m / 2**s`` closest to ``ratio``.

    ``ratio`` is a float or an array (any sign, finite).  With
    ``shared_shift`` one shift serves every element (chosen for the largest
    magnitude), as an op that sums several dyadic products needs.
    """
    r = np.asarray(ratio, dtype=np.float64)
    if not np.all(np.isfinite(r)):
        raise ValueError(f"cannot represent a non-finite scale ratio as a dyadic number: {r}")
    mag = np.abs(r)
    if shared_shift:
        top = float(mag.max()) if mag.size else 0.0
        s = np.full(r.shape, _shift_for(top, bits), dtype=np.int64)
    else:
        s = (
            np.vectorize(lambda v: _shift_for(float(v), bits), otypes=[np.int64])(mag)
            if r.ndim
            else np.int64(_shift_for(float(mag), bits))
        )
        s = np.asarray(s, dtype=np.int64)
    m = np.rint(r * np.exp2(s.astype(np.float64))).astype(np.int64)
    return m, s


def _shift_for(magnitude: float, bits: int) -> int:
    """Largest shift (<= 62) that keeps ``round(magnitude * 2**s)`` below ``2**bits``."""
    if magnitude == 0.0:
        return MIN_SHIFT
    _, exponent = math.frexp(magnitude)  # magnitude = f * 2**exponent, f in [0.5, 1)
    return int(min(max(bits - exponent, MIN_SHIFT), MAX_SHIFT))


def shift_right_round(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``(x * m + 2**(s-1)) >> s`` on int64 tensors (arithmetic shift)."""
    x = x.to(torch.int64)
    return (x * m + (torch.ones_like(s) << (s - 1))) >> s


def requantize(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Dyadic requantize, int64 in and int64 out: ``clamp((x*m + 2**(s-1)) >> s, qmin, qmax)``."""
    return shift_right_round(x, m, s).clamp_(qmin, qmax)


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer matmul of integer tensors, returned as int64.

    Runs in float64 BLAS: every product and partial sum is an integer below
    2**53 (int8 operands: K * 128 * 128 < 2**53 for K < 2**39), so the float64
    result is exact whatever the summation order.
    """
    return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int64)
