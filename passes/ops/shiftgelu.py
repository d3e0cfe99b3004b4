"""TVM lowering of ``intq.ShiftGELU`` (spec: ``quantizer/ops/shiftgelu.py``).

Elementwise, in int64::

    mx  = max(x, 0)
    ea  = shift_exp(x - mx, D);  eb = shift_exp(-mx, D)
    sig = clamp((ea * (2**62 // (ea + eb)) + 2**54) >>u 55, 0, 127)
    y   = clamp((x * sig * m + 2**(s-1)) >> s, -128, 127)         (int8)

``x``: int8 or int16, any rank, dims may be symbolic; ``D``, ``m``, ``s``:
int64 scalars (immediates when constant) or buffers that broadcast onto
``x``.  One PrimFunc, one elementwise block.  ``sig`` is Shiftmax's
``normalize`` (same truncating division, same unsigned shift as the ONNX
``normalize_onnx``); ``y`` is the dyadic requantize, whose signed shift
equals the ONNX ``floor_shift`` because ``|x * sig * m| < 2**15 * 2**7 *
2**24 = 2**46`` stays inside its ``2**62`` margin.  That bound is why int32
inputs are refused: the ONNX form would leave its margin.
"""

from __future__ import annotations

from intq.passes.compat import relax, te, tirx
from intq.passes.ops import dyadic
from intq.passes.ops.base import (
    IntqConverter,
    Operand,
    check_trailing_broadcast,
    dtype_of,
    kernel_attrs,
    param_operand,
    read_param,
    static_shape,
)
from intq.passes.ops.shift_exp import check_divisor, shift_exp
from intq.passes.ops.shiftmax import normalize, row_factor

QMIN, QMAX = -128, 127
INPUT_DTYPES = ("int8", "int16")


def shift_sigmoid(x: tirx.PrimExpr, D: tirx.PrimExpr) -> tirx.PrimExpr:
    """``sig`` in ``[0, 127]`` (int64, scale 1/128) ``~ sigmoid(x / D)`` of an int64 expression ``x``."""
    mx = te.max(x, tirx.const(0, "int64"))
    ea = shift_exp(x - mx, D)
    eb = shift_exp(-mx, D)
    return normalize(ea, row_factor(ea + eb))


def shiftgelu_te(x: te.Tensor, D: Operand, m: Operand, s: Operand) -> te.Tensor:
    def body(*i):
        xi = x[i].astype("int64")
        sig = shift_sigmoid(xi, read_param(D, i))
        return dyadic.requantize(xi * sig, read_param(m, i), read_param(s, i), QMIN, QMAX, "int8")

    return te.compute(x.shape, body, name="shiftgelu")


class ShiftGELU(IntqConverter):
    op_type = "ShiftGELU"
    inputs = ("x", "D", "m", "s")

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr]) -> relax.Expr:
        x = args["x"]
        if dtype_of(x) not in INPUT_DTYPES:
            raise cls.fail(node, f"x must be int8 or int16, got {dtype_of(x)}; requantize it first")
        shape = static_shape(x)
        params = {name: param_operand(args[name]) for name in ("D", "m", "s")}
        for name, value in params.items():
            if not isinstance(value, int):
                check_trailing_broadcast(cls, node, name, value, shape)
        if isinstance(params["D"], int):
            check_divisor(cls, node, params["D"])
        return bb.call_te(
            shiftgelu_te,
            x,
            *params.values(),
            primfunc_name_hint="intq_shiftgelu",
            primfunc_attrs=kernel_attrs(cls.op_type),
        )
