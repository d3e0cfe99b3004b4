"""TVM lowering of ``intq.Requantize`` (spec: ``quantizer/ops/requantize.py``).

    y = clamp((x * m + 2**(s-1)) >> s, qmin, qmax)       (int8)

``x``: any integer dtype and rank (dims may be symbolic); ``m``, ``s``:
int64, a scalar or a tensor that broadcasts onto ``x`` without growing it
(in practice ``[]`` or ``[N]`` along the last axis).  ``x`` is widened to
int64 before the product; see ``dyadic`` for the shift.  One PrimFunc, one
elementwise block; a single-element ``m`` / ``s`` is an immediate.
``[qmin, qmax]`` is ``[-128, 127]``, or the range of the op type's suffix
(``Requantize_c0x15``: ``[0, 15]``), which must lie inside int8.
"""

from __future__ import annotations

from intq.passes.compat import relax, te
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

QMIN, QMAX = -128, 127


def requantize_te(x: te.Tensor, m: Operand, s: Operand, qmin: int, qmax: int, out_dtype: str) -> te.Tensor:
    def body(*i):
        return dyadic.requantize(x[i].astype("int64"), read_param(m, i), read_param(s, i), qmin, qmax, out_dtype)

    return te.compute(x.shape, body, name="requantize")


class Requantize(IntqConverter):
    op_type = "Requantize"
    inputs = ("x", "m", "s")
    qmin, qmax, out_dtype, ranged_dtype = QMIN, QMAX, "int8", "int8"

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr]) -> relax.Expr:
        x = args["x"]
        if dtype_of(x) not in ("int8", "int16", "int32", "int64"):
            raise cls.fail(node, f"x must be a signed integer tensor, got {dtype_of(x)}")
        qmin, qmax, out_dtype = cls.output_range(node)
        for name in ("m", "s"):
            check_trailing_broadcast(cls, node, name, args[name], static_shape(x))
        m, s = param_operand(args["m"]), param_operand(args["s"])
        return bb.call_te(
            requantize_te,
            x,
            m,
            s,
            qmin,
            qmax,
            out_dtype,
            primfunc_name_hint="intq_requantize",
            primfunc_attrs=kernel_attrs(cls.op_type, m=m, s=s),
        )
