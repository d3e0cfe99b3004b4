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

Targets: every LLVM CPU gets the row and attention schedules (plain
``parallel`` / ``vectorize``, nothing ISA-specific); the linears' schedule
picks its dot instruction by the target (``gemm.dot_intrinsic``: AVX2 on
x86, ``sdot`` on aarch64 with ``+dotprod``) and refuses a CPU with neither.

A CUDA target has its own registries, ``CUDA_SCHEDULES`` and
``CUDA_CALL_REWRITES`` (``cuda_int8``: the int8 GEMMs with ``__dp4a``;
``cuda_rows``: row and elementwise kernels): on a GPU every kernel must
have its loops bound to threads, so a kernel of an op without an entry, or
whose schedule refuses it, gets ``CUDA_SCHEDULES[DEFAULT]``, the generic
fallback.

Contract: the module comes from ``onnx_import.import_onnx`` (and the fusion
passes); the target is the one ``tvm.compile`` gets.  On a CPU, kernels of
ops with no entry are left unchanged; every kernel for a target that is
neither LLVM nor CUDA is left unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from intq.passes.compat import constant_value, drop_unused_opaque_constants, relax, s_tir, tirx, tvm
from intq.passes.ops.base import OP_ATTR, split_range_suffix
from intq.passes.ops.unpack_int4 import UnpackInt4, unpacked_constant
from intq.passes.schedules import conv, gemm

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
    #: each argument's int8 value when it is ``UnpackInt4`` of a constant (a 4-bit weight), else None
    int4: tuple[np.ndarray | None, ...] = ()


PrimFuncSchedule = Callable[[tirx.PrimFunc, tvm.target.Target], "tirx.PrimFunc | str"]
CallRewrite = Callable[[KernelCall], "relax.Expr | str"]

SCHEDULES: dict[str, PrimFuncSchedule] = {}
CALL_REWRITES: dict[str, CallRewrite] = {
    op: gemm.rewrite_linear_call for op in ("IntLinear", "IntLinear16", "IntLinearAcc", "IntLinear16+IntAdd")
}
CALL_REWRITES["IntConv2d"] = conv.rewrite_conv_call


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
            "MaskedShiftmax": schedule_with(rows.schedule_shiftmax),  # the same blocks, the mask read in them
            "ILayerNorm": schedule_with(rows.schedule_layernorm),
            "ShiftGELU": rows.schedule_shiftgelu_kernel,  # needs the target: the table gather by AVX-512 VBMI
            "IntLookup": rows.schedule_shiftgelu_kernel,  # the same table kernel
            "IntAdd": schedule_with(rows.schedule_add),
            "IntMul": schedule_with(rows.schedule_mul),
            "Requantize": schedule_with(rows.schedule_requantize),
            "IntMatMul": batch_matmul.schedule_matmul,  # needs the target: the x86 plan by its dot instruction
            "IntMatMulAcc": batch_matmul.schedule_matmul,
            "IntConv2d": schedule_with(conv.schedule_direct),
        }
    )


_register_row_and_attention_schedules()


def _register_unpack_schedule() -> None:
    # every LLVM CPU: a byte per iteration, vectorized by LLVM (see unpack.py); a GPU keeps the CUDA fallback
    from intq.passes.schedules import unpack

    SCHEDULES[UnpackInt4.op_type] = schedule_with(unpack.schedule_unpack_int4)


_register_unpack_schedule()

DEFAULT = "*"  # the registry key of the schedule for a kernel that no other entry takes (CUDA only)
CUDA_SCHEDULES: dict[str, PrimFuncSchedule] = {}
CUDA_CALL_REWRITES: dict[str, CallRewrite] = {}


def _register_cuda_schedules() -> None:
    from intq.passes.schedules import cuda_int8, cuda_rows

    def gpu(fn: Callable[[s_tir.Schedule], None]) -> PrimFuncSchedule:
        plain = schedule_with(fn)

        def schedule(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
            return plain(func, target).with_attrs(cuda_rows.KERNEL_ATTRS)

        schedule.__name__ = schedule.__qualname__ = fn.__name__
        schedule.__module__ = fn.__module__
        return schedule

    elementwise = gpu(cuda_rows.schedule_elementwise)
    CUDA_SCHEDULES.update(
        {
            "Shiftmax": gpu(cuda_rows.schedule_shiftmax),
            "MaskedShiftmax": gpu(cuda_rows.schedule_shiftmax),
            "ILayerNorm": gpu(cuda_rows.schedule_layernorm),
            "ShiftGELU": elementwise,
            "IntLookup": elementwise,
            "IntAdd": elementwise,
            "IntMul": elementwise,
            "Requantize": elementwise,
            "IntMatMul": cuda_int8.schedule_matmul,
            "IntMatMulAcc": cuda_int8.schedule_matmul,
            DEFAULT: cuda_rows.fallback,
        }
    )
    linears = ("IntLinear", "IntLinear16", "IntLinearAcc", "IntLinear16+IntAdd")
    CUDA_CALL_REWRITES.update({op: cuda_int8.rewrite_linear_call for op in linears})
    CUDA_CALL_REWRITES["IntConv2d"] = cuda_int8.rewrite_conv_call


_register_cuda_schedules()


def registries(target: tvm.target.Target) -> tuple[dict, dict] | None:
    """``(schedules, call_rewrites)`` for ``target``'s kind, or None: its kernels are left as they are."""
    kind = target.kind.name
    if kind == "llvm":
        return SCHEDULES, CALL_REWRITES
    if kind == "cuda":
        return CUDA_SCHEDULES, CUDA_CALL_REWRITES
    return None


def registered(registry: dict, op: str | None):
    """``registry``'s entry for the op type ``op``: its own; else, for ``<op>_c<lo>x<hi>``, that of ``<op>``;
    else, for a configured family's ``<family>_<config>`` (``IntConv2d_s1x1_...``), the family's; else None.

    The schedules so reached rebuild or keep the kernel's own epilogue, so a clamp range is honoured.
    """
    if op is None:
        return None
    if op in registry:
        return registry[op]
    base = split_range_suffix(op)[0]
    if base in registry:
        return registry[base]
    family, sep, _ = base.partition("_")
    return registry.get(family) if sep else None


def kernel_op(func) -> str | None:
    """The ``intq.op`` of an unscheduled kernel, else None."""
    attrs = func.attrs if isinstance(func, tirx.PrimFunc) and func.attrs else {}
    return str(attrs[OP_ATTR]) if OP_ATTR in attrs and SCHEDULE_ATTR not in attrs else None


@relax.expr_functor.mutator
class _CallRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target, owner: ScheduleKernels, rewrites: dict):
        super().__init__(mod)
        self.mod, self.target, self.owner, self.memo, self.rewrites = mod, target, owner, {}, rewrites
        # lookup_binding does not see match_cast bindings (compat.opaque_constant binds the packed weights so)
        self.casts = {}
        for func in mod.functions.values():
            if isinstance(func, relax.Function):
                for block in getattr(func.body, "blocks", []):
                    self.casts.update({b.var: b.value for b in block.bindings if isinstance(b, relax.MatchCast)})
        self.call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not call.op.same_as(self.call_tir) or not isinstance(call.args[1], relax.Tuple):
            return call
        gv = call.args[0]
        func = self.mod.functions.get(gv)
        rewrite = registered(self.rewrites, kernel_op(func))
        if rewrite is None:
            return call
        args = tuple(call.args[1].fields)
        constants = tuple(constant_value(self._value(a)) for a in args)
        int4 = tuple(self._int4(a) for a in args)
        kc = KernelCall(gv.name_hint, func, call, args, constants, self.target, self.builder_, self.memo, int4)
        out = rewrite(kc)
        if isinstance(out, str):
            self.owner.skipped[gv.name_hint] = out
            return call
        self.owner.scheduled.setdefault(gv.name_hint, getattr(rewrite, "__module__", "").rpartition(".")[2])
        return out

    def _value(self, expr: relax.Expr) -> relax.Expr:
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        if bound is None and isinstance(expr, relax.Var):
            bound = self.casts.get(expr)
        return bound if bound is not None else expr

    def _int4(self, expr: relax.Expr) -> np.ndarray | None:
        """The int8 value of ``expr`` when it is ``UnpackInt4`` of a constant (``unpack_int4.unpacked_constant``)."""
        return unpacked_constant(
            expr, self._value, lambda call: kernel_op(self.mod.functions.get(call.args[0])) == UnpackInt4.op_type
        )


@tvm.transform.module_pass(opt_level=0, name="ScheduleKernels")
class ScheduleKernels:
    """Apply the registered schedules for ``target``; see the module docstring."""

    def __init__(self, target: tvm.target.Target):
        self.target = target
        self.scheduled: dict[str, str] = {}  # kernel name -> the schedule's module
        self.skipped: dict[str, str] = {}  # kernel name -> why it was left unscheduled

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self.scheduled, self.skipped = {}, {}
        found = registries(self.target)
        if found is None:
            return mod
        schedules, rewrites = found
        rewriter = _CallRewriter(mod, self.target, self, rewrites)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        out = rewriter.builder_.get()
        for gv, func in list(out.functions.items()):
            if gv.name_hint in self.scheduled and gv.name_hint not in self.skipped:
                continue  # every call was rewritten: the kernel is dead
            op = kernel_op(func)
            default = schedules.get(DEFAULT) if op is not None else None
            schedule = registered(schedules, op) or default
            if schedule is None:
                continue
            new = schedule(func, self.target)
            if isinstance(new, str) and default is not None and schedule is not default:
                self.skipped[gv.name_hint] = new  # the reason stays on record; the fallback takes the kernel
                schedule, new = default, default(func, self.target)
            if isinstance(new, str):
                self.skipped[gv.name_hint] = new
                continue
            out[gv] = new.with_attr(SCHEDULE_ATTR, getattr(schedule, "__name__", "schedule"))
            self.scheduled[gv.name_hint] = getattr(schedule, "__module__", "").rpartition(".")[2]
        if any(name in self.scheduled for name in (gv.name_hint for gv in mod.get_global_vars())):
            entries = [gv.name_hint for gv, f in out.functions.items() if isinstance(f, relax.Function)]
            out = drop_unused_opaque_constants(relax.transform.DeadCodeElimination(entries)(out))
        return out


def schedule_module(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """``mod`` with every kernel that has a registered schedule scheduled for ``target``."""
    return ScheduleKernels(target)(mod)
