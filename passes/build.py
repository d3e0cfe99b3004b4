"""Compile a Relax module and run it on the Relax VM, with dynamic shapes.

``build(mod, target)`` runs TVM's default Relax pipeline (legalize, lower
``call_te`` / ``call_tir`` PrimFuncs, VM codegen) and links the library,
with each kernel's run-time checks (``passes/runtime_checks.py``);
the PrimFuncs carry no schedule yet, which is correct but slow.
``run(runnable, feeds)`` feeds numpy arrays by the ONNX graph input names
(kept by ``import_onnx``; else the names of ``main``'s parameters) and returns numpy arrays, one per
graph output; every call may use new values for the symbolic dims.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from intq.passes import compat
from intq.passes.onnx_import import INPUT_NAMES_ATTR
from intq.passes.runtime_checks import InsertRuntimeChecks


@dataclass(frozen=True)
class Runnable:
    """A compiled module loaded on a Relax VM, and the names of ``main``'s inputs in order."""

    vm: compat.VirtualMachine
    device: compat.tvm.runtime.Device
    input_names: tuple[str, ...]
    target: compat.tvm.target.Target


def build(mod: compat.tvm.IRModule, target: str | Mapping | compat.tvm.target.Target = "llvm") -> Runnable:
    """Compile ``mod`` (a Relax module with a ``main``) for ``target`` and load it.

    ``target``: ``"llvm"`` (the host CPU, see ``compat.host_target``), a JSON
    dict such as ``{"kind": "llvm", "mcpu": "x86-64-v3"}``, or a ``Target``.
    """
    if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        raise ValueError("build: the module has no 'main' function; import a model with onnx_import.import_onnx")
    tgt = compat.make_target(target)
    executable = compat.build(InsertRuntimeChecks(tgt)(mod), tgt)
    device = compat.vm_device(tgt)
    attrs = dict(mod["main"].attrs) if mod["main"].attrs else {}
    names = [p.name for p in mod["main"].params][: int(attrs.get("num_input", len(mod["main"].params)))]
    names = [str(n) for n in attrs.get(INPUT_NAMES_ATTR, names)]
    return Runnable(compat.VirtualMachine(executable, device), device, tuple(names), tgt)


def run(runnable: Runnable, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``main`` on ``feeds`` (input name -> array); the outputs as numpy arrays, in graph order."""
    unknown = set(feeds) - set(runnable.input_names)
    absent = [n for n in runnable.input_names if n not in feeds]
    if unknown or absent:
        raise ValueError(
            f"run: inputs must be exactly {list(runnable.input_names)}; missing {absent}, unexpected {sorted(unknown)}"
        )
    args = [
        compat.tvm.runtime.tensor(np.require(feeds[n], requirements="C"), runnable.device) for n in runnable.input_names
    ]
    return to_numpy(runnable.vm["main"](*args))


def to_numpy(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    out: list[np.ndarray] = []
    for item in value:
        out.extend(to_numpy(item))
    return out
