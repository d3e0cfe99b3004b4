"""Integer square root by Newton iteration (I-ViT, used by I-LayerNorm).

For int64 ``v`` with ``0 <= v < 2**48``::

    x = 2**24
    repeat ISQRT_ITERATIONS (= 24) times:
        x_next = (x + v // x) >> 1
        x = max(min(x, x_next), 1)
    isqrt(v) = x

The result is ``floor(sqrt(v))`` for ``v >= 1`` and ``1`` for ``v = 0``
(never 0, so a caller may divide by it).

Arithmetic: every operand is non-negative, so ``v // x`` (``x >= 1``) is the
same under floor and truncating division and ``>> 1`` is the same as an
unsigned shift.  Magnitudes: ``v // x <= v < 2**48`` and ``x <= 2**24``, so
``x + v // x < 2**49``; int64 never overflows.  The iteration count is fixed
(no data-dependent loop), so the ONNX function and a TVM lowering are a
straight line of 24 identical steps.

Why 24 iterations are enough (and needed).  Let ``a = floor(sqrt(v))``.

- ``x`` never drops below ``a``: ``(x + v // x) >> 1 = floor((x + v/x) / 2)``
  (nested floors), and ``(x + v/x) / 2 >= sqrt(v)`` (AM-GM).  So once
  ``x = a`` the ``min`` keeps it there.
- While ``x = a + d`` with ``d >= 1`` the excess at least halves.  From
  ``v < (a+1)**2 = (a+d)**2 - 2(a+d)(d-1) + (d-1)**2`` follows
  ``v // x < a - d + 2 + t`` with ``t = (d-1)**2 / (a+d) < d - 1``, so
  ``x_next < a + 1 + t/2`` and the new excess ``d' < (d+1)/2``, i.e.
  ``d' <= floor(d / 2)`` (and ``x_next < x``, so the ``min`` takes it).
- ``v < 2**48`` gives ``a <= 2**24 - 1``; for ``v >= 1`` the start excess
  ``d0 = 2**24 - a < 2**24``, hence ``d = 0`` after 24 halvings.  For ``v = 0``
  the iteration is ``x -> x >> 1``, which reaches 1 after 24 steps; the
  ``max(., 1)`` holds it there.
- 23 steps are not enough: ``v = 1`` (and ``v = 0``) take exactly 24.  An
  exhaustive check of every ``v < 2**24`` plus 200 000 random ``v`` of each
  bit length up to 48 (and ``k**2``, ``k**2 - 1``, ``k**2 + k``) found no ``v``
  needing more than 24; the count needed falls to 4 for 48-bit ``v``.

Outside the domain (``v >= 2**48``) the result is wrong (at most ``2**24``);
callers must bound ``v`` (I-LayerNorm documents ``var < 2**48``).
"""

from __future__ import annotations

import torch

from intq.quantizer.ops.onnx_fn import FunctionBuilder

ISQRT_ITERATIONS = 24
ISQRT_START = 1 << 24  # > sqrt(v) for every v < ISQRT_LIMIT
ISQRT_LIMIT = 1 << 48


def isqrt(v: torch.Tensor) -> torch.Tensor:
    """``floor(sqrt(v))`` (``1`` where ``v == 0``), elementwise, for int64 ``0 <= v < 2**48``."""
    v = v.to(torch.int64)
    x = torch.full_like(v, ISQRT_START)
    for _ in range(ISQRT_ITERATIONS):
        x_next = (x + torch.div(v, x, rounding_mode="floor")) >> 1
        x = torch.clamp(torch.minimum(x, x_next), min=1)
    return x


def isqrt_onnx(b: FunctionBuilder, v: str) -> str:
    """Append the nodes of ``isqrt`` on the int64 tensor ``v`` to ``b``; return the result's name.

    ``Div`` is the truncating ONNX division, exact here because ``v >= 0`` and
    ``x >= 1``; ``>> 1`` of the non-negative sum goes through uint64 because
    ONNX ``BitShift`` is unsigned only.
    """
    one = b.const(1, "int64", "one")
    one_u = b.const(1, "uint64", "one_u")
    x = b.const(ISQRT_START, "int64", "isqrt_start")  # a scalar; the first step broadcasts it to v's shape
    for _ in range(ISQRT_ITERATIONS):
        total = b.cast(b.op("Add", x, b.op("Div", v, x)), "uint64")
        x_next = b.cast(b.op("BitShift", total, one_u, direction="RIGHT"), "int64")
        x = b.op("Max", b.op("Min", x, x_next), one)
    return x
