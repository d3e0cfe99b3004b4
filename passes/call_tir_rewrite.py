"""The driver the epilogue-fusion passes share.

``CallTirRewrite`` visits every ``call_tir`` of every Relax function of a
module, hands it to ``rewrite(mod, bb, bindings, uses, call)`` (a subclass's
rule, which returns the call unchanged when a guard fails and records why in
``skipped``), and, when anything was folded, drops the bindings and kernels
that became dead.
"""

from __future__ import annotations

from collections import Counter

from tvm.relax.dpl import GlobalVarPattern, is_op, rewrite_call, wildcard

from intq.passes.compat import relax, tvm


def use_counts(func: relax.Function) -> Counter:
    """How many times each variable of ``func`` is read."""
    counts: Counter = Counter()
    relax.analysis.post_order_visit(func.body, lambda e: isinstance(e, relax.Var) and counts.update([e]))
    return counts


class CallTirRewrite:
    """Base of a module pass that rewrites ``call_tir`` bindings one at a time."""

    def __init__(self):
        self.pattern = is_op("relax.call_tir")(GlobalVarPattern(), wildcard())
        self.fused: list[str] = []
        self.skipped: dict[str, str] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self.fused, self.skipped = [], {}
        bb = relax.BlockBuilder(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                bindings, uses = relax.analysis.get_var2val(func), use_counts(func)

                def rewriter(call, _matchings, bindings=bindings, uses=uses):
                    if not isinstance(call, relax.Call):  # the matcher also offers a variable bound to a match
                        return call
                    return self.rewrite(mod, bb, bindings, uses, call)

                bb.update_func(gv, rewrite_call(self.pattern, rewriter, func))
        if not self.fused:
            return mod
        entries = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function)]
        return relax.transform.DeadCodeElimination(entries)(bb.get())

    def rewrite(self, mod, bb, bindings, uses, call: relax.Call) -> relax.Expr:  # pragma: no cover - abstract
        raise NotImplementedError
