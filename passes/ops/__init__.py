"""TVM lowerings of the ``intq`` ONNX domain, one module per op family.

``CONVERTERS`` maps each ``intq`` op type with a lowering to its converter
class; ``onnx_import`` hands them to the ONNX frontend.
"""

from __future__ import annotations

from intq.passes.ops.base import INTQ_DOMAIN, IntqConverter, IntqLoweringError
from intq.passes.ops.linear import IntLinear, IntLinear16, IntLinearAcc
from intq.passes.ops.requantize import Requantize

CONVERTERS: dict[str, type[IntqConverter]] = {
    cls.op_type: cls for cls in (Requantize, IntLinear, IntLinear16, IntLinearAcc)
}

__all__ = ["CONVERTERS", "INTQ_DOMAIN", "IntqConverter", "IntqLoweringError"]
