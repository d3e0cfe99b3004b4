"""TVM lowering of ``intq.IntMul`` (spec: ``quantizer/ops/mul.py``).

    y = clamp((int64(a) * int64(b) * m + 2**(s-1)) >> s, qmin, qmax)        (int8)

``a``, ``b``: int8 or int16, any rank, broadcast as in numpy
(``add.broadcast_shape`` / ``broadcast_index``, symbolic dims included,
two different static dims refused at import); ``m``, ``s``: int64 scalars,
immediates when constant.  One PrimFunc, one elementwise block ``mul``;
the same requantize primitive as every other op (``dyadic.requantize``),
exact because ``|a * b * m| + 2**(s-1) < 2**62`` (the spec's bound).  An
op type with a range suffix (``IntMul_c0x127``) clamps to that range.
"""

from __future__ import annotations

from intq.passes.compat import relax, te, tensor_type
from intq.passes.ops import dyadic
from intq.passes.ops.add import broadcast_checks, broadcast_index, broadcast_shape
from intq.passes.ops.base import IntqConverter, Operand, dtype_of, kernel_attrs, param_operand, read_param
from intq.passes.runtime_checks import checks_attrs

INPUT_DTYPES = ("int8", "int16")


def mul_te(a: te.Tensor, b: te.Tensor, m: Operand, s: Operand, qmin: int = -128, qmax: int = 127) -> te.Tensor:
    shape = broadcast_shape(a.shape, b.shape)

    def body(*i):
        product = a[broadcast_index(a.shape, shape, i)].astype("int64") * b[broadcast_index(b.shape, shape, i)].astype(
            "int64"
        )
        return dyadic.requantize(product, read_param(m, i), read_param(s, i), qmin, qmax, "int8")

    return te.compute(shape, body, name="mul")


class IntMul(IntqConverter):
    op_type = "IntMul"
    inputs = ("a", "b", "m", "s")
    ranged_dtype = "int8"

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr]) -> relax.Expr:
        for name in ("a", "b"):
            if dtype_of(args[name]) not in INPUT_DTYPES:
                raise cls.fail(node, f"{name} must be int8 or int16, got {dtype_of(args[name])}")
        shapes = [tensor_type(args[name]).shape.values for name in ("a", "b")]
        try:
            broadcast_shape(*shapes)
        except ValueError as err:
            raise cls.fail(node, f"a {list(shapes[0])} and b {list(shapes[1])}: {err}") from None
        m, s = param_operand(args["m"]), param_operand(args["s"])
        if not (isinstance(m, int) and isinstance(s, int)):
            raise cls.fail(node, "m and s must be constant scalars (one multiplier for the tensor)")
        if not 1 <= s <= 62:
            raise cls.fail(node, f"s = {s} lies outside [1, 62]; re-export the model (dyadic computes s)")
        qmin, qmax, _ = cls.output_range(node)
        return bb.call_te(
            mul_te,
            args["a"],
            args["b"],
            m,
            s,
            qmin,
            qmax,
            primfunc_name_hint="intq_mul",
            primfunc_attrs={
                **kernel_attrs(cls.op_type, m=m, s=s),
                **checks_attrs(broadcast_checks(cls.op_type, node, shapes)),
            },
        )
