"""TVM lowering of ``intq.IntLinear``, ``IntLinear16``, ``IntLinearAcc`` (spec: ``quantizer/ops/linear.py``).

    acc = x @ w.T                                        (int8 x int8 products, int32 sum)
    IntLinear:    y = clamp(((acc + b) * m + 2**(s-1)) >> s, qmin, qmax)    (int8; bias added in int64)
    IntLinear16:  y = clamp(((acc + b) * m + 2**(s-1)) >> s, -32768, 32767)  (int16)
    IntLinearAcc: y = acc + b                                                (int32)

``x``: int8 ``[..., K]`` (leading dims may be symbolic); ``w``: int8
``[N, K]`` (the ``nn.Linear`` layout, read as ``w[n, k]``, no transpose
materialized); ``b``: int32 ``[N]``; ``m``, ``s``: int64, ``[N]`` or a
scalar.  The products are widened to int32 and summed in an int32
accumulator: exact, because the exporter's constructor proved ``|acc + b| <
2**31`` for the reduction length (``accumulator_bound``), the same argument
that makes onnxruntime's ``MatMulInteger`` exact.  As in the ONNX function,
the requantizing forms add the bias in int64 after widening; the
accumulating form adds it in int32.

``IntLinear``'s ``[qmin, qmax]`` is ``[-128, 127]`` or the range of its op
type's suffix (``IntLinear_c0x15``), inside int8.

One PrimFunc per node with two blocks: the reduction (``acc``) and the
elementwise epilogue (bias, requantize, cast).
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
    split_range_suffix,
    static_shape,
)


def int_matmul_te(x: te.Tensor, w: te.Tensor) -> te.Tensor:
    """``acc[..., n] = sum_k int32(x[..., k]) * int32(w[n, k])``."""
    n, k = w.shape
    r = te.reduce_axis((0, k), name="k")

    def body(*i):
        return te.sum(x[(*i[:-1], r)].astype("int32") * w[i[-1], r].astype("int32"), axis=r)

    return te.compute((*x.shape[:-1], n), body, name="acc")


def requantize_acc(acc: te.Tensor, b, m: Operand, s: Operand, index: tuple, qmin: int, qmax: int, out_dtype: str):
    """The requantizing epilogue at output ``index``: bias added in int64, then the dyadic requantize."""
    total = acc[index].astype("int64") + b[index[-1]].astype("int64")
    return dyadic.requantize(total, read_param(m, index), read_param(s, index), qmin, qmax, out_dtype)


def linear_requantize_te(x, w, b, m: Operand, s: Operand, qmin: int, qmax: int, out_dtype: str) -> te.Tensor:
    acc = int_matmul_te(x, w)
    return te.compute(acc.shape, lambda *i: requantize_acc(acc, b, m, s, i, qmin, qmax, out_dtype), name="requantize")


def linear_acc_te(x, w, b) -> te.Tensor:
    acc = int_matmul_te(x, w)
    return te.compute(acc.shape, lambda *i: acc[i] + b[i[-1]], name="bias")


class _LinearConverter(IntqConverter):
    @classmethod
    def check_operands(cls, node: str, args: dict[str, relax.Expr]) -> list[int | None]:
        """Check dtypes and shapes; return the static output shape (None where symbolic)."""
        x, w, b = args["x"], args["w"], args["b"]
        for name, expected in (("x", "int8"), ("w", "int8"), ("b", "int32")):
            if dtype_of(args[name]) != expected:
                raise cls.fail(node, f"{name} must be {expected}, got {dtype_of(args[name])}")
        w_shape, x_shape = static_shape(w), static_shape(x)
        if len(w_shape) != 2 or None in w_shape:
            raise cls.fail(node, f"w must be a static [N, K] tensor, got shape {w_shape}")
        n, k = w_shape
        if not x_shape or x_shape[-1] != k:
            raise cls.fail(node, f"x must have a static last dim K={k} (the weight's), got shape {x_shape}")
        if static_shape(b) != [n]:
            raise cls.fail(node, f"b must have shape [{n}], got {static_shape(b)}")
        return [*x_shape[:-1], n]


class IntLinear(_LinearConverter):
    op_type = "IntLinear"
    inputs = ("x", "w", "b", "m", "s")
    qmin, qmax, out_dtype, ranged_dtype = -128, 127, "int8", "int8"

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr]) -> relax.Expr:
        qmin, qmax, out_dtype = cls.output_range(node)
        out_shape = cls.check_operands(node, args)
        for name in ("m", "s"):
            check_trailing_broadcast(cls, node, name, args[name], out_shape)
        m, s = param_operand(args["m"]), param_operand(args["s"])
        return bb.call_te(
            linear_requantize_te,
            args["x"],
            args["w"],
            args["b"],
            m,
            s,
            qmin,
            qmax,
            out_dtype,
            primfunc_name_hint=f"intq_{split_range_suffix(cls.op_type)[0].lower()}",
            primfunc_attrs=kernel_attrs(cls.op_type, m=m, s=s),
        )


class IntLinear16(IntLinear):
    op_type = "IntLinear16"
    qmin, qmax, out_dtype, ranged_dtype = -32768, 32767, "int16", None


class IntLinearAcc(_LinearConverter):
    op_type = "IntLinearAcc"
    inputs = ("x", "w", "b")

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr]) -> relax.Expr:
        cls.check_operands(node, args)
        return bb.call_te(
            linear_acc_te,
            args["x"],
            args["w"],
            args["b"],
            primfunc_name_hint="intq_linear_acc",
            primfunc_attrs=kernel_attrs(cls.op_type),
        )
