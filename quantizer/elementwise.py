"""Canonicalization rule: a function of one activation, elementwise → ``FTable`` (an int8 lookup table).

A *member* is an ONNX node of ``ELEMENTWISE`` whose inputs are each either
a constant or a value computed, through members, from one and the same
non-constant *source* value: ``Sigmoid(x)``, ``Mul(x, Sigmoid(x))`` (SiLU),
``Mul(x, Div(Clip(Add(x, 3), 0, 6), 6))`` (HardSwish written out),
``HardSwish``, ``Tanh``, ``Exp``, ``Erf`` alone, ``LeakyRelu``, ``PRelu``.
Its constants must be scalars, or vary along one axis (``PRelu``'s slope per
channel, ``[C, 1, 1]``), the same axis and size for every constant of the
function, a static axis of the source.

A *root* is a member one of whose users is not a member, or a graph output:
the value the rest of the model reads.  Each root whose members include a
non-linear op (``NONLINEAR``, or a product or quotient of two values of
the source) becomes ``FTable(fn)(source)``, ``fn`` the members it depends
on, copied into a small GraphModule; the converter evaluates ``fn`` at the
256 int8 grid points of the source's scale (``quantizer/ops/lookup.py``).
A function of linear ops and clamps only (``Relu``, ``Clip``, ``x * c``,
``x + c``) is left to the rules that fold it for free (a clamp in the
producer's requantize, a factor in the scale).  The rule runs after
``layer_norm`` and ``gelu``, so their written-out forms are taken by them.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from intq.export.onnx_reader import OnnxOp
from intq.quantizer.canonical import FTable
from intq.quantizer.fx_graph import const_value, is_float, onnx_op, remove_dead, replace_with_module

UNARY = {
    "Sigmoid", "Tanh", "Exp", "Erf", "Log", "Sqrt", "Reciprocal", "Softplus", "Softsign", "Elu", "Selu", "Celu",
    "LeakyRelu", "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Shrink", "Gelu", "Sin", "Cos", "Tan",
    "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Floor", "Ceil", "Round", "Sign", "Abs",
    "Neg", "Relu", "Clip", "Identity",
}  # fmt: skip
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu"}
ELEMENTWISE = UNARY | BINARY
#: ops that the other rules fold for free when they stand alone (clamps, affine maps)
LINEAR = {"Relu", "Clip", "Neg", "Identity", "Add", "Sub", "Mul", "Div", "Max", "Min"}
NONLINEAR = ELEMENTWISE - LINEAR


class _Member:
    __slots__ = ("source", "nonlinear", "axis", "channels")

    def __init__(self, source: fx.Node, nonlinear: bool, axis: int | None, channels: int):
        self.source, self.nonlinear, self.axis, self.channels = source, nonlinear, axis, channels


def elementwise(gm: fx.GraphModule) -> int:
    """Rewrite every root of a table-worthy elementwise function (see the module docstring); return how many."""
    members: dict[fx.Node, _Member] = {}
    for node in gm.graph.nodes:
        member = _as_member(gm, node, members)
        if member is not None:
            members[node] = member
    count = 0
    for node in list(members):
        member = members[node]
        feeds_out = any(u not in members or members[u].source is not member.source for u in node.users)
        if not (member.nonlinear and feeds_out):
            continue
        fn, ops = _extract(gm, node, member.source, members)
        table = FTable(fn, member.channels, member.axis if member.axis is not None else -1, ops)
        replace_with_module(gm, node, table, (member.source,), node.name)
        count += 1
    remove_dead(gm)
    return count


def _as_member(gm, node: fx.Node, members: dict[fx.Node, _Member]) -> _Member | None:
    op = onnx_op(gm, node, tuple(ELEMENTWISE))
    if op is None or not is_float(node) or node.meta.get("refused") or len(op.output_names) != 1:
        return None
    sources, axes, channels, nonconstant = set(), set(), set(), 0
    for arg in node.args:
        if arg is None:
            continue
        if not isinstance(arg, fx.Node):
            return None
        value = const_value(gm, arg)
        if value is not None:
            axis = _channel_axis(value)
            if axis is False:
                return None
            if axis is not None:
                axes.add(axis[0])
                channels.add(axis[1])
            continue
        nonconstant += 1
        if arg in members:
            m = members[arg]
            sources.add(m.source)
            if m.axis is not None:
                axes.add(m.axis)
                channels.add(m.channels)
        elif is_float(arg) and not arg.meta.get("refused"):
            sources.add(arg)
        else:
            return None
    if len(sources) != 1 or len(axes) > 1 or len(channels) > 1:
        return None
    (source,) = sources
    axis = next(iter(axes)) if axes else None
    count = next(iter(channels)) if channels else 1
    if axis is not None and not _static_axis(source, axis, count):
        return None
    inner = [members[a] for a in node.args if isinstance(a, fx.Node) and a in members]
    nonlinear = op.op_type in NONLINEAR or (op.op_type in ("Mul", "Div", "Max", "Min") and nonconstant == 2)
    nonlinear = nonlinear or any(m.nonlinear for m in inner)
    return _Member(source, nonlinear, axis, count)


def _channel_axis(value: torch.Tensor):
    """None for a scalar constant; ``(axis, size)`` (axis negative) for one varying along one axis; else False."""
    if value.numel() == 1:
        return None
    wide = [i for i, d in enumerate(value.shape) if d != 1]
    if len(wide) != 1 or not value.is_floating_point():
        return False
    return wide[0] - value.dim(), int(value.shape[wide[0]])


def _static_axis(source: fx.Node, axis: int, channels: int) -> bool:
    shape = source.meta.get("shape")
    return shape is not None and len(shape) >= 2 and -len(shape) <= axis and shape[axis] == channels


def _extract(gm, root: fx.Node, source: fx.Node, members) -> tuple[fx.GraphModule, tuple[str, ...]]:
    """The members ``root`` depends on, as a GraphModule of one input (the source) and one output."""
    needed, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node in needed or node not in members:
            continue
        needed.add(node)
        stack.extend(a for a in node.args if isinstance(a, fx.Node))
    graph, owner = fx.Graph(), torch.nn.Module()
    env = {source: graph.placeholder("x")}
    ops = []
    for node in gm.graph.nodes:  # topological order
        if node not in needed:
            continue
        args = []
        for arg in node.args:
            if isinstance(arg, fx.Node) and arg not in env:
                name = f"c{len(env)}"
                owner.register_buffer(name, const_value(gm, arg).clone())
                env[arg] = graph.get_attr(name)
            args.append(env[arg] if isinstance(arg, fx.Node) else arg)
        module: OnnxOp = gm.get_submodule(node.target)
        name = f"op{len(ops)}"
        owner.add_module(name, module)
        env[node] = graph.call_module(name, tuple(args))
        ops.append(module.op_type)
    graph.output(env[root])
    return fx.GraphModule(owner, graph, class_name="ElementwiseFunction"), tuple(ops)
