"""TVM lowering of ``intq.IntMatMul`` and ``IntMatMulAcc`` (spec: ``quantizer/ops/matmul.py``).

    acc = a @ b                                          (int8 x int8 products, int32 sum)
    IntMatMul:    y = clamp((acc * m + 2**(s-1)) >> s, -128, 127)    (int8)
    IntMatMulAcc: y = acc                                             (int32)

``a``: int8 ``[..., M, K]``, ``b``: int8 ``[..., K, N]``, both at least 2-D;
the batch dims broadcast as in ``numpy.matmul`` (``add.broadcast_shape``:
symbolic dims that may be 1 at run time included), and any dim may be
symbolic, ``K`` included (``P @ V`` reduces over the sequence): the
reduction runs over a static ``K`` of either operand if there is one, else
over ``a``'s, and two different static ``K`` are refused.  ``m``, ``s``: int64 scalars (immediates when constant).  The
products are widened to int32 and summed in an int32 accumulator, exact for
``K <= MAX_K`` (``|acc| <= K * 2**14 < 2**31``), the bound that also makes
onnxruntime's ``MatMulInteger`` exact; a static ``K`` above it is refused.
``acc`` is widened to int64 before the requantize, as in the ONNX function.

One PrimFunc per node: the reduction block, and for ``IntMatMul`` the
elementwise requantize block.
"""

from __future__ import annotations

from intq.passes.compat import relax, te, tensor_type, tirx
from intq.passes.ops import dyadic
from intq.passes.ops.add import broadcast_index, broadcast_shape
from intq.passes.ops.base import (
    IntqConverter,
    Operand,
    check_trailing_broadcast,
    dtype_of,
    kernel_attrs,
    param_operand,
    read_param,
)

MAX_K = (2**31 - 1) // (128 * 128)  # quantizer.ops.linear.MAX_K, the longest reduction int32 holds exactly


def reduction_length(a_k: tirx.PrimExpr, b_k: tirx.PrimExpr) -> tirx.PrimExpr:
    """``K``: a static one of a's last and b's second-to-last dim if either is, else a's."""
    return b_k if isinstance(b_k, tirx.IntImm) and not isinstance(a_k, tirx.IntImm) else a_k


def int_matmul_te(a: te.Tensor, b: te.Tensor) -> te.Tensor:
    """``acc[..., i, j] = sum_k int32(a[..., i, k]) * int32(b[..., k, j])``, batch dims broadcast."""
    batch = broadcast_shape(a.shape[:-2], b.shape[:-2])
    rows = a.shape[-2]
    r = te.reduce_axis((0, reduction_length(a.shape[-1], b.shape[-2])), name="k")

    def body(*i):
        lhs = a[(*broadcast_index(a.shape[:-2], batch, i[:-2]), i[-2], r)].astype("int32")
        rhs = b[(*broadcast_index(b.shape[:-2], batch, i[:-2]), r, i[-1])].astype("int32")
        return te.sum(lhs * rhs, axis=r)

    return te.compute((*batch, rows, b.shape[-1]), body, name="acc")


def matmul_requantize_te(a: te.Tensor, b: te.Tensor, m: Operand, s: Operand) -> te.Tensor:
    acc = int_matmul_te(a, b)

    def body(*i):
        return dyadic.requantize(acc[i].astype("int64"), read_param(m, i), read_param(s, i), -128, 127, "int8")

    return te.compute(acc.shape, body, name="requantize")


class IntMatMulAcc(IntqConverter):
    op_type = "IntMatMulAcc"
    inputs = ("a", "b")

    @classmethod
    def check_operands(cls, node: str, args: dict[str, relax.Expr]) -> list[int | None]:
        """Check dtypes and shapes; return the static output shape (None where symbolic)."""
        a_shape, b_shape = (list(tensor_type(args[name]).shape.values) for name in ("a", "b"))
        for name, shape in (("a", a_shape), ("b", b_shape)):
            if dtype_of(args[name]) != "int8":
                raise cls.fail(node, f"{name} must be int8, got {dtype_of(args[name])}")
            if len(shape) < 2:
                raise cls.fail(node, f"{name} must be at least 2-D (a matrix or a batch of them), got shape {shape}")
        try:
            batch = broadcast_shape(a_shape[:-2], b_shape[:-2])
        except ValueError as err:
            raise cls.fail(node, f"the batch dims of a {a_shape} and b {b_shape}: {err}") from None
        a_k, b_k = a_shape[-1], b_shape[-2]
        if isinstance(a_k, tirx.IntImm) and isinstance(b_k, tirx.IntImm) and int(a_k) != int(b_k):
            raise cls.fail(
                node, f"a {a_shape} and b {b_shape} do not multiply: a's last dim must equal b's second to last"
            )
        k = reduction_length(a_k, b_k)
        if isinstance(k, tirx.IntImm) and int(k) > MAX_K:
            raise cls.fail(
                node,
                f"reduction length K={int(k)} can overflow the int32 accumulator (K * 128 * 128 >= 2**31); "
                f"K must stay <= {MAX_K}: split the reduction",
            )
        out = [*batch, a_shape[-2], b_shape[-1]]
        return [int(d) if isinstance(d, tirx.IntImm) else None for d in out]

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr]) -> relax.Expr:
        cls.check_operands(node, args)
        return bb.call_te(
            int_matmul_te,
            args["a"],
            args["b"],
            primfunc_name_hint="intq_matmul_acc",
            primfunc_attrs=kernel_attrs(cls.op_type),
        )


class IntMatMul(IntMatMulAcc):
    op_type = "IntMatMul"
    inputs = ("a", "b", "m", "s")

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr]) -> relax.Expr:
        out_shape = cls.check_operands(node, args)
        for name in ("m", "s"):
            check_trailing_broadcast(cls, node, name, args[name], out_shape)
        m, s = param_operand(args["m"]), param_operand(args["s"])
        return bb.call_te(
            matmul_requantize_te,
            args["a"],
            args["b"],
            m,
            s,
            primfunc_name_hint="intq_matmul",
            primfunc_attrs=kernel_attrs(cls.op_type, m=m, s=s),
        )
