"""Canonicalize a captured float graph into the few canonical operators of
``quantizer.canonical``.

Input: the fx GraphModule of ``intq.export.onnx_reader.read_onnx``, one
``OnnxOp`` node per ONNX node and one ``get_attr`` per constant, annotated by
``annotate`` (each node's ``meta["shape"]`` / ``meta["dtype"]`` from one run).

Rules, applied in this order (each rewrites every match and reports a count):

1. ``drop_identity``: Identity / Dropout → their input.
2. ``fold_constants``: any node whose inputs are all constants is evaluated
   once and becomes a constant (a pre-transposed weight, a Cast of a scalar).
2b. ``attention_mask`` (``quantizer/attention_mask.py``): a softmax of
   scores plus (or ``Where``-masked by) a value computed from the integer
   inputs that evaluates to the padding mask of ``attention_mask [B, L]``
   → ``FMaskedSoftmax(scores, attention_mask)``.
3. ``layer_norm``: ``LayerNormalization`` over the last axis, or the written-
   out form ``ReduceMean → Sub → Pow 2 → ReduceMean → Add eps → Sqrt → Div``
   (or ``Mul(Reciprocal(Sqrt))``) followed by an optional ``Mul gamma`` and
   ``Add beta`` → ``FLayerNorm``.
4. ``gelu``: ``Gelu``, or the erf formula ``0.5 * x * (1 + erf(x / sqrt 2))``
   in any of its three association orders → ``FGelu``.
5. ``linear``: ``MatMul(x, W const 2-D)`` with an optional following ``Add``
   of a constant ``[N]`` bias, and ``Gemm`` → ``FLinear``.
6. ``conv``: ``Conv`` with a constant weight (2-D) → ``FConv2d``.
7. ``fold_pad``: a constant-zero ``Pad`` of H and W only (any asymmetric,
   non-negative pads, e.g. TF "same": one extra row/column at the bottom/
   right) whose only user is an ``FConv2d`` → added to the conv's pads.
8. ``batch_norm``: inference ``BatchNormalization`` with constant
   parameters whose input is an ``FConv2d`` used only by it → folded into
   the conv: with ``k = gamma / sqrt(var + eps)``, ``W' = W * k[o]``,
   ``b' = (b - mean) * k + beta`` (float64, stored float32).
8b. ``fold_channel_scale`` (``quantizer/multiply.py``): a ``Mul``/``Div``
   of a linear or conv output by a constant per output channel (LayerScale)
   → folded into its weights and bias.
8c. ``elementwise`` (``quantizer/elementwise.py``): a non-linear function of
   one activation (Sigmoid, HardSwish, SiLU ``x * sigmoid(x)``, Tanh, Exp,
   Erf, LeakyRelu, PRelu, the tanh GELU, ...) → ``FTable`` (an int8 lookup
   table).
9. ``clamp``: ``Relu``, ``Clip`` with constant (or absent) bounds (ReLU6)
   → ``FClamp(lo, hi)``; a clamp that only feeds another is merged into it.
10. ``avg_pool``: ``AveragePool`` (2-D, ``count_include_pad=1`` or no
    padding, no dilation, ``ceil_mode=0``), ``GlobalAveragePool`` and
    ``ReduceMean`` over axes (2, 3) of a 4-D tensor → ``FAvgPool``
    (``kernel=None``: global; ``keepdims=0`` adds a ``Squeeze`` of axes 2, 3).
    ``MaxPool`` stays an ONNX op (the converter copies it onto the integers).
11. ``matmul``: ``MatMul`` of two activations → ``FMatMul``.
12. ``scale``: ``Mul``/``Div`` of a float activation by a positive scalar
    constant → ``FScale``.
13. ``softmax``: ``Softmax`` over the last axis → ``FSoftmax``.
14. ``add``: ``Add`` of two float tensors → ``FAdd``.
15. ``mul`` (``quantizer/multiply.py``): any other ``Mul`` of float tensors
    (a squeeze-and-excitation gate onto its activation) → ``FMul``.

A rule leaves the graph unchanged where its guard fails (a non-constant
weight, a softmax over another axis); the converter then reports the node as
unsupported, by name.  Where the reason is worth telling the user (an
``AveragePool`` that does not count its padding), the rule records it in the
node's ``meta["refused"]`` and the converter's error quotes it.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from onnx import helper

from intq.export.onnx_reader import OnnxOp
from intq.quantizer.attention_mask import attention_mask
from intq.quantizer.canonical import (
    FAdd,
    FAvgPool,
    FClamp,
    FConv2d,
    FGelu,
    FLayerNorm,
    FLinear,
    FMatMul,
    FScale,
    FSoftmax,
)
from intq.quantizer.elementwise import elementwise
from intq.quantizer.fx_graph import (
    ModuleNamer,
    add_constant,
    annotate,
    const_value,
    is_float,
    is_last_axis,
    only_user,
    onnx_op,
    rank,
    remove_dead,
    replace_binary,
    replace_with_module,
    scalar_const,
)
from intq.quantizer.multiply import fold_channel_scale, mul

# ---------------------------------------------------------------- rules


def drop_identity(gm) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        op = onnx_op(gm, node, ("Identity", "Dropout"))
        if op is None:
            continue
        if op.op_type == "Dropout":
            getters = [u for u in node.users if u.target is operator.getitem]
            if any(u.args[1] != 0 for u in getters if u.users):
                continue
            for u in getters:
                u.replace_all_uses_with(node.args[0])
        node.replace_all_uses_with(node.args[0])
        count += 1
    remove_dead(gm)
    return count


def fold_constants(gm) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        op = onnx_op(gm, node)
        if op is None or op.domain not in ("", "ai.onnx"):
            continue
        ins = [a for a in node.args if isinstance(a, fx.Node)]
        if not ins or not all(a.op == "get_attr" for a in ins):
            continue
        args = [const_value(gm, a) if isinstance(a, fx.Node) else a for a in node.args]
        with torch.no_grad():
            value = op(*args)
        if isinstance(value, tuple):
            continue
        name = add_constant(gm, value, f"folded_{node.name}")
        with gm.graph.inserting_after(node):
            new = gm.graph.get_attr(name)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        count += 1
    remove_dead(gm)
    return count


def _reduce_axes(gm, node, op) -> list[int] | None:
    if "axes" in op.attrs:
        return [int(a) for a in op.attrs["axes"]]
    if len(node.args) > 1 and node.args[1] is not None:
        v = const_value(gm, node.args[1])
        return None if v is None else [int(a) for a in v.reshape(-1).tolist()]
    return None


def _is_last_axis_mean(gm, node, of) -> bool:
    op = onnx_op(gm, node, "ReduceMean")
    if op is None or node.args[0] is not of:
        return False
    axes = _reduce_axes(gm, node, op)
    return axes is not None and len(axes) == 1 and is_last_axis(axes[0], of) and op.attrs.get("keepdims", 1) == 1


def layer_norm(gm) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        op = onnx_op(gm, node, "LayerNormalization")
        if op is not None:
            x = node.args[0]
            gamma = const_value(gm, node.args[1])
            beta = const_value(gm, node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
            if gamma is None or not is_last_axis(op.attrs.get("axis", -1), x):
                continue
            beta = torch.zeros_like(gamma) if beta is None else beta
            out = node
            getters = [u for u in node.users if u.target is operator.getitem]
            if getters:  # several outputs: only Y may be used
                if any(u.args[1] != 0 for u in getters if u.users):
                    continue
                out = next((u for u in getters if u.args[1] == 0), None)
                if out is None:
                    continue
            replace_with_module(gm, out, FLayerNorm(gamma, beta, op.attrs.get("epsilon", 1e-5)), (x,), out.name)
            count += 1
            continue
        # written-out form, anchored at the normalizing Div (or Mul by Reciprocal)
        match = _match_decomposed_ln(gm, node)
        if match is None:
            continue
        x, eps, out, gamma, beta = match
        c = x.meta["shape"][-1]
        gamma = torch.ones(c) if gamma is None else gamma.reshape(-1).expand(c)
        beta = torch.zeros(c) if beta is None else beta.reshape(-1).expand(c)
        replace_with_module(gm, out, FLayerNorm(gamma.clone(), beta.clone(), eps), (x,), out.name)
        count += 1
    remove_dead(gm)
    return count


def _match_decomposed_ln(gm, node):
    if onnx_op(gm, node, "Div") is not None:
        d, denom = node.args[0], node.args[1]
    elif onnx_op(gm, node, "Mul") is not None:
        a, b = node.args
        if onnx_op(gm, b, "Reciprocal") is not None:
            d, denom = a, b.args[0]
        elif onnx_op(gm, a, "Reciprocal") is not None:
            d, denom = b, a.args[0]
        else:
            return None
    else:
        return None
    if onnx_op(gm, denom, "Sqrt") is None or onnx_op(gm, d, "Sub") is None:
        return None
    x, mean = d.args
    if not _is_last_axis_mean(gm, mean, x):
        return None
    add_eps = denom.args[0]
    if onnx_op(gm, add_eps, "Add") is None:
        return None
    var, eps_node = add_eps.args
    eps = scalar_const(gm, eps_node)
    if eps is None:
        var, eps = eps_node, scalar_const(gm, var)
    if eps is None or onnx_op(gm, var, "ReduceMean") is None:
        return None
    pw = var.args[0]
    if onnx_op(gm, pw, "Pow") is not None:
        if pw.args[0] is not d or scalar_const(gm, pw.args[1]) != 2.0:
            return None
    elif onnx_op(gm, pw, "Mul") is not None:
        if not (pw.args[0] is d and pw.args[1] is d):
            return None
    else:
        return None
    if not _is_last_axis_mean(gm, var, pw):
        return None
    out, gamma, beta = node, None, None
    nxt = only_user(out)
    if nxt is not None and onnx_op(gm, nxt, "Mul") is not None:
        other = nxt.args[1] if nxt.args[0] is out else nxt.args[0]
        g = const_value(gm, other)
        if g is not None and g.numel() == x.meta["shape"][-1]:
            out, gamma = nxt, g
            nxt = only_user(out)
    if nxt is not None and onnx_op(gm, nxt, "Add") is not None:
        other = nxt.args[1] if nxt.args[0] is out else nxt.args[0]
        bv = const_value(gm, other)
        if bv is not None and bv.numel() == x.meta["shape"][-1]:
            out, beta = nxt, bv
    return x, eps, out, gamma, beta


def _other(node, known):
    a, b = node.args[0], node.args[1]
    return b if a is known else a


def gelu(gm) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        op = onnx_op(gm, node, "Gelu")
        if op is not None and op.attrs.get("approximate", "none") != "none":
            continue  # the tanh form is another function: the elementwise rule makes it a table
        if op is not None:
            replace_with_module(gm, node, FGelu(), (node.args[0],), node.name)
            count += 1
            continue
        if onnx_op(gm, node, "Erf") is None:
            continue
        pre = node.args[0]
        if onnx_op(gm, pre, "Div") is not None and _close(scalar_const(gm, pre.args[1]), math.sqrt(2.0)):
            x = pre.args[0]
        elif onnx_op(gm, pre, "Mul") is not None:
            x = pre.args[0] if _close(scalar_const(gm, pre.args[1]), 1 / math.sqrt(2.0)) else None
            if x is None and _close(scalar_const(gm, pre.args[0]), 1 / math.sqrt(2.0)):
                x = pre.args[1]
            if x is None:
                continue
        else:
            continue
        add1 = only_user(node)
        if add1 is None or onnx_op(gm, add1, "Add") is None or not _close(scalar_const(gm, _other(add1, node)), 1.0):
            continue
        u = only_user(add1)
        if u is None or onnx_op(gm, u, "Mul") is None:
            continue
        other = _other(u, add1)
        out = None
        if other is x:  # (x * (1+erf)) * 0.5
            v = only_user(u)
            if v is not None and onnx_op(gm, v, "Mul") is not None and _close(scalar_const(gm, _other(v, u)), 0.5):
                out = v
        elif onnx_op(gm, other, "Mul") is not None and x in other.args:  # (x*0.5) * (1+erf)
            if _close(scalar_const(gm, _other(other, x)), 0.5):
                out = u
        elif _close(scalar_const(gm, other), 0.5):  # x * ((1+erf) * 0.5)
            v = only_user(u)
            if v is not None and onnx_op(gm, v, "Mul") is not None and _other(v, u) is x:
                out = v
        if out is None:
            continue
        replace_with_module(gm, out, FGelu(), (x,), out.name)
        count += 1
    remove_dead(gm)
    return count


def _close(value, target, tol=1e-3) -> bool:
    return value is not None and abs(value - target) <= tol * abs(target)


def linear(gm) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        mm = onnx_op(gm, node, ("MatMul", "Gemm"))
        if mm is None:
            continue
        x, w = node.args[0], const_value(gm, node.args[1])
        if w is None or w.dim() != 2 or not w.is_floating_point() or const_value(gm, x) is not None:
            continue
        bias, out = None, node
        if mm.op_type == "Gemm":
            if mm.attrs.get("transA", 0):
                continue
            w = (w if mm.attrs.get("transB", 0) else w.t()) * float(mm.attrs.get("alpha", 1.0))
            if len(node.args) > 2 and node.args[2] is not None:
                c = const_value(gm, node.args[2])
                if c is None or c.numel() != w.shape[0]:
                    continue
                bias = c.reshape(-1) * float(mm.attrs.get("beta", 1.0))
        else:
            w = w.t()
            nxt = only_user(node)
            if nxt is not None and onnx_op(gm, nxt, "Add") is not None:
                b = const_value(gm, _other(nxt, node))
                if b is not None and b.numel() == w.shape[0] and b.shape[-1] == w.shape[0]:
                    bias, out = b.reshape(-1), nxt
        replace_with_module(gm, out, FLinear(w.contiguous(), bias), (x,), out.name)
        count += 1
    remove_dead(gm)
    return count


def conv(gm) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        op = onnx_op(gm, node, "Conv")
        if op is None:
            continue
        w = const_value(gm, node.args[1])
        b = const_value(gm, node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
        if w is None or w.dim() != 4 or op.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            continue
        pads = list(op.attrs.get("pads", [0, 0, 0, 0]))  # [top, left, bottom, right]
        mod = FConv2d(
            w, b, op.attrs.get("strides", [1, 1]), pads, op.attrs.get("dilations", [1, 1]), op.attrs.get("group", 1)
        )
        replace_with_module(gm, node, mod, (node.args[0],), node.name)
        count += 1
    remove_dead(gm)
    return count


def _module(gm, node, cls):
    """The module behind ``node`` if it is a ``cls`` (a canonical op), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    return mod if isinstance(mod, cls) else None


def _refuse(node, reason: str) -> None:
    node.meta["refused"] = reason


def fold_pad(gm) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        op = onnx_op(gm, node, "Pad")
        user = only_user(node) if op is not None else None
        conv_mod = _module(gm, user, FConv2d)
        if conv_mod is None or user.args[0] is not node or op.attrs.get("mode", "constant") != "constant":
            continue
        pads = const_value(gm, node.args[1]) if len(node.args) > 1 else None
        value = node.args[2] if len(node.args) > 2 else None
        axes = node.args[3] if len(node.args) > 3 else None
        if pads is None or rank(node.args[0]) != 4 or (value is not None and scalar_const(gm, value) != 0.0):
            continue
        pads = [int(p) for p in pads.reshape(-1).tolist()]
        axes_value = torch.arange(4) if axes is None else const_value(gm, axes)
        if axes_value is None:
            continue
        axes = [int(a) % 4 for a in axes_value.reshape(-1).tolist()]
        per_axis = {a: (pads[i], pads[i + len(axes)]) for i, a in enumerate(axes)}
        if any(per_axis.get(a, (0, 0)) != (0, 0) for a in (0, 1)) or any(p < 0 for p in pads):
            continue  # pads the batch or channels, or crops: not a convolution's padding
        (top, bottom), (left, right) = per_axis.get(2, (0, 0)), per_axis.get(3, (0, 0))
        t, le, b, r = conv_mod.pads
        conv_mod.pads = (t + top, le + left, b + bottom, r + right)
        user.args = (node.args[0],) + tuple(user.args[1:])
        count += 1
    remove_dead(gm)
    return count


def batch_norm(gm) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        op = onnx_op(gm, node, "BatchNormalization")
        if op is None:
            continue
        conv_node = node.args[0]
        conv_mod = _module(gm, conv_node, FConv2d)
        params = [const_value(gm, a) for a in node.args[1:5]]
        if conv_mod is None or len(conv_node.users) != 1 or any(p is None for p in params):
            continue
        if op.attrs.get("training_mode", 0) or len([o for o in op.output_names if o]) != 1:
            continue
        gamma, beta, mean, var = (p.double().reshape(-1) for p in params)
        k = gamma / torch.sqrt(var + float(op.attrs.get("epsilon", 1e-5)))
        w = conv_mod.weight.double() * k.reshape(-1, 1, 1, 1)
        b = torch.zeros_like(mean) if conv_mod.bias is None else conv_mod.bias.double()
        conv_mod.weight = w.to(torch.float32).contiguous()
        conv_mod.bias = ((b - mean) * k + beta).to(torch.float32)
        node.replace_all_uses_with(conv_node)
        count += 1
    remove_dead(gm)
    return count


def clamp(gm) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        op = onnx_op(gm, node, ("Relu", "Clip"))
        if op is None or not is_float(node):
            continue
        lo, hi = (0.0, math.inf) if op.op_type == "Relu" else (-math.inf, math.inf)
        if op.op_type == "Clip":
            bounds = []
            for k, default in ((1, -math.inf), (2, math.inf)):
                arg = node.args[k] if len(node.args) > k else None
                bounds.append(default if arg is None else scalar_const(gm, arg))
            if None in bounds:
                continue
            lo, hi = bounds
        x = node.args[0]
        inner = _module(gm, x, FClamp)
        if inner is not None and len(x.users) == 1 and max(lo, inner.lo) <= min(hi, inner.hi):
            lo, hi, x = max(lo, inner.lo), min(hi, inner.hi), x.args[0]  # overlapping clamps: one clamp
        replace_with_module(gm, node, FClamp(lo, hi), (x,), node.name)
        count += 1
    remove_dead(gm)
    return count


def _avg_pool_window(op, node) -> tuple[list[int], list[int], list[int]] | str:
    """``(kernel, strides, pads as (t, l, b, r))`` of a 2-D AveragePool, or why it is not supported."""
    kernel = list(op.attrs.get("kernel_shape", []))
    if rank(node.args[0]) != 4 or len(kernel) != 2:
        return "only 2-D average pooling of NCHW tensors is supported"
    if op.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"auto_pad={op.attrs['auto_pad']}: export the model with explicit pads"
    if op.attrs.get("ceil_mode", 0):
        return "ceil_mode=1 (partial windows at the edge): export with ceil_mode=0"
    if any(d != 1 for d in op.attrs.get("dilations", [1, 1])):
        return "dilated average pooling is not supported"
    pads = list(op.attrs.get("pads", [0, 0, 0, 0])) if op.attrs.get("auto_pad", "NOTSET") == "NOTSET" else [0] * 4
    if any(pads) and not op.attrs.get("count_include_pad", 0):
        return (
            "count_include_pad=0 with padding divides edge windows by their own cell counts, which an integer "
            "window sum with one dyadic scale cannot do; use count_include_pad=True (or no padding)"
        )
    return kernel, list(op.attrs.get("strides", [1, 1])), pads


def avg_pool(gm) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        op = onnx_op(gm, node, ("AveragePool", "GlobalAveragePool", "ReduceMean"))
        if op is None or not is_float(node):
            continue
        x, squeeze = node.args[0], False
        if op.op_type == "AveragePool":
            window = _avg_pool_window(op, node)
            if isinstance(window, str):
                _refuse(node, window)
                continue
            mod = FAvgPool(*window)
        elif op.op_type == "GlobalAveragePool":
            if rank(x) != 4:
                continue
            mod = FAvgPool()
        else:
            axes = _reduce_axes(gm, node, op)
            if rank(x) != 4 or axes is None or sorted(a % 4 for a in axes) != [2, 3]:
                continue
            mod, squeeze = FAvgPool(), not op.attrs.get("keepdims", 1)
        new = replace_with_module(gm, node, mod, (x,), node.name)
        if squeeze:
            _squeeze_spatial(gm, new)
        count += 1
    remove_dead(gm)
    return count


def _squeeze_spatial(gm, node: fx.Node) -> fx.Node:
    """Insert ``Squeeze(node, axes=[2, 3])`` (an ONNX op) after ``node`` and route its users to it."""
    axes = add_constant(gm, torch.tensor([2, 3], dtype=torch.int64), f"{node.name}_squeeze_axes")
    name = f"{node.name}_squeeze"
    squeeze = OnnxOp(helper.make_node("Squeeze", [node.name, axes], [name], name=name), gm.meta.get("opset", 21))
    target = ModuleNamer(gm).add(name, squeeze)
    users = list(node.users)
    with gm.graph.inserting_after(node):
        axes_node = gm.graph.get_attr(axes)
    with gm.graph.inserting_after(axes_node):
        new = gm.graph.call_module(target, (node, axes_node))
    for u in users:
        u.replace_input_with(node, new)
    new.meta = {k: v for k, v in node.meta.items() if k not in ("shape",)}
    new.meta["onnx_name"] = name
    return new


def matmul(gm) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if onnx_op(gm, node, "MatMul") is None:
            continue
        a, b = node.args
        if not (is_float(a) and is_float(b)) or const_value(gm, a) is not None or const_value(gm, b) is not None:
            continue
        replace_with_module(gm, node, FMatMul(), (a, b), node.name)
        count += 1
    remove_dead(gm)
    return count


def scale(gm) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        op = onnx_op(gm, node, ("Mul", "Div"))
        if op is None or not is_float(node):
            continue
        a, b = node.args
        c, x = scalar_const(gm, b), a
        if c is None and op.op_type == "Mul":
            c, x = scalar_const(gm, a), b
        if c is None or c <= 0 or const_value(gm, x) is not None:
            continue
        factor = c if op.op_type == "Mul" else 1.0 / c
        replace_with_module(gm, node, FScale(factor), (x,), node.name)
        count += 1
    remove_dead(gm)
    return count


def softmax(gm) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        op = onnx_op(gm, node, "Softmax")
        if op is None:
            continue
        if not is_last_axis(op.attrs.get("axis", -1), node.args[0]):
            _refuse(
                node,
                f"a softmax over axis {op.attrs.get('axis', -1)} of a rank-{rank(node.args[0])} tensor; Shiftmax "
                "normalizes the last axis: transpose the input so that the softmax axis is the last one",
            )
            continue
        replace_with_module(gm, node, FSoftmax(), (node.args[0],), node.name)
        count += 1
    remove_dead(gm)
    return count


def add(gm) -> int:
    return replace_binary(gm, "Add", FAdd)


RULES = (
    drop_identity,
    fold_constants,
    attention_mask,
    layer_norm,
    gelu,
    linear,
    conv,
    fold_pad,
    batch_norm,
    fold_channel_scale,
    elementwise,
    clamp,
    avg_pool,
    matmul,
    scale,
    softmax,
    add,
    mul,
)


RULES_RUNNING_THE_GRAPH = (attention_mask,)


def canonicalize(gm: fx.GraphModule, example_inputs) -> dict[str, int]:
    """Apply every rule in order; return how many times each applied."""
    annotate(gm, example_inputs)
    counts = {}
    for rule in RULES:
        # a rule that recognises a function by running the graph takes the example inputs too
        counts[rule.__name__] = rule(gm, example_inputs) if rule in RULES_RUNNING_THE_GRAPH else rule(gm)
    gm.graph.lint()
    gm.recompile()
    annotate(gm, example_inputs)
    return counts
