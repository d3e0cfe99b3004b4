"""TVM lowering of ``intq.IntAdd`` (spec: ``quantizer/ops/add.py``).

    y = clamp((a * m_a + b * m_b + 2**(s-1)) >> s, -32768, 32767)    (int16; op type IntAdd)
    y = clamp((a * m_a + b * m_b + 2**(s-1)) >> s, qmin, qmax)        (int8; IntAdd_c<qmin>x<qmax>)

``a``, ``b``: int8 or int16 (independently), any rank, broadcast as in
numpy; ``m_a``, ``m_b``: int64, a scalar or one value per channel of the
output's last axis; ``s``: the one int64 shift of both products.  Both
inputs are widened to int64 before their products, the sum is exact
(``|a*m_a + b*m_b| + 2**(s-1) < 2**62``, the constructor's margin), and it is
rounded once by the shared requantize primitive with multiplier 1.  One
PrimFunc, one elementwise block; single-element params are immediates.
The default is the int16 residual stream of a transformer; an op type with
a clamp range suffix (``IntAdd_c0x127``: a CNN's residual add with the
ReLU fused as the clamp) has that range, which must lie inside int8, and an
int8 output.

Broadcasting (``broadcast_shape``, ``broadcast_index``) follows ONNX (numpy)
on every shape ONNX accepts, symbolic dims included.  Aligned dims that are
provably equal, or a static 1, are resolved when the kernel is built.  A
symbolic dim facing a different one (``seq`` against 65, ``n`` against
``k``) is 1 or the common size only at run time: the output dim is the
static one (else the ``max``) and the read index is ``d == 1 ? 0 : i``, a
loop-invariant select.  Shapes that ONNX refuses at run time (a symbolic 3
against 5) are refused at run time too: the kernel asserts that each such
dim is 1 or the output's (``broadcast_checks``; the call raises
``ValueError`` naming the node); two different static dims are refused at
import.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from intq.passes.compat import Analyzer, relax, te, tensor_type, tirx
from intq.passes.ops import dyadic
from intq.passes.ops.base import (
    IntqConverter,
    Operand,
    check_trailing_broadcast,
    dtype_of,
    kernel_attrs,
    param_operand,
    read_param,
)
from intq.passes.runtime_checks import checks_attrs

QMIN, QMAX = -32768, 32767
INPUT_DTYPES = ("int8", "int16")


def _is_one(dim: tirx.PrimExpr) -> bool:
    return isinstance(dim, tirx.IntImm) and int(dim) == 1


def broadcast_shape(*shapes: Sequence[tirx.PrimExpr]) -> list[tirx.PrimExpr]:
    """The numpy broadcast of ``shapes`` (trailing dims aligned); ``ValueError`` on two different static dims."""
    analyzer = Analyzer()
    out = []
    for axis in range(-max(len(shape) for shape in shapes), 0):
        dims = [shape[axis] for shape in shapes if len(shape) >= -axis]
        wide = [d for d in dims if not _is_one(d)]
        static = [d for d in wide if isinstance(d, tirx.IntImm)]
        if len({int(d) for d in static}) > 1:
            raise ValueError(f"dims {[int(d) for d in static]} at axis {axis} do not broadcast")
        if static:
            out.append(static[0])
            continue
        dim = wide[0] if wide else dims[0]
        for d in wide[1:]:
            if not analyzer.can_prove_equal(d, dim):
                dim = analyzer.simplify(te.max(dim, d))  # each is 1 or the common size at run time
        out.append(dim)
    return out


def broadcast_index(shape: Sequence[tirx.PrimExpr], out_shape: Sequence[tirx.PrimExpr], index: Sequence) -> tuple:
    """The element of a tensor of ``shape`` that broadcasts to ``index`` of ``out_shape`` (trailing dims aligned)."""
    analyzer = Analyzer()
    lead = len(out_shape) - len(shape)
    read = []
    for dim, out_dim, i in zip(shape, out_shape[lead:], index[lead:], strict=True):
        if _is_one(dim):
            read.append(tirx.const(0, i.ty.dtype))
        elif analyzer.can_prove_equal(dim, out_dim):
            read.append(i)
        else:
            read.append(tirx.if_then_else(dim == 1, tirx.const(0, i.ty.dtype), i))
    return tuple(read)


def _dim_text(dim: tirx.PrimExpr) -> str:
    """``min(seq, 64)`` for the TVMScript ``T.min(seq, T.int64(64))``."""
    return re.sub(r"T\.int(?:32|64)\((-?\d+)\)", r"\1", str(dim)).replace("T.", "")


def broadcast_checks(op_type: str, node: str, shapes: Sequence[Sequence[tirx.PrimExpr]]) -> list[dict]:
    """The run-time checks (``passes/runtime_checks.py``) of a kernel whose inputs 0, 1, ... of ``shapes``
    broadcast to its output (its last param): one per input axis whose size is known neither to be 1 nor
    to equal the output's; there ``broadcast_index`` reads at 0 when the size is 1, else at the output's
    index, which is right only when the size is the output's."""
    from intq.passes.runtime_checks import broadcast_check

    analyzer = Analyzer()
    out = broadcast_shape(*shapes)
    checks = []
    for k, shape in enumerate(shapes):
        lead = len(out) - len(shape)
        for axis, dim in enumerate(shape):
            if _is_one(dim) or analyzer.can_prove_equal(dim, out[lead + axis]):
                continue
            message = (
                f"{op_type} {node!r}: its inputs' shapes do not broadcast: axis {axis} of input {'ab'[k]} "
                f"({_dim_text(dim)}) is neither 1 nor the output's size ({_dim_text(out[lead + axis])}); "
                "onnxruntime refuses such "
                "inputs too. A common cause: a sequence longer than the model's position table, or inputs "
                "whose shared dims differ"
            )
            checks.append(broadcast_check(k, axis, -1, lead + axis, message))
    return checks


def add_values(
    wide_a: tirx.PrimExpr,
    wide_b: tirx.PrimExpr,
    m_a: Operand,
    m_b: Operand,
    s: Operand,
    index: tuple,
    qmin: int = QMIN,
    qmax: int = QMAX,
    out_dtype: str = "int16",
):
    """The sum at output ``index`` of the operand values ``wide_a``, ``wide_b`` (already int64); int16 by default."""
    total = wide_a * read_param(m_a, index) + wide_b * read_param(m_b, index)
    return dyadic.requantize(total, tirx.const(1, "int64"), read_param(s, index), qmin, qmax, out_dtype)


def add_te(
    a: te.Tensor,
    b: te.Tensor,
    m_a: Operand,
    m_b: Operand,
    s: Operand,
    qmin: int = QMIN,
    qmax: int = QMAX,
    out_dtype: str = "int16",
) -> te.Tensor:
    shape = broadcast_shape(a.shape, b.shape)

    def body(*i):
        wide_a = a[broadcast_index(a.shape, shape, i)].astype("int64")
        wide_b = b[broadcast_index(b.shape, shape, i)].astype("int64")
        return add_values(wide_a, wide_b, m_a, m_b, s, i, qmin, qmax, out_dtype)

    return te.compute(shape, body, name="add")


class IntAdd(IntqConverter):
    op_type = "IntAdd"
    inputs = ("a", "b", "m_a", "m_b", "s")
    qmin, qmax, out_dtype, ranged_dtype = QMIN, QMAX, "int16", "int8"

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr]) -> relax.Expr:
        for name in ("a", "b"):
            if dtype_of(args[name]) not in INPUT_DTYPES:
                raise cls.fail(node, f"{name} must be int8 or int16, got {dtype_of(args[name])}")
        shapes = [tensor_type(args[name]).shape.values for name in ("a", "b")]
        try:
            out = broadcast_shape(*shapes)
        except ValueError as err:
            raise cls.fail(node, f"a {list(shapes[0])} and b {list(shapes[1])}: {err}") from None
        out_static = [int(d) if isinstance(d, tirx.IntImm) else None for d in out]
        for name in ("m_a", "m_b", "s"):
            check_trailing_broadcast(cls, node, name, args[name], out_static)
        m_a, m_b, s = (param_operand(args[name]) for name in ("m_a", "m_b", "s"))
        qmin, qmax, out_dtype = cls.output_range(node)
        return bb.call_te(
            add_te,
            args["a"],
            args["b"],
            m_a,
            m_b,
            s,
            qmin,
            qmax,
            out_dtype,
            primfunc_name_hint="intq_add",
            primfunc_attrs={
                **kernel_attrs(cls.op_type, m_a=m_a, m_b=m_b, s=s),
                **checks_attrs(broadcast_checks(cls.op_type, node, shapes)),
            },
        )
