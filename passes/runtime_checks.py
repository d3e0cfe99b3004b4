"""Run-time checks of what a kernel assumes about its inputs: ``InsertRuntimeChecks``.

A kernel of a model with symbolic dims (``batch``, ``seq``) is built once
and trusts, at run time, things its types cannot say:

- a gather reads ``table[idx]``: every index must lie in ``[-n, n - 1]``
  (ONNX ``Gather``; a negative index counts from the end);
- a broadcasting kernel (``IntAdd``, ``IntMul``) reads an operand's axis
  of size ``d`` at ``i`` when ``d`` is its output axis' size ``D`` and at 0
  when ``d == 1``: every other ``d`` is a shape that numpy and onnxruntime
  refuse (the ``seq`` of ``input_ids`` against a 64-row position table).

A converter (``passes/ops``, ``passes/checked_ops.py``) states what its
kernel assumes in the PrimFunc attr ``intq.runtime_checks``: a list of
records made of ints and strings only, naming params by position (the
PrimFunc's TIR vars are renamed by later passes; positions are not):

    {"kind": "index", "param": k, "extent_param": p, "extent_axis": a, "message": m}
        every element of param k (an integer buffer) lies in [-n, n - 1], n the size of axis a of param p
    {"kind": "broadcast", "param": k, "axis": a, "out": j, "out_axis": b, "message": m}
        axis a of param k has size 1 or the size of axis b of param j

This pass, run after the schedules (``passes/pipeline.py``; a schedule
needs the body to be its root block), prepends one ``assert`` per record
to the kernel's body: the shape asserts read only the tensors' shapes; the
index assert is a serial loop over the indices before the kernel's own
loops (a gather's indices are few: ``batch * seq``).  A failed assert makes
the call raise ``ValueError(message)`` before anything is read.  On a GPU
the indices live in device memory, which the host-side asserts cannot
read: there the index records are skipped, and the kernel's own clamped
read keeps every access in bounds (``checked_ops.take_kernel``), the caller
(``intq.runtime``) checking the graph inputs' ids before the call.
"""

from __future__ import annotations

from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script import builder as T

from intq.passes.compat import tirx, tvm

CHECKS_ATTR = "intq.runtime_checks"


def _check(func: tirx.PrimFunc, record, on_device: bool) -> tirx.Stmt | None:
    kind, message = str(record["kind"]), str(record["message"])
    params = func.params
    if kind == "broadcast":
        dim = params[int(record["param"])].ty.shape[int(record["axis"])]  # "out": -1 is the last param
        out = params[int(record["out"])].ty.shape[int(record["out_axis"])]
        with IRBuilder() as ib:
            with T.Assert(tirx.Or(dim == 1, dim == out), message, "ValueError"):
                T.evaluate(0)
        return ib.get()
    if kind == "index":
        if on_device:
            return None
        param = params[int(record["param"])]
        extent = params[int(record["extent_param"])].ty.shape[int(record["extent_axis"])]
        extent = extent if extent.ty.dtype == "int64" else tirx.Cast("int64", extent)
        with IRBuilder() as ib:
            with T.grid(*param.ty.shape) as at:
                index = param[tuple(at) if isinstance(at, (list, tuple)) else (at,)]
                index = index if str(param.ty.dtype) == "int64" else tirx.Cast("int64", index)
                with T.Assert(tirx.And(index >= -extent, index < extent), message, "ValueError"):
                    T.evaluate(0)
        return ib.get()
    raise ValueError(f"unknown run-time check kind {kind!r} in {CHECKS_ATTR}")


def with_runtime_checks(func: tirx.PrimFunc, on_device: bool = False) -> tirx.PrimFunc:
    """``func`` with the asserts of its ``intq.runtime_checks`` records before its body (unchanged without)."""
    records = (func.attrs or {}).get(CHECKS_ATTR)
    if not records:
        return func
    checks = [stmt for stmt in (_check(func, r, on_device) for r in records) if stmt is not None]
    out = func.without_attr(CHECKS_ATTR)
    return out.with_body(tirx.SeqStmt([*checks, func.body])) if checks else out


@tvm.transform.module_pass(opt_level=0, name="InsertRuntimeChecks")
class InsertRuntimeChecks:
    """Prepend every kernel's run-time checks (see the module docstring); ``target`` says where it runs."""

    def __init__(self, target: tvm.target.Target):
        self.on_device = target.kind.name != "llvm"

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = mod
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc) and CHECKS_ATTR in (func.attrs or {}):
                out[gv] = with_runtime_checks(func, self.on_device)
        return out


def checks_attrs(records: list[dict]) -> dict:
    """The PrimFunc attrs stating ``records`` (none when there are none: the kernel is as before)."""
    return {CHECKS_ATTR: records} if records else {}


def index_check(param: int, extent_param: int, extent_axis: int, message: str) -> dict:
    return {
        "kind": "index",
        "param": param,
        "extent_param": extent_param,
        "extent_axis": extent_axis,
        "message": message,
    }


def broadcast_check(param: int, axis: int, out: int, out_axis: int, message: str) -> dict:
    return {"kind": "broadcast", "param": param, "axis": axis, "out": out, "out_axis": out_axis, "message": message}


__all__ = [
    "CHECKS_ATTR",
    "InsertRuntimeChecks",
    "broadcast_check",
    "checks_attrs",
    "index_check",
    "with_runtime_checks",
]
