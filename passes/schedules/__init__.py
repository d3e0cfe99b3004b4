"""Hand schedules for the ``intq`` kernels: ``schedule_module(mod, target)``, run just before ``tvm.compile``.

The converters (``passes/ops``) build each kernel as a plain te PrimFunc,
tagged with its op (``intq.op``, see ``passes/ops/base.py``).  This package
maps an op to the schedule of its kernel, in two registries keyed by that
tag:

- ``SCHEDULES[op]``: ``fn(func, target) -> PrimFunc | str``, a schedule of
  the kernel itself, same signature and semantics (elementwise kernels);
  ``schedule_with(fn)`` makes one of a ``fn(sch: s_tir.Schedule) -> None``;
- ``CALL_REWRITES[op]``: ``fn(kernel_call) -> relax.Expr | str``, for a
  kernel whose schedule changes its call: it replaces the whole
  ``call_tir`` (``gemm``: the weight constant packed at compile time, the
  batch dims flattened), emitting through ``kernel_call.builder``.

Either returns a string, the reason it does not apply, to leave the kernel
as it is; ``ScheduleKernels.skipped`` keeps the reasons by kernel name,
``scheduled`` the kernels changed.  A scheduled kernel is tagged
``intq.schedule`` (never scheduled twice) and ``op_pattern`` opaque, so that
TVM's CPU pipeline (``LegalizeOps``, ``AnnotateTIROpPattern``, ``FuseOps``,
``FuseTIR``, then TIR lowering, which keeps a schedule as it is) does not
merge it into a neighbour.  A rewritten call's kernel carries
``intq.scheduled_op`` instead of ``intq.op``: its arguments (the packed
weight) are no longer the op's inputs, so the epilogue fusion passes must
not read it as the op; run them before this.

Contract: the module comes from ``onnx_import.import_onnx`` (and the fusion
passes); the target is the one ``tvm.compile`` gets.  Kernels of ops with
no entry, and every kernel for a non-LLVM target, are left unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from intq.passes.compat import constant_value, relax, s_tir, tirx, tvm
from intq.passes.ops.base import OP_ATTR
from intq.passes.schedules import gemm

SCHEDULE_ATTR = "intq.schedule"  # PrimFunc attr: the name of the schedule applied


@dataclass
class KernelCall:
    """One ``call_tir`` of a kernel, as a call rewrite sees it."""

    name: str  # the kernel's GlobalVar name
    func: tirx.PrimFunc
    call: relax.Call
    args: tuple[relax.Expr, ...]  # the call_tir's input arguments
    constants: tuple[np.ndarray | None, ...]  # each argument's value when it is a constant
    target: tvm.target.Target
    builder: relax.BlockBuilder  # emits the bindings a rewrite needs, adds its PrimFuncs
    memo: dict = field(default_factory=dict)  # shared by the calls of one pass run (schedule a kernel once)


PrimFuncSchedule = Callable[[tirx.PrimFunc, tvm.target.Target], "tirx.PrimFunc | str"]
CallRewrite = Callable[[KernelCall], "relax.Expr | str"]

SCHEDULES: dict[str, PrimFuncSchedule] = {}
CALL_REWRITES: dict[str, CallRewrite] = {
    op: gemm.rewrite_linear_call for op in ("IntLinear", "IntLinear16", "IntLinearAcc", "IntLinear16+IntAdd")
}


def schedule_with(fn: Callable[[s_tir.Schedule], None]) -> PrimFuncSchedule:
    """A ``SCHEDULES`` entry applying ``fn`` to a ``Schedule`` of the kernel (the kernel keeps its attrs)."""

    def schedule(func: tirx.PrimFunc, _target: tvm.target.Target) -> tirx.PrimFunc:
        sch = s_tir.Schedule(func)
        fn(sch)
        out = sch.mod["main"]
        return out if "global_symbol" in (func.attrs or {}) else out.without_attr("global_symbol")

    schedule.__name__ = schedule.__qualname__ = getattr(fn, "__name__", "schedule")
    schedule.__module__ = getattr(fn, "__module__", __name__)
    return schedule


def _register_row_and_attention_schedules() -> None:
    from intq.passes.schedules import batch_matmul, rows

    SCHEDULES.update(
        {
            "Shiftmax": schedule_with(rows.schedule_shiftmax),
            "ILayerNorm": schedule_with(rows.schedule_layernorm),
            "ShiftGELU": schedule_with(rows.schedule_shiftgelu),
            "IntAdd": schedule_with(rows.schedule_add),
            "Requantize": schedule_with(rows.schedule_requantize),
            "IntMatMul": schedule_with(batch_matmul.schedule_batch_matmul),
            "IntMatMulAcc": schedule_with(batch_matmul.schedule_batch_matmul),
        }
    )


_register_row_and_attention_schedules()


def kernel_op(func) -> str | None:
    """The ``intq.op`` of an unscheduled kernel, else None."""
    attrs = func.attrs if isinstance(func, tirx.PrimFunc) and func.attrs else {}
    return str(attrs[OP_ATTR]) if OP_ATTR in attrs and SCHEDULE_ATTR not in attrs else None


@relax.expr_functor.mutator
class _CallRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target, owner: ScheduleKernels):
        super().__init__(mod)
        self.mod, self.target, self.owner, self.memo = mod, target, owner, {}
        self.call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not call.op.same_as(self.call_tir) or not isinstance(call.args[1], relax.Tuple):
            return call
        gv = call.args[0]
        func = self.mod.functions.get(gv)
        rewrite = CALL_REWRITES.get(kernel_op(func))
        if rewrite is None:
            return call
        args = tuple(call.args[1].fields)
        constants = tuple(constant_value(self._value(a)) for a in args)
        kc = KernelCall(gv.name_hint, func, call, args, constants, self.target, self.builder_, self.memo)
        out = rewrite(kc)
        if isinstance(out, str):
            self.owner.skipped[gv.name_hint] = out
            return call
        self.owner.scheduled.setdefault(gv.name_hint, getattr(rewrite, "__module__", "").rpartition(".")[2])
        return out

    def _value(self, expr: relax.Expr) -> relax.Expr:
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        return bound if bound is not None else expr


@tvm.transform.module_pass(opt_level=0, name="ScheduleKernels")
class ScheduleKernels:
    """Apply the registered schedules for ``target``; see the module docstring."""

    def __init__(self, target: tvm.target.Target):
        self.target = target
        self.scheduled: dict[str, str] = {}  # kernel name -> the schedule's module
        self.skipped: dict[str, str] = {}  # kernel name -> why it was left unscheduled

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self.scheduled, self.skipped = {}, {}
        if self.target.kind.name != "llvm":
            return mod
        rewriter = _CallRewriter(mod, self.target, self)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        out = rewriter.builder_.get()
        for gv, func in list(out.functions.items()):
            schedule = SCHEDULES.get(kernel_op(func))
            if schedule is None:
                continue
            new = schedule(func, self.target)
            if isinstance(new, str):
                self.skipped[gv.name_hint] = new
                continue
            out[gv] = new.with_attr(SCHEDULE_ATTR, getattr(schedule, "__name__", "schedule"))
            self.scheduled[gv.name_hint] = getattr(schedule, "__module__", "").rpartition(".")[2]
        if any(name in self.scheduled for name in (gv.name_hint for gv in mod.get_global_vars())):
            entries = [gv.name_hint for gv, f in out.functions.items() if isinstance(f, relax.Function)]
            out = relax.transform.DeadCodeElimination(entries)(out)
        return out


def schedule_module(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """``mod`` with every kernel that has a registered schedule scheduled for ``target``."""
    return ScheduleKernels(target)(mod)
