"""Which weighted layers must share a width, and which input width each layer really got.

A layer at ``b`` bits has ``b``-bit weights and a ``b``-bit input activation
(``QuantConfig``); the ILP's BOPs column, ``macs * b * b``, counts on it.  The
converter (``quantizer/convert.py``) cannot always honour the input half,
because one activation serves several layers:

- the activation a *width-following* producer ``P`` writes (a conv, an
  ``IntLinear``, a HAWQV3 residual add, an average pooling, a concatenation,
  the input quantizer, a requantize) gets ``need(P) = max_{L in R(P)} b_L``,
  where ``R(P)`` is every weighted layer ``P``'s value reaches through the
  ops the converter looks ahead through (clamps, pooling, adds, scalings,
  concatenations, ``MaxPool`` and movement ops);
- a layer reading a LayerNorm output at 4 bits gets a requantize to
  ``need(LayerNorm)``; at 8 bits it reads the per-channel int8 output;
- GELU, Softmax and MatMul outputs are always int8 ``[-128, 127]``: a layer
  reading one of them has an 8-bit input at any weight width (W4A8 at 4 bits).

So nothing breaks when layers of ``R(P)`` differ (the integers stay exact:
the narrower layers simply read the wider activation), but a 4-bit layer
``L`` has a 4-bit input exactly when every layer of ``R(P_L)`` is at 4 bits,
``P_L`` the width-following producer of ``L``'s input.  That is the
implication ``b_L = 4  =>  b_M = 4`` for ``M`` in ``R(P_L)``; the ILP table
expresses ties (equalities), so ``shared_input_groups`` returns each
``R(P_L)`` with more than one layer as a tie group, a slightly stronger
condition: it also keeps a layer of ``R(P_L)`` that does not read ``P_L``
directly (it reads it through a residual add) from going to 4 bits alone.

``P_L`` is found by walking up from ``L``'s input through the ops that pass
integers on unchanged (clamps, scalings, ``MaxPool``, movement ops): a clamp
fused into its producer is its producer's only user, so ``R`` is the same
through it, and a clamp that is not fused narrows its input's range in
place.

``input_ranges`` reads the integer range each weighted layer's input
actually has in a converted model, from the integer graph and its layer
records: the check that the ties did their job, and the report's column.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from intq.export.onnx_reader import OnnxOp
from intq.quantizer.canonical import FClamp, FGelu, FMatMul, FScale, FSoftmax
from intq.quantizer.convert import INT8_RANGE, MOVEMENT, PASS_THROUGH, PASS_THROUGH_ONNX, WEIGHTED
from intq.quantizer.ops.base import activation_range

#: float ops whose integer output is always int8 [-128, 127], whatever width their readers have
FIXED_INT8 = (FGelu, FSoftmax, FMatMul)
#: float ops whose output holds their input's integers (same range), so a reader's producer lies above them
_KEEPS_INTEGERS = (FClamp, FScale)
_KEEPS_INTEGERS_ONNX = MOVEMENT | {"MaxPool"}


def source_name(node: fx.Node) -> str:
    """The layer's ONNX node name, as the converter records it (``LayerRecord.source``)."""
    return str(node.meta.get("onnx_node") or node.meta.get("onnx_name") or node.name)


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_weighted(gm, node) -> bool:
    return isinstance(_module(gm, node), WEIGHTED)


def _passes_width(gm, node) -> bool:
    if node.op == "call_function":
        return node.target is operator.getitem
    mod = _module(gm, node)
    return isinstance(mod, PASS_THROUGH) or (isinstance(mod, OnnxOp) and mod.op_type in PASS_THROUGH_ONNX)


def _keeps_integers(gm, node) -> bool:
    if node.op == "call_function":
        return node.target is operator.getitem
    mod = _module(gm, node)
    return isinstance(mod, _KEEPS_INTEGERS) or (isinstance(mod, OnnxOp) and mod.op_type in _KEEPS_INTEGERS_ONNX)


def reach(gm: fx.GraphModule) -> dict[fx.Node, frozenset[fx.Node]]:
    """Per node, the weighted layers whose widths decide its activation's width (the converter's look-ahead)."""
    out: dict[fx.Node, frozenset[fx.Node]] = {}
    for node in reversed(list(gm.graph.nodes)):
        found: set[fx.Node] = set()
        for user in node.users:
            if _is_weighted(gm, user):
                found.add(user)
            elif _passes_width(gm, user):
                found |= out.get(user, frozenset())
        out[node] = frozenset(found)
    return out


def input_producer(gm: fx.GraphModule, layer: fx.Node) -> fx.Node:
    """The node whose requantize (or quantizer) sets the range of ``layer``'s input (see the module docstring)."""
    node = layer.args[0]
    while isinstance(node, fx.Node) and _keeps_integers(gm, node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def shared_input_groups(gm: fx.GraphModule) -> list[tuple[str, ...]]:
    """Tie groups (ONNX node names, graph order) of the canonical float graph ``gm`` (module docstring)."""
    weighted = [n for n in gm.graph.nodes if _is_weighted(gm, n)]
    order = {n: k for k, n in enumerate(weighted)}
    reached = reach(gm)
    groups: list[tuple[str, ...]] = []
    for layer in weighted:
        producer = input_producer(gm, layer)
        if isinstance(_module(gm, producer), FIXED_INT8):
            continue  # an int8 input at every width: no tie changes it
        members = reached.get(producer, frozenset()) | {layer}
        if len(members) > 1:
            group = tuple(source_name(n) for n in sorted(members, key=order.__getitem__))
            if group not in groups:
                groups.append(group)
    return groups


def fixed_int8_inputs(gm: fx.GraphModule) -> list[str]:
    """Weighted layers (ONNX node names) whose input is int8 ``[-128, 127]`` at any width (GELU/Softmax/MatMul)."""
    return [
        source_name(n)
        for n in gm.graph.nodes
        if _is_weighted(gm, n) and isinstance(_module(gm, input_producer(gm, n)), FIXED_INT8)
    ]


def input_ranges(qmodel) -> dict[str, tuple[int, int]]:
    """Each weighted layer's input integer range in the converted model, by ONNX node name.

    Walks up the integer graph from the layer's module through the ops that
    carry integers unchanged (copied ONNX movement ops, ``MaxPool``) to the
    op whose layer record gives the range (a conv, requantize, add, clip or
    the input quantizer).
    """
    gm = qmodel.graph_module
    records = {r.name: r for r in qmodel.layers}
    planned = gm.meta.get("layer_bits", {})
    out: dict[str, tuple[int, int]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in planned:
            continue
        value = node.args[0]
        while isinstance(value, fx.Node):
            rec = records.get(value.target) if value.op == "call_module" else None
            if rec is not None:
                # no recorded range: an int8 output at its full range (LayerNorm, GELU, MatMul, Shiftmax)
                out[records[node.target].source] = tuple(int(v) for v in (rec.out_range or INT8_RANGE))
                break
            mod = _module(gm, value)
            carries = value.op == "call_function" and value.target is operator.getitem
            carries = carries or (isinstance(mod, OnnxOp) and mod.op_type in _KEEPS_INTEGERS_ONNX)
            if not carries or not value.args:
                break
            value = value.args[0]
    return out


def range_bits(lo: int, hi: int) -> int:
    """The narrowest width whose ``activation_range`` (signed or unsigned) holds ``[lo, hi]``: 4 or 8."""
    fits4 = any(a <= lo and hi <= b for a, b in (activation_range(4, False), activation_range(4, True)))
    return 4 if fits4 else 8
