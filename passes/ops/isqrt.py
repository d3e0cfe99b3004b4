"""The integer square root as TE stages (spec: ``quantizer/ops/isqrt.py``).

For int64 ``v`` with ``0 <= v < 2**48``::

    x = 2**24
    repeat 24 times:  x = max(min(x, (x + v // x) >> 1), 1)

gives ``floor(sqrt(v))`` (``1`` for ``v = 0``).  Every operand is
non-negative and ``x >= 1``, so the division is emitted as ``truncdiv`` (one
``sdiv``, the ONNX ``Div`` the reference runs) instead of TIR's
``floordiv``, which adds sign fix-ups; ``>> 1`` of the non-negative sum is
the ONNX function's unsigned shift.

Why 24 ``te.compute`` stages and not one stage with an unrolled expression:
a step reads ``x`` three times, so a plainly unrolled expression is a tree
of ``3**24`` nodes.  Binding each step to a ``tirx.Let`` keeps the tree
linear, but TVM 0.27's default TIR pipeline still expands it: the time of
``CompactBufferAllocation``, ``FlattenBuffer``, ``LowerIntrin`` and a few
other passes grows about 3x per step (measured: 8 steps 0.18 s, 10 steps
1.7 s; 24 steps out of reach).  One stage per step keeps every
expression small, and the whole ILayerNorm PrimFunc compiles in about 0.4 s.
Each stage is an elementwise loop over ``v`` (one element per LayerNorm row),
so the 24 loops cost little next to the two row reductions over ``C``.  The
stages land in the caller's PrimFunc with the rest of the op.
"""

from __future__ import annotations

from intq.passes.compat import te, tirx

ISQRT_ITERATIONS = 24  # quantizer.ops.isqrt.ISQRT_ITERATIONS (no torch import here)
ISQRT_START = 1 << 24


def newton_step(x: tirx.PrimExpr, v: tirx.PrimExpr) -> tirx.PrimExpr:
    """``max(min(x, (x + v // x) >> 1), 1)`` in int64, for ``v >= 0`` and ``x >= 1``."""
    one = tirx.const(1, "int64")
    return te.max(te.min(x, (x + tirx.truncdiv(v, x)) >> one), one)


def isqrt_te(v: te.Tensor, name: str = "isqrt") -> te.Tensor:
    """``floor(sqrt(v))`` (``1`` where ``v == 0``) elementwise, for an int64 tensor ``0 <= v < 2**48``."""
    x = te.compute(v.shape, lambda *i: newton_step(tirx.const(ISQRT_START, "int64"), v[i]), name=f"{name}_1")
    for step in range(2, ISQRT_ITERATIONS + 1):
        x = _next_stage(x, v, f"{name}_{step}")
    return x


def _next_stage(x: te.Tensor, v: te.Tensor, name: str) -> te.Tensor:
    # A function, not a lambda in the loop: te.compute refuses default arguments that would pin ``x``.
    return te.compute(v.shape, lambda *i: newton_step(x[i], v[i]), name=name)
