"""The version-sensitive TVM names that ``passes/`` uses, in one place.

Written against apache-tvm 0.27, which renamed much of the older API:

- ``tvm.tir`` is ``tvm.tirx`` (expressions, ``PrimFunc``, ``shift_right``);
  schedule-level TIR moved to ``tvm.s_tir``;
- Relax struct info is a *type*: ``expr.ty`` and ``relax.TensorType`` where
  older code says ``expr.struct_info`` and ``relax.TensorStructInfo``;
- a target is built from a JSON-like dict, ``{"kind": "llvm", "mcpu": ...}``,
  not from ``"llvm -mcpu=..."``;
- a Relax constant is a ``tvm.ir.GenericConst`` (``tvm.ir.Constant``; no
  ``relax.Constant``) whose value is ``.value``, not ``.data``; and
  ``relax.const(numpy_int64_array)`` narrows to int32 unless given a dtype
  (pass a ``tvm.runtime.tensor`` or the dtype);
- a ``relax.Var``'s name is ``.name`` (``GlobalVar`` keeps ``.name_hint``),
  and a TIR expression's dtype is ``expr.ty.dtype`` (no ``.dtype``);
- the arithmetic analyzer (``can_prove_equal``, ``simplify``) is
  ``tvm.sym.Analyzer``, formerly ``tvm.arith.Analyzer``;
- ``tvm.compile`` is the one build entry point (it routes a module holding
  Relax functions to ``relax.build``); ``relax.VirtualMachine`` runs it.
- a TIR buffer is a ``Var`` whose type is a ``BufferType`` (``.shape``,
  ``.dtype``, ``.storage_scope``); a PrimFunc has no ``buffer_map``, its
  buffer params are those vars; a load is an ``ir.TensorLoad`` (``.source``,
  ``.indices``), a region an ``ir.TensorRegion`` (``.source``, ``.region``);
  TIR is rewritten from Python with ``tvm_ffi.structural_map`` (there is no
  ``tirx.stmt_functor``);
- ``Schedule.tensorize`` crashes (SIGSEGV) in the apache-tvm 0.27 wheel: it
  deep-copies the intrinsic through JSON, and ``tvm_ffi``'s JSON writer
  crashes on any IR node (``tvm.ir.save_json(tirx.IntImm("int32", 1))``
  does too).  ``tensorize`` below does the same substitution without the copy.

``relax.transform.FoldConstant`` (in ``tvm.compile``'s CPU pipeline)
evaluates at compile time every ``call_tir`` whose arguments are all
constants (by value or through a variable bound to one) and whose output
shape is static.  It does not look through ``match_cast``:
``opaque_constant`` binds a constant that way, so that a kernel reading it
(the run-time unpacking of packed 4-bit weights) stays a run-time call.
``relax.transform.DeadCodeElimination`` keeps every ``match_cast`` (one may
fail at run time): ``drop_unused_opaque_constants`` removes those bindings
once nothing reads them.

The ONNX frontend (``tvm.relax.frontend.onnx``) dispatches every node by its
``op_type`` alone (the domain is ignored) through the module-level function
``_get_convert_map()``, looked up at call time by both the unsupported-op
check and the converter call.  ``extended_convert_map`` swaps that function
for one that also returns our converters, for the duration of an import.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, s_tir, te, tirx
from tvm.relax.frontend.onnx import from_onnx
from tvm.relax.frontend.onnx import onnx_frontend as _onnx_frontend

__all__ = [
    "Analyzer",
    "OnnxOpConverter",
    "TensorType",
    "build",
    "constant_value",
    "cross_compiler",
    "extended_convert_map",
    "from_onnx",
    "frontend_convert_map",
    "host_target",
    "make_target",
    "opaque_constant",
    "drop_unused_opaque_constants",
    "relax",
    "s_tir",
    "te",
    "tensor_type",
    "tensorize",
    "tirx",
    "vm_device",
    "VirtualMachine",
]

TVM_VERSION: str = tvm.__version__

#: Base class of the ONNX frontend's converters: a subclass defines classmethods
#: ``_impl_v<opset>(bb, inputs, attr, params)``; ``get_converter(opset)`` picks one.
OnnxOpConverter = _onnx_frontend.OnnxOpConverter

TensorType = relax.TensorType
Analyzer = tvm.sym.Analyzer
VirtualMachine = relax.VirtualMachine

_convert_map_lock = threading.RLock()


def constant_value(expr: relax.Expr) -> np.ndarray | None:
    """The numpy value of a Relax constant (e.g. an ONNX initializer), else None."""
    return expr.value.numpy() if isinstance(expr, tvm.ir.Constant) else None


def opaque_constant(bb: relax.BlockBuilder, expr: relax.Expr) -> relax.Expr:
    """``expr`` bound through ``match_cast`` (to its own type) when it is a constant, so FoldConstant keeps
    the kernels reading it; anything else unchanged."""
    if not isinstance(expr, tvm.ir.Constant):
        return expr
    return bb.match_cast(expr, tensor_type(expr))


@relax.expr_functor.mutator
class _DropUnusedCasts(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, used: set):
        super().__init__(mod)
        self.used = used

    def visit_match_cast_(self, binding) -> None:
        if isinstance(binding.value, tvm.ir.Constant) and binding.var not in self.used:
            return  # dead: Relax's DeadCodeElimination keeps every match_cast (it may fail at run time)
        super().visit_match_cast_(binding)


def drop_unused_opaque_constants(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` without the ``opaque_constant`` bindings nothing reads any more."""
    used: set = set()
    functions = [(gv, f) for gv, f in mod.functions.items() if isinstance(f, relax.Function)]
    for _, func in functions:
        relax.analysis.post_order_visit(func.body, lambda e: isinstance(e, relax.Var) and used.add(e))
    mutator = _DropUnusedCasts(mod, used)
    for gv, func in functions:
        mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def tensor_type(expr: relax.Expr) -> relax.TensorType:
    """The Relax tensor type (0.27's ``.ty``, older ``.struct_info``) of ``expr``."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType):
        raise TypeError(f"expected a tensor-typed Relax expression, got {type(ty).__name__}: {expr}")
    return ty


def make_target(target: str | Mapping | tvm.target.Target | None = None) -> tvm.target.Target:
    """A ``Target`` from a kind name (``"llvm"``), a JSON dict, or a ``Target``.

    ``None`` and ``"llvm"`` mean the host CPU (see ``host_target``).
    """
    if target is None or target == "llvm":
        return host_target()
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, Mapping):
        return tvm.target.Target(dict(target))
    return tvm.target.Target(target)


def host_target() -> tvm.target.Target:
    """The LLVM target of the machine we run on (``mcpu`` = the host CPU, e.g. ``znver4``)."""
    cpu = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu})


def build(mod: tvm.IRModule, target: tvm.target.Target):
    """Compile a Relax module with the default pipeline (``relax.build`` under the hood)."""
    return tvm.compile(mod, target=target)


def cross_compiler(cxx: str):
    """An ``export_library`` ``fcompile`` that links with the cross compiler ``cxx`` (0.27: ``tvm.support.cc``)."""
    from tvm.support import cc

    return cc.cross_compiler(cxx)


def vm_device(target: tvm.target.Target) -> tvm.runtime.Device:
    """The runtime device a compiled module for ``target`` runs on."""
    kind = target.kind.name
    if kind in ("llvm", "c"):
        return tvm.cpu(0)
    return tvm.device(kind, 0)


def frontend_convert_map() -> dict[str, type]:
    """The ONNX frontend's own ``{op_type: converter}`` table (default domain)."""
    return dict(_onnx_frontend._get_convert_map())


@contextlib.contextmanager
def extended_convert_map(extra: Mapping[str, type], overrides: Mapping[str, type] | None = None) -> Iterator[None]:
    """Within the block, the ONNX frontend also converts the op types in ``extra``.

    ``extra`` maps an ``op_type`` string to an ``OnnxOpConverter`` subclass;
    it may not shadow a frontend op type.  ``overrides`` replaces the
    frontend's converters of the standard op types it names, on purpose
    (``checked_ops.OVERRIDES``).  The frontend module's ``_get_convert_map``
    is replaced (and restored on exit) under a lock, so concurrent imports
    in one process do not see each other's half-installed maps.
    """
    overrides = dict(overrides or {})
    with _convert_map_lock:
        original = _onnx_frontend._get_convert_map
        clash = set(extra) & set(original())
        if clash:
            raise ValueError(f"converters would shadow the ONNX frontend's own op types: {sorted(clash)}")
        unknown = set(overrides) - set(original())
        if unknown:
            raise ValueError(f"overrides name op types the ONNX frontend does not convert: {sorted(unknown)}")

        def _get_convert_map():
            table = original()
            table.update(extra)
            table.update(overrides)
            return table

        _onnx_frontend._get_convert_map = _get_convert_map
        try:
            yield
        finally:
            _onnx_frontend._get_convert_map = original


def buffer_scope(buffer: tvm.ir.Var) -> str:
    """The storage scope (``"global"``, ``"local"``, ...) of a TIR buffer var."""
    return str(buffer.ty.storage_scope) or "global"


def tensorize(func: tirx.PrimFunc, block: str, impl: tirx.PrimFunc, bind: Mapping[str, str]) -> tirx.PrimFunc:
    """``func`` with the body of its block named ``block`` replaced by ``impl``'s, as ``Schedule.tensorize`` does.

    ``block`` is the outer block that ``Schedule.blockize`` made of the loops
    the intrinsic covers; ``bind`` maps each buffer param of ``impl`` to the
    name of the ``func`` buffer it stands for, whose region in ``block``'s
    reads/writes it is matched to (``T.match_buffer``: the offsets become the
    region's start).  ``impl`` must be fresh (not used in another function),
    with the scopes of the buffers it binds.  Unlike ``Schedule.tensorize``,
    nothing checks that the replaced loops compute what ``impl`` computes:
    the caller built both.
    """
    params = {p.name: p for p in impl.params}
    found = []

    def replace(node: s_tir.SBlock) -> s_tir.SBlock:
        if node.name_hint != block:
            return node
        regions = {r.source.name: r for r in [*node.reads, *node.writes]}
        matches = []
        for param, target in bind.items():
            if target not in regions:
                raise ValueError(f"tensorize: block {block!r} does not access a buffer {target!r}")
            scopes = buffer_scope(params[param]), buffer_scope(regions[target].source)
            if scopes[0] != scopes[1]:
                raise ValueError(f"tensorize: {param} is in scope {scopes[0]!r}, {target!r} in {scopes[1]!r}")
            matches.append(s_tir.MatchBufferRegion(params[param], regions[target]))
        found.append(node)
        body = impl.body.block.body
        return s_tir.SBlock(
            node.iter_vars,
            node.reads,
            node.writes,
            node.name_hint,
            body,
            None,
            node.alloc_buffers,
            matches,
            node.annotations,
        )

    out = tvm_ffi.structural_map(func, (s_tir.SBlock, replace))
    if len(found) != 1:
        raise ValueError(f"tensorize: expected one block named {block!r}, found {len(found)}")
    return out
