"""Helpers for rewriting the fx graphs of ONNX nodes that ``onnx_reader.read_onnx`` builds.

Shared by the canonicalization rules (``canonicalize``, ``attention_mask``,
``elementwise``): finding the ``OnnxOp`` behind a node, reading constants,
inserting a module in a node's place, removing dead nodes, and recording
each node's shape and dtype from one run (``annotate``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from intq.export.onnx_reader import OnnxOp


def onnx_op(gm: fx.GraphModule, node, op_type: str | tuple[str, ...] | None = None) -> OnnxOp | None:
    """The OnnxOp behind ``node`` (optionally only if its type is ``op_type``)."""
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    if not isinstance(mod, OnnxOp):
        return None
    if op_type is not None:
        types = (op_type,) if isinstance(op_type, str) else op_type
        if mod.op_type not in types or mod.domain not in ("", "ai.onnx"):
            return None
    return mod


def const_value(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return attr_value(gm, node.target)
    return None


def attr_value(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def scalar_const(gm, node) -> float | None:
    v = const_value(gm, node)
    if v is None or v.numel() != 1:
        return None
    return float(v.reshape(()).item())


def is_float(node) -> bool:
    dt = node.meta.get("dtype") if isinstance(node, fx.Node) else None
    return dt is not None and dt.is_floating_point


def rank(node) -> int | None:
    shape = node.meta.get("shape") if isinstance(node, fx.Node) else None
    return None if shape is None else len(shape)


def is_last_axis(axis, node) -> bool:
    axis = int(axis)
    r = rank(node)
    return axis == -1 or (r is not None and axis == r - 1)


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


class ModuleNamer:
    def __init__(self, gm):
        self.gm = gm

    def add(self, hint: str, module: torch.nn.Module) -> str:
        base = "".join(c if c.isalnum() else "_" for c in hint).strip("_") or "node"
        name, i = base, 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        self.gm.add_submodule(name, module)
        return name


def replace_with_module(gm, anchor: fx.Node, module, args, hint: str) -> fx.Node:
    """Insert ``call_module(module)(*args)`` after ``anchor`` and route ``anchor``'s users to it."""
    name = ModuleNamer(gm).add(hint, module)
    with gm.graph.inserting_after(anchor):
        new = gm.graph.call_module(name, tuple(args))
    new.meta = dict(anchor.meta)
    anchor.replace_all_uses_with(new)
    new.meta["source_nodes"] = anchor.meta.get("onnx_name", anchor.name)
    return new


def add_constant(gm, value: torch.Tensor, hint: str) -> str:
    base = "".join(c if c.isalnum() else "_" for c in hint).strip("_") or "const"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value)
    return name


def remove_dead(gm: fx.GraphModule) -> None:
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        gm.graph.erase_node(node)


def annotate(gm: fx.GraphModule, example_inputs) -> None:
    """Record each node's output shape and dtype from one run of the graph."""

    class _Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                n.meta["shape"] = tuple(out.shape)
                n.meta["dtype"] = out.dtype
            return out

    with torch.no_grad():
        _Rec(gm).run(*example_inputs)


def replace_binary(gm: fx.GraphModule, op_type: str, make) -> int:
    """Replace every float ``op_type`` node of two inputs, not both constant, by ``make()``; how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if onnx_op(gm, node, op_type) is None or not is_float(node):
            continue
        a, b = node.args
        if const_value(gm, a) is not None and const_value(gm, b) is not None:
            continue
        replace_with_module(gm, node, make(), (a, b), node.name)
        count += 1
    remove_dead(gm)
    return count
