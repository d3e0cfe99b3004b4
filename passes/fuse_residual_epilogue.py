"""Fuse an ``IntLinear16`` into the ``IntAdd`` that is its only use: one kernel per residual connection.

    lin = call_tir(IntLinear16 kernel, (x, w, b[, m][, s]))
    y   = call_tir(IntAdd kernel, (other, lin[, m_a][, m_b][, s_a]))      (or lin first)
  ->
    y   = call_tir(fused kernel, (x, w, b[, m][, s], other[, m_a][, m_b][, s_a]))

    acc    = x @ w.T                                                        (int32)
    lin[i] = clamp(((acc[i] + b) * m + 2**(s-1)) >> s, -32768, 32767)      (int16, kept in a register)
    y[i]   = clamp((lin[i] * m_b + other[i'] * m_a + 2**(s_a-1)) >> s_a, -32768, 32767)

where ``i'`` is ``i`` under the IntAdd's broadcasting of ``other``.  The
fused kernel is built from the converters' own te pieces
(``linear.int_matmul_te``, ``linear.requantize_acc``, ``add.add_values``,
``add.broadcast_index``), so every integer, the int16 clamp of the linear
included, is the one the two kernels compute: the outputs are bit-identical
and only the int16 tensor between the kernels disappears.

Contract: run on a module from ``onnx_import.import_onnx`` (kernels tagged
with ``intq.op`` / ``intq.immediates``, see ``passes/ops/base.py``), before
``tvm.compile`` (whose default CPU pipeline does not fuse call_tir kernels).
A pair is left unchanged, the reason recorded in ``skipped`` under the
linear's output name, when the linear's output has another use, when its
consumer is not an ``IntAdd`` (``IntAdd_c<lo>x<hi>``, a CNN's int8 residual
add with its own clamp, is not: the fused kernel computes the int16 add),
or when the add broadcasts the linear's output
(the fused kernel computes the linear once per output element, at the
output's shape).  ``fused`` lists the linear outputs folded away.
"""

from __future__ import annotations

from collections import Counter

from intq.passes.call_tir_rewrite import CallTirRewrite
from intq.passes.compat import Analyzer, relax, te, tensor_type, tirx, tvm
from intq.passes.ops.add import IntAdd, add_values, broadcast_index
from intq.passes.ops.base import OP_ATTR, Operand, kernel_op, kernel_operands, split_range_suffix
from intq.passes.ops.linear import IntLinear16, int_matmul_te, requantize_acc

FUSED_OP = "IntLinear16+IntAdd"  # the intq.op of the fused kernel


def linear16_add_te(x, w, b, m: Operand, s: Operand, other, m_a: Operand, m_b: Operand, s_a: Operand, linear_at: int):
    """``IntAdd`` of ``other`` and ``IntLinear16(x, w, b, m, s)``, the linear being operand ``linear_at`` (0: a)."""
    acc = int_matmul_te(x, w)
    lo, hi, dtype = IntLinear16.qmin, IntLinear16.qmax, IntLinear16.out_dtype

    def body(*i):
        lin = requantize_acc(acc, b, m, s, i, lo, hi, dtype).astype("int64")
        rest = other[broadcast_index(other.shape, acc.shape, i)].astype("int64")
        return add_values(*((lin, rest) if linear_at == 0 else (rest, lin)), m_a, m_b, s_a, i)

    return te.compute(acc.shape, body, name="add")


def same_shape(lhs: relax.Expr, rhs: relax.Expr) -> bool:
    a, b = tensor_type(lhs).shape.values, tensor_type(rhs).shape.values
    analyzer = Analyzer()
    return len(a) == len(b) and all(analyzer.can_prove_equal(x, y) for x, y in zip(a, b, strict=True))


def dims(expr: relax.Expr) -> str:
    """A tensor's shape as a user reads it: ``[n, 3]``."""
    values = tensor_type(expr).shape.values
    return "[" + ", ".join(str(int(d)) if isinstance(d, tirx.IntImm) else str(d) for d in values) + "]"


@tvm.transform.module_pass(opt_level=0, name="FuseResidualEpilogue")
class FuseResidualEpilogue(CallTirRewrite):
    """Fold each single-use ``IntLinear16`` into its ``IntAdd``; see the module docstring."""

    def rewrite(self, mod, bb, bindings, uses, call: relax.Call) -> relax.Expr:
        args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else []
        for pos, arg in enumerate(args[:2]):
            lin = bindings.get(arg) if isinstance(arg, relax.Var) else None
            if lin is None or kernel_op(mod, lin) != IntLinear16.op_type:
                continue
            reason = self.check(mod, call, arg, uses)
            if reason:
                self.skipped[arg.name] = reason
                continue
            lin_ops = kernel_operands(mod[lin.args[0]], lin, IntLinear16.inputs)
            add_ops = kernel_operands(mod[call.args[0]], call, IntAdd.inputs)
            if lin_ops is None or add_ops is None:
                self.skipped[arg.name] = "the kernels' arguments are not their ops' inputs"
                continue
            self.fused.append(arg.name)
            linear = [lin_ops[name] for name in IntLinear16.inputs]
            add = [add_ops["b" if pos == 0 else "a"], add_ops["m_a"], add_ops["m_b"], add_ops["s"]]
            return bb.call_te(
                linear16_add_te,
                *linear,
                *add,
                pos,
                primfunc_name_hint="intq_linear16_add",
                primfunc_attrs={OP_ATTR: FUSED_OP},
            )
        return call

    @staticmethod
    def check(mod, call: relax.Call, lin: relax.Var, uses: Counter) -> str | None:
        """Why ``lin`` cannot be fused into ``call``, or None."""
        if uses[lin] != 1:
            return f"the linear's output is used {uses[lin]} times"
        consumer = kernel_op(mod, call)
        base, qmin, qmax = split_range_suffix(consumer or "")
        if base == IntAdd.op_type and qmin is not None:
            return (
                f"its consumer {consumer} clamps to [{qmin}, {qmax}] in int8; "
                "the fused kernel computes the int16 IntAdd"
            )
        if consumer != IntAdd.op_type:
            return f"its consumer {call.args[0].name_hint} ({consumer or 'no intq.op'}) is not an IntAdd"
        if not same_shape(lin, call):
            return f"the IntAdd broadcasts the linear's output {dims(lin)} to {dims(call)}"
        return None
