"""TVM lowerings of the ``intq`` ONNX domain, one module per op family.

``CONVERTERS`` maps each ``intq`` op type with a lowering to its converter
class; ``onnx_import`` hands them to the ONNX frontend.
"""

from __future__ import annotations

from intq.passes.ops.add import IntAdd
from intq.passes.ops.base import INTQ_DOMAIN, IntqConverter, IntqLoweringError
from intq.passes.ops.conv import IntConv2d
from intq.passes.ops.layernorm import ILayerNorm
from intq.passes.ops.linear import IntLinear, IntLinear16, IntLinearAcc
from intq.passes.ops.lookup import IntLookup
from intq.passes.ops.matmul import IntMatMul, IntMatMulAcc
from intq.passes.ops.mul import IntMul
from intq.passes.ops.requantize import Requantize
from intq.passes.ops.shiftgelu import ShiftGELU
from intq.passes.ops.shiftmax import MaskedShiftmax, Shiftmax
from intq.passes.ops.unpack_int4 import UnpackInt4

CONVERTERS: dict[str, type[IntqConverter]] = {
    cls.op_type: cls for cls in (Requantize, IntLinear, IntLinear16, IntLinearAcc, Shiftmax, ShiftGELU)
}
CONVERTERS.update({cls.op_type: cls for cls in (IntMatMul, IntMatMulAcc, IntAdd, IntConv2d)})

CONVERTERS[ILayerNorm.op_type] = ILayerNorm
CONVERTERS[UnpackInt4.op_type] = UnpackInt4
CONVERTERS[MaskedShiftmax.op_type] = MaskedShiftmax
CONVERTERS[IntLookup.op_type] = IntLookup
CONVERTERS[IntMul.op_type] = IntMul

__all__ = ["CONVERTERS", "INTQ_DOMAIN", "IntqConverter", "IntqLoweringError"]
