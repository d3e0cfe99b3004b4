"""Canonicalization rules for products: a per-channel constant folded into the layer before it, and ``FMul``.

``fold_channel_scale`` (run after ``linear``, ``conv`` and ``batch_norm``):
``Mul(y, g)`` or ``Div(y, g)`` where ``y`` is an ``FLinear`` / ``FConv2d``
output used only there and the constant ``g`` varies along ``y``'s output
channels only (LayerScale ``x * gamma`` with ``gamma [C]`` after a linear;
``[C, 1, 1]`` / ``[1, C, 1, 1]`` after a conv; a scalar too), is exact in
float::

    W'[c] = g[c] * W[c],   b'[c] = g[c] * b[c]          (float64, stored float32)

so the layer's own per-channel weight scales absorb it and no integer op
is needed.

``mul`` (run after ``scale``, which takes the positive scalar factors):
``Mul`` of two float values, at most one of them a constant, that no other
rule took → ``FMul``: a squeeze-and-excitation gate ``x * sigmoid(...)``,
a gated unit, a constant that broadcasts along several axes; the converter
makes it ``IntMul`` (``quantizer/ops/mul.py``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from intq.quantizer.canonical import FConv2d, FLinear, FMul
from intq.quantizer.fx_graph import const_value, is_float, onnx_op, remove_dead, replace_binary


def _layer(gm, node):
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    return mod if isinstance(mod, (FLinear, FConv2d)) else None


def _per_output_channel(g: torch.Tensor, layer, out_rank: int | None) -> torch.Tensor | None:
    """``g`` as one factor per output channel of ``layer``, if it varies along that axis only; else None."""
    channels = layer.weight.shape[0]
    if g.numel() == 1:
        return g.reshape(1).expand(channels).double()
    wide = [i - g.dim() for i, d in enumerate(g.shape) if d != 1]
    if len(wide) != 1 or g.shape[wide[0]] != channels or out_rank is None or g.dim() > out_rank:
        return None
    channel_axis = -1 if isinstance(layer, FLinear) else 1 - out_rank  # NCHW: axis 1
    return g.reshape(-1).double() if wide[0] == channel_axis else None


def fold_channel_scale(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        op = onnx_op(gm, node, ("Mul", "Div"))
        if op is None or not is_float(node):
            continue
        a, b = node.args
        pairs = [(a, b), (b, a)] if op.op_type == "Mul" else [(a, b)]
        for y, c in pairs:
            layer, g = _layer(gm, y), const_value(gm, c)
            if layer is None or g is None or len(y.users) != 1 or not g.is_floating_point():
                continue
            factor = _per_output_channel(g, layer, len(y.meta.get("shape") or ()) or None)
            if factor is None:
                continue
            if op.op_type == "Div":
                factor = 1.0 / factor
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            layer.weight = (layer.weight.double() * factor.reshape(shape)).to(torch.float32).contiguous()
            if layer.bias is not None:
                layer.bias = (layer.bias.double() * factor).to(torch.float32)
            node.replace_all_uses_with(y)
            y.meta.update({k: v for k, v in node.meta.items() if k in ("shape", "dtype")})
            count += 1
            break
    remove_dead(gm)
    return count


def mul(gm: fx.GraphModule) -> int:
    return replace_binary(gm, "Mul", FMul)
