"""Fuse a ``Requantize`` into the ``IntLinearAcc`` / ``IntMatMulAcc`` whose int32 output it only consumes.

    acc = call_tir(IntLinearAcc kernel, (x, w, b))       acc = call_tir(IntMatMulAcc kernel, (a, b))
    y   = call_tir(Requantize kernel, (acc[, m][, s]))   y   = call_tir(Requantize kernel, (acc[, m][, s]))
  ->
    y   = call_tir(IntLinear kernel, (x, w, b[, m][, s]))     y = call_tir(IntMatMul kernel, (a, b[, m][, s]))

    y = clamp(((x @ w.T + b) * m + 2**(s-1)) >> s, qmin, qmax)    (int8; IntLinear[_c<qmin>x<qmax>])
    y = clamp(((a @ b) * m + 2**(s-1)) >> s, -128, 127)           (int8; IntMatMul)

The replacement kernel is the one the ``IntLinear`` / ``IntMatMul``
converter builds (``linear.linear_requantize_te``,
``matmul.matmul_requantize_te``, tagged as that op), with the Requantize's
``m`` and ``s`` (a scalar, baked in, or one value per output channel) and
its clamp range: ``[-128, 127]``, or the range of a ``Requantize_c<lo>x<hi>``
(a fused ReLU, a 4-bit activation), which the linear then carries as
``IntLinear_c<lo>x<hi>``; ``x`` is widened to int64 before the product in
both forms.  The one change of order, ``IntLinearAcc``
adding the bias in int32 where ``IntLinear`` adds it after widening, gives
the same integer because the exporter proved ``|acc + b| < 2**31``
(``quantizer.ops.linear.accumulator_bound``): the outputs are bit-identical,
the int32 tensor between the kernels is gone.

Contract: run on a module from ``onnx_import.import_onnx`` (kernels tagged
with ``intq.op`` / ``intq.immediates``, see ``passes/ops/base.py``), before
``tvm.compile``.  A pair is left unchanged, the reason recorded in
``skipped`` under the accumulator's name, when the accumulator has another
use, when its consumer is not a ``Requantize`` (a ``Shiftmax`` reads it, as
in attention), or when the consumer has a clamp range the result op cannot
take (``IntMatMul`` clamps to ``[-128, 127]`` only).  ``fused`` lists the
accumulators folded away.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

from intq.passes.call_tir_rewrite import CallTirRewrite
from intq.passes.compat import relax, tvm
from intq.passes.ops import linear, matmul, requantize
from intq.passes.ops.base import IntqConverter, kernel_attrs, kernel_op, kernel_operands, split_range_suffix


class Fold(NamedTuple):
    """An accumulating op, the requantizing op it becomes with its Requantize, and how to build that kernel."""

    accumulator: type[IntqConverter]
    result: type[IntqConverter]
    te_func: Callable
    te_args: Callable[..., tuple]  # (accumulator's operands, m, s, qmin, qmax) -> te_func's arguments
    name: str  # the PrimFunc name hint of ``result``'s converter
    ranged: bool  # whether ``result`` takes a clamp range other than [-128, 127]


FOLDS = {
    fold.accumulator.op_type: fold
    for fold in (
        Fold(
            linear.IntLinearAcc,
            linear.IntLinear,
            linear.linear_requantize_te,
            lambda ops, m, s, qmin, qmax: (ops["x"], ops["w"], ops["b"], m, s, qmin, qmax, "int8"),
            "intq_intlinear",
            ranged=True,
        ),
        Fold(
            matmul.IntMatMulAcc,
            matmul.IntMatMul,
            matmul.matmul_requantize_te,
            lambda ops, m, s, qmin, qmax: (ops["a"], ops["b"], m, s),
            "intq_matmul",
            ranged=False,
        ),
    )
}


@tvm.transform.module_pass(opt_level=0, name="FuseRequantizeEpilogue")
class FuseRequantizeEpilogue(CallTirRewrite):
    """Fold each ``Requantize`` of a single-use accumulator into its producer; see the module docstring."""

    def rewrite(self, mod, bb, bindings, uses, call: relax.Call) -> relax.Expr:
        args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else []
        acc = args[0] if args else None
        producer = bindings.get(acc) if isinstance(acc, relax.Var) else None
        fold = FOLDS.get(kernel_op(mod, producer))
        if fold is None:
            return call
        reason = self.check(mod, call, acc, uses, fold)
        if reason is None:
            acc_ops = kernel_operands(mod[producer.args[0]], producer, fold.accumulator.inputs)
            rq_ops = kernel_operands(mod[call.args[0]], call, requantize.Requantize.inputs)
            if acc_ops is None or rq_ops is None:
                reason = "the kernels' arguments are not their ops' inputs"
        if reason:
            self.skipped[acc.name] = reason
            return call
        self.fused.append(acc.name)
        m, s = rq_ops["m"], rq_ops["s"]
        _, qmin, qmax = split_range_suffix(kernel_op(mod, call))
        suffix = "" if qmin is None else kernel_op(mod, call)[len(requantize.Requantize.op_type) :]
        qmin, qmax = (requantize.QMIN, requantize.QMAX) if qmin is None else (qmin, qmax)
        return bb.call_te(
            fold.te_func,
            *fold.te_args(acc_ops, m, s, qmin, qmax),
            primfunc_name_hint=fold.name,
            primfunc_attrs=kernel_attrs(fold.result.op_type + suffix, m=m, s=s),
        )

    @staticmethod
    def check(mod, call: relax.Call, acc: relax.Var, uses: Counter, fold: Fold) -> str | None:
        """Why ``acc`` cannot be fused with ``call``, or None."""
        if uses[acc] != 1:
            return f"the accumulator is used {uses[acc]} times"
        consumer = kernel_op(mod, call)
        base, qmin, qmax = split_range_suffix(consumer or "")
        if base != requantize.Requantize.op_type:
            return f"its consumer {call.args[0].name_hint} ({consumer or 'no intq.op'}) is not a Requantize"
        if qmin is not None and not fold.ranged:
            return (
                f"its consumer {consumer} clamps to [{qmin}, {qmax}]; "
                f"the {fold.result.op_type} kernel clamps to [-128, 127] only"
            )
        return None
