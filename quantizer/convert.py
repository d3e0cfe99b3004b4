"""Convert a calibrated canonical float graph into an integer-only graph.

Every value of the integer graph has a *kind* and a real-valued *scale*:

- ``a8``: int8 activation, per-tensor scale ``S`` (value ~= q * S);
- ``r16``: int16 residual stream, per-tensor scale;
- ``acc``: int32 accumulator, per-tensor scale or a vector along the last
  axis (a linear layer's ``S_x * S_w[c]``), only fed to Shiftmax, a
  requantize or a dequantizer;
- ``int``: integers that are not quantized reals (token ids, shapes);
- ``const`` / ``cchain``: a float constant (or one moved by shape-only ops),
  quantized where it is consumed, at the scale its consumer needs.

Rules (float op -> integer op, output kind):

=============  ==========================================  ===========
FLinear        IntLinear (IntLinearAcc if it feeds only    a8 (acc)
               the graph outputs)
FConv2d        IntConv2d                                   a8
FMatMul        IntMatMul (IntMatMulAcc when a softmax,     a8 (acc)
               through scalings, consumes it)
FScale         none: the scale absorbs the factor          unchanged
FSoftmax       Shiftmax                                    a8, 1/128
FGelu          ShiftGELU                                   a8
FLayerNorm     ILayerNorm                                  a8
FAdd           IntAdd                                      r16
movement ops   the same ONNX op on the integers            unchanged
=============  ==========================================  ===========

Activation scales come from the observers: ``S = clip / 127`` for int8,
``clip / 32767`` for the int16 residual stream.  Weights are symmetric per
output channel, ``S_w[c] = max|W[c]| / 127``; bias is int32 at ``S_x *
S_w[c]``.  Any other float op on a quantized value is unsupported; all of
them are reported together, by ONNX node name and op type.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from intq.export.onnx_reader import OnnxOp
from intq.quantizer.canonical import FAdd, FConv2d, FGelu, FLayerNorm, FLinear, FMatMul, FScale, FSoftmax
from intq.quantizer.ops.add import IntAdd
from intq.quantizer.ops.boundary import Dequantize, Quantize
from intq.quantizer.ops.conv import IntConv2d
from intq.quantizer.ops.layernorm import ILayerNorm
from intq.quantizer.ops.linear import IntLinear, IntLinear16, IntLinearAcc
from intq.quantizer.ops.matmul import IntMatMul, IntMatMulAcc
from intq.quantizer.ops.requantize import Requantize
from intq.quantizer.ops.shiftgelu import ShiftGELU
from intq.quantizer.ops.shiftmax import Shiftmax

Q8, Q16 = 127, 32767

# ONNX ops that move or select integers without arithmetic; value = data input index
MOVEMENT = {
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Slice",
    "Gather",
    "Expand",
    "Split",
    "Identity",
    "Tile",
}
SHAPE_OF = {"Shape", "Size"}
QUANTIZED = ("a8", "r16", "acc")


class UnsupportedModelError(ValueError):
    """The model contains operators that intq cannot run in integers."""


@dataclasses.dataclass
class QVal:
    kind: str
    node: fx.Node | None = None
    scale: Any = None  # float or np.ndarray (per last-axis channel)
    const: torch.Tensor | None = None
    replay: list = dataclasses.field(default_factory=list)  # for cchain: [(module name, args with None for data)]
    replay_base: torch.Tensor | None = None  # for cchain: the constant before the replayed ops

    @property
    def quantized(self) -> bool:
        return self.kind in QUANTIZED

    @property
    def per_tensor(self) -> bool:
        return np.ndim(self.scale) == 0 or np.size(self.scale) == 1


@dataclasses.dataclass
class LayerRecord:
    name: str
    op: str
    source: str
    bits: int
    in_scale: Any = None
    out_scale: Any = None


class Converter:
    def __init__(self, gm: fx.GraphModule, observers, config):
        self.src = gm
        self.obs = observers
        self.config = config
        self.root = torch.nn.Module()
        self.graph = fx.Graph()
        self.env: dict[fx.Node, QVal] = {}
        self.unsupported: list[tuple[str, str, str]] = []
        self.layers: list[LayerRecord] = []
        self.output_meta: list[dict] = []

    # ------------------------------------------------------------ helpers
    def clip(self, node: fx.Node) -> float:
        ob = self.obs.get(node.name)
        if ob is None:
            raise UnsupportedModelError(f"internal: no calibration statistics for node {node.name!r}")
        return ob.clip(self.config.calibration.value, Q8, self.config.percentile)

    def module(self, hint: str, mod: torch.nn.Module, args, name_hint=None) -> fx.Node:
        base = "".join(c if c.isalnum() else "_" for c in hint).strip("_") or "op"
        name, i = base, 0
        while hasattr(self.root, name):
            i += 1
            name = f"{base}_{i}"
        self.root.add_module(name, mod)
        return self.graph.call_module(name, tuple(args))

    def buffer(self, hint: str, value: torch.Tensor) -> fx.Node:
        base = "".join(c if c.isalnum() else "_" for c in hint).strip("_") or "c"
        name, i = base, 0
        while hasattr(self.root, name):
            i += 1
            name = f"{base}_{i}"
        self.root.register_buffer(name, value)
        return self.graph.get_attr(name)

    def channel_scale(self, node: fx.Node) -> np.ndarray:
        """One int8 scale per last-axis channel (LayerNorm outputs: a few channels carry outliers)."""
        ob = self.obs.get(node.name)
        if ob is None or ob.channel_amax is None:
            raise UnsupportedModelError(f"internal: no per-channel statistics for node {node.name!r}")
        floor = max(float(ob.channel_amax.max()), 1e-8) * 2.0**-12  # keeps every ratio within the dyadic range
        return np.maximum(ob.channel_amax, floor) / Q8

    def source_name(self, node: fx.Node) -> str:
        """The ONNX node this value came from (its output's name when the node had none)."""
        return str(node.meta.get("onnx_node") or node.meta.get("onnx_name") or node.name)

    def quantize_const(self, qv: QVal, scale: float, bits: int, hint: str) -> fx.Node:
        qmax = Q8 if bits == 8 else Q16
        dtype = torch.int8 if bits == 8 else torch.int16
        base = qv.const if qv.kind == "const" else qv.replay_base
        q = torch.round(base.double() / scale).clamp(-qmax - 1, qmax).to(dtype)
        node = self.buffer(hint, q)
        for name, args in qv.replay:
            node = self.graph.call_module(name, tuple(node if a is None else a for a in args))
        return node

    def const_amax(self, qv: QVal) -> float:
        base = qv.const if qv.kind == "const" else qv.replay_base
        return max(float(base.abs().max()), 1e-8)

    def as_a8(self, qv: QVal, float_node: fx.Node, hint: str, allow_channel: bool = False) -> QVal:
        """The value as an int8 activation (requantized if needed).

        ``allow_channel``: the consumer takes one scale per last-axis channel
        (a linear layer folds it into its weights); otherwise a per-channel
        value is requantized onto one per-tensor scale.
        """
        if qv.kind == "a8" and (qv.per_tensor or allow_channel):
            return qv
        if qv.kind in ("const", "cchain"):
            s = self.const_amax(qv) / Q8
            return QVal("a8", self.quantize_const(qv, s, 8, hint + "_q"), s)
        if qv.kind in ("r16", "acc", "a8"):
            s_out = self.clip(float_node) / Q8
            ratio = np.asarray(qv.scale, dtype=np.float64) / s_out
            node = self.module(hint + "_rq", Requantize(ratio), (qv.node,))
            self.layers.append(
                LayerRecord(hint + "_rq", "Requantize", self.source_name(float_node), 8, qv.scale, s_out)
            )
            return QVal("a8", node, s_out)
        raise UnsupportedModelError(f"internal: cannot requantize a {qv.kind} value at {float_node.name}")

    # ------------------------------------------------------------ driver
    def run(self) -> fx.GraphModule:
        for node in self.src.graph.nodes:
            handler = getattr(self, f"do_{node.op}")
            handler(node)
        if self.unsupported:
            lines = "\n".join(f"  - node {n!r}: op {t} ({why})" for n, t, why in self.unsupported)
            raise UnsupportedModelError(
                f"{len(self.unsupported)} operator(s) cannot run in integer arithmetic:\n{lines}\n"
                "intq supports Linear/MatMul/Gemm, Conv, Softmax, GELU, LayerNorm, residual Add, scaling by a "
                "constant and shape-only ops between the input and the output. Re-export the model without "
                "these ops, or keep them outside the quantized region."
            )
        gm = fx.GraphModule(self.root, self.graph)
        gm.graph.lint()
        return gm

    def do_placeholder(self, node):
        new = self.graph.placeholder(node.name)
        new.meta.update(node.meta)
        if node.meta.get("dtype") is not None and node.meta["dtype"].is_floating_point:
            s = self.clip(node) / Q8
            q = self.module(f"{node.name}_quant", Quantize(s), (new,))
            self.layers.append(LayerRecord(f"{node.name}_quant", "Quantize", self.source_name(node), 8, None, s))
            self.env[node] = QVal("a8", q, s)
        else:
            self.env[node] = QVal("int", new)

    def do_get_attr(self, node):
        value = self.src.get_buffer(node.target) if "." not in node.target else _get_attr(self.src, node.target)
        if value.is_floating_point():
            self.env[node] = QVal("const", const=value)
        else:
            self.env[node] = QVal("int", self.buffer(node.target, value.clone()))

    def do_call_function(self, node):
        if node.target is operator.getitem:
            parent = self.env[node.args[0]]
            if parent.kind == "bad":
                self.env[node] = parent
                return
            new = self.graph.call_function(operator.getitem, (parent.node, node.args[1]))
            self.env[node] = dataclasses.replace(parent, node=new)
            return
        self.unsupported.append((node.name, str(node.target), "not an ONNX operator"))
        self.env[node] = QVal("bad")

    def do_call_method(self, node):
        self.do_call_function(node)

    def do_output(self, node):
        outs = []
        for i, arg in enumerate(node.args[0]):
            qv = self.env[arg]
            if qv.quantized:
                deq = self.module(f"output_{i}_dequant", Dequantize(qv.scale), (qv.node,))
                outs.append(deq)
                self.output_meta.append({"kind": qv.kind, "scale": _jsonable(qv.scale)})
            elif qv.kind == "int":
                outs.append(qv.node)
                self.output_meta.append({"kind": "int", "scale": None})
            elif qv.kind == "bad":
                outs.append(None)
            else:
                self.unsupported.append((arg.name, "output", "graph output computed from constants only"))
        self.graph.output(tuple(outs))

    def do_call_module(self, node):
        mod = self.src.get_submodule(node.target)
        args = node.args
        ins = [self.env[a] if isinstance(a, fx.Node) else a for a in args]
        if any(isinstance(q, QVal) and q.kind == "bad" for q in ins):
            self.env[node] = QVal("bad")
            return
        name = node.name
        if isinstance(mod, OnnxOp):
            self.env[node] = self.onnx_node(node, mod, ins)
            return
        rule = {
            FLinear: self.linear,
            FConv2d: self.conv,
            FMatMul: self.matmul,
            FScale: self.scale,
            FSoftmax: self.softmax,
            FGelu: self.gelu,
            FLayerNorm: self.layernorm,
            FAdd: self.add,
        }.get(type(mod))
        if rule is None:
            self.unsupported.append((name, type(mod).__name__, "no integer rule"))
            self.env[node] = QVal("bad")
            return
        self.env[node] = rule(node, mod, ins)

    # ------------------------------------------------------------ rules
    def _weights(self, w: torch.Tensor, b: torch.Tensor | None, s_x):
        """Per-output-channel int8 weights of ``W * S_x`` and the int32 bias.

        ``S_x`` is the input's scale: a scalar, or one per input channel
        (a LayerNorm output); folding it into the weights first makes the
        accumulator's scale ``S_acc[n] = max_k |W[n,k] S_x[k]| / 127``.
        """
        w = w.double()
        s_x = torch.as_tensor(np.asarray(s_x, dtype=np.float64))
        if s_x.dim() == 1 and s_x.numel() > 1:
            w = w * s_x.reshape((1, -1) + (1,) * (w.dim() - 2))
        else:
            w = w * float(s_x)
        axes = tuple(range(1, w.dim()))
        amax = w.abs().amax(dim=axes).clamp_min(1e-30)
        acc_scale = amax / Q8
        shape = (-1,) + (1,) * (w.dim() - 1)
        w_q = torch.round(w / acc_scale.reshape(shape)).clamp(-Q8, Q8).to(torch.int8)
        if b is None:
            b_q = torch.zeros(w.shape[0], dtype=torch.int32)
        else:
            b_q = torch.round(b.double() / acc_scale).clamp(-(2**31), 2**31 - 1).to(torch.int32)
        return w_q.numpy(), b_q.numpy(), acc_scale.numpy()

    def _feeds_only_adds(self, node) -> bool:
        return all(u.op == "call_module" and isinstance(self.src.get_submodule(u.target), FAdd) for u in node.users)

    def _feeds_only_outputs(self, node) -> bool:
        return all(u.op == "output" for u in node.users)

    def linear(self, node, mod: FLinear, ins):
        x = self.as_a8(ins[0], node.args[0], node.name + "_in", allow_channel=True)
        w, b, acc_scale = self._weights(mod.weight, mod.bias, x.scale)
        if self._feeds_only_outputs(node):
            out = self.module(node.name, IntLinearAcc(w, b), (x.node,))
            self.layers.append(LayerRecord(node.name, "IntLinearAcc", self.source_name(node), 8, x.scale, None))
            return QVal("acc", out, acc_scale)
        if self._feeds_only_adds(node):  # into the int16 residual stream: keep 16 bits
            s_out = self.clip(node) / Q16
            out = self.module(node.name, IntLinear16(w, b, acc_scale / s_out), (x.node,))
            self.layers.append(LayerRecord(node.name, "IntLinear16", self.source_name(node), 8, x.scale, s_out))
            return QVal("r16", out, s_out)
        s_out = self.clip(node) / Q8
        out = self.module(node.name, IntLinear(w, b, acc_scale / s_out), (x.node,))
        self.layers.append(LayerRecord(node.name, "IntLinear", self.source_name(node), 8, x.scale, s_out))
        return QVal("a8", out, s_out)

    def conv(self, node, mod: FConv2d, ins):
        x = self.as_a8(ins[0], node.args[0], node.name + "_in")
        w, b, acc_scale = self._weights(mod.weight, mod.bias, x.scale)
        s_out = self.clip(node) / Q8
        op = IntConv2d(w, b, acc_scale / s_out, mod.stride, mod.pads, mod.dilation, mod.groups)
        out = self.module(node.name, op, (x.node,))
        self.layers.append(LayerRecord(node.name, "IntConv2d", self.source_name(node), 8, x.scale, s_out))
        return QVal("a8", out, s_out)

    def _feeds_softmax(self, node) -> bool:
        while True:
            users = list(node.users)
            if len(users) != 1 or users[0].op != "call_module":
                return False
            mod = self.src.get_submodule(users[0].target)
            if isinstance(mod, FSoftmax):
                return True
            if not isinstance(mod, FScale):
                return False
            node = users[0]

    def matmul(self, node, mod, ins):
        a = self.as_a8(ins[0], node.args[0], node.name + "_a")
        b = self.as_a8(ins[1], node.args[1], node.name + "_b")
        if self._feeds_softmax(node):
            out = self.module(node.name, IntMatMulAcc(), (a.node, b.node))
            self.layers.append(LayerRecord(node.name, "IntMatMulAcc", self.source_name(node), 8, [a.scale, b.scale]))
            return QVal("acc", out, a.scale * b.scale)
        s_out = self.clip(node) / Q8
        out = self.module(node.name, IntMatMul(a.scale * b.scale / s_out), (a.node, b.node))
        self.layers.append(LayerRecord(node.name, "IntMatMul", self.source_name(node), 8, [a.scale, b.scale], s_out))
        return QVal("a8", out, s_out)

    def scale(self, node, mod: FScale, ins):
        qv = ins[0]
        if not qv.quantized:
            self.unsupported.append((self.source_name(node), "Mul", f"scaling a {qv.kind} value"))
            return QVal("bad")
        return dataclasses.replace(
            qv, scale=np.asarray(qv.scale) * mod.factor if not qv.per_tensor else float(qv.scale) * mod.factor
        )

    def softmax(self, node, mod, ins):
        x = ins[0]
        if x.kind != "acc" or not x.per_tensor:
            x = self.as_a8(x, node.args[0], node.name + "_in")
        out = self.module(node.name, Shiftmax(float(x.scale)), (x.node,))
        self.layers.append(
            LayerRecord(node.name, "Shiftmax", self.source_name(node), 8, float(x.scale), Shiftmax.output_scale)
        )
        return QVal("a8", out, Shiftmax.output_scale)

    def gelu(self, node, mod, ins):
        x = self.as_a8(ins[0], node.args[0], node.name + "_in")
        s_out = self.clip(node) / Q8
        out = self.module(node.name, ShiftGELU(float(x.scale), s_out), (x.node,))
        self.layers.append(LayerRecord(node.name, "ShiftGELU", self.source_name(node), 8, x.scale, s_out))
        return QVal("a8", out, s_out)

    def layernorm(self, node, mod: FLayerNorm, ins):
        x = ins[0]
        if x.kind not in ("a8", "r16"):
            x = self.as_a8(x, node.args[0], node.name + "_in")
        s_out = self.channel_scale(node) if self.config.per_channel_norm else self.clip(node) / Q8
        op = ILayerNorm(mod.gamma.double().numpy(), mod.beta.double().numpy(), mod.eps, float(x.scale), s_out)
        out = self.module(node.name, op, (x.node,))
        self.layers.append(LayerRecord(node.name, "ILayerNorm", self.source_name(node), 8, x.scale, s_out))
        return QVal("a8", out, s_out)

    def add(self, node, mod, ins):
        s_out = self.clip(node) / Q16
        operands = []
        for i, qv in enumerate(ins):
            if qv.kind in ("const", "cchain"):
                s_c = self.const_amax(qv) / Q16
                operands.append(QVal("r16", self.quantize_const(qv, s_c, 16, f"{node.name}_c{i}"), s_c))
            elif qv.quantized and (qv.per_tensor or qv.kind == "a8"):
                operands.append(qv)
            elif qv.quantized:
                operands.append(self.as_a8(qv, node.args[i], f"{node.name}_in{i}"))
            else:
                self.unsupported.append((self.source_name(node), "Add", f"adding a {qv.kind} value"))
                return QVal("bad")
        a, b = operands
        op = IntAdd(np.asarray(a.scale, dtype=np.float64) / s_out, np.asarray(b.scale, dtype=np.float64) / s_out)
        out = self.module(node.name, op, (a.node, b.node))
        self.layers.append(LayerRecord(node.name, "IntAdd", self.source_name(node), 16, [a.scale, b.scale], s_out))
        return QVal("r16", out, s_out)

    # ------------------------------------------------------------ ONNX nodes
    def onnx_node(self, node, mod: OnnxOp, ins) -> QVal:
        qvals = [q for q in ins if isinstance(q, QVal)]
        data = ins[0] if ins else None
        if mod.op_type in SHAPE_OF:
            return QVal("int", self.copy(node, ins))
        if all(q.kind == "int" for q in qvals):
            if node.meta.get("dtype") is not None and node.meta["dtype"].is_floating_point:
                self.unsupported.append((self.source_name(node), mod.op_type, "produces floats from integers"))
                return QVal("bad")
            return QVal("int", self.copy(node, ins))
        if mod.op_type == "Concat":
            return self.concat(node, mod, ins)
        if mod.op_type in MOVEMENT and isinstance(data, QVal):
            others_int = all(q.kind == "int" for q in ins[1:] if isinstance(q, QVal))
            if not others_int:
                self.unsupported.append((self.source_name(node), mod.op_type, "non-integer index or shape input"))
                return QVal("bad")
            if data.quantized:
                if (
                    data.kind == "acc"
                    and not data.per_tensor
                    and mod.op_type not in ("Reshape", "Squeeze", "Unsqueeze", "Gather", "Slice", "Expand", "Identity")
                ):
                    data = self.as_a8(data, node.args[0], node.name + "_in")
                    ins = [data] + list(ins[1:])
                return dataclasses.replace(data, node=self.copy(node, ins))
            if data.kind in ("const", "cchain"):
                if mod.op_type == "Gather":  # embedding lookup: quantize the table here
                    s = self.const_amax(data) / Q8
                    table = self.quantize_const(data, s, 8, node.name + "_table")
                    out = self.copy(node, [QVal("a8", table, s)] + list(ins[1:]))
                    self.layers.append(LayerRecord(node.name, "Gather", self.source_name(node), 8, None, s))
                    return QVal("a8", out, s)
                # shape-only op on a constant: replayed on the integers once the consumer picks a scale
                name = self.copy_module(node, mod)
                args = [None] + [q.node if isinstance(q, QVal) else q for q in ins[1:]]
                base = data.const if data.kind == "const" else data.replay_base
                return QVal("cchain", replay=list(data.replay) + [(name, args)], replay_base=base)
        why = "float arithmetic inside the quantized region" if any(q.quantized for q in qvals) else "unsupported here"
        self.unsupported.append((self.source_name(node), mod.op_type, why))
        return QVal("bad")

    def _keeps_last_axis(self, node, mod) -> bool:
        """Whether a movement op leaves the last axis (and so per-channel scales) in place."""
        src, out = node.args[0].meta.get("shape"), node.meta.get("shape")
        if src is None or out is None or len(src) == 0 or len(out) == 0 or src[-1] != out[-1]:
            return False
        if mod.op_type in ("Gather", "Slice"):
            axis = mod.attrs.get("axis", 0)
            if mod.op_type == "Slice":
                return False  # axes come as an input; not worth resolving here
            return axis % len(src) != len(src) - 1
        if mod.op_type == "Transpose":
            perm = list(mod.attrs.get("perm", []))
            return bool(perm) and perm[-1] == len(src) - 1
        return mod.op_type in ("Squeeze", "Unsqueeze", "Expand", "Identity", "Reshape", "Flatten")

    def concat(self, node, mod, ins):
        qs = [q for q in ins if isinstance(q, QVal)]
        scales = [float(q.scale) for q in qs if q.quantized and q.per_tensor]
        if not scales:
            self.unsupported.append((self.source_name(node), "Concat", "no quantized input"))
            return QVal("bad")
        s_out = max(scales)
        new_args = []
        for i, q in enumerate(ins):
            if not isinstance(q, QVal):
                new_args.append(q)
            elif q.kind in ("const", "cchain"):
                new_args.append(QVal("a8", self.quantize_const(q, s_out, 8, f"{node.name}_c{i}"), s_out))
            elif q.kind == "a8" and float(q.scale) == s_out:
                new_args.append(q)
            elif q.quantized:
                rq = self.module(
                    f"{node.name}_rq{i}", Requantize(np.asarray(q.scale, dtype=np.float64) / s_out), (q.node,)
                )
                new_args.append(QVal("a8", rq, s_out))
            else:
                self.unsupported.append((self.source_name(node), "Concat", f"concatenating a {q.kind} value"))
                return QVal("bad")
        return QVal("a8", self.copy(node, new_args), s_out)

    def copy_module(self, node, mod) -> str:
        name = node.target
        if not hasattr(self.root, name):
            self.root.add_module(name, mod)
        return name

    def copy(self, node, ins) -> fx.Node:
        mod = self.src.get_submodule(node.target)
        name = self.copy_module(node, mod)
        args = tuple(q.node if isinstance(q, QVal) else q for q in ins)
        new = self.graph.call_module(name, args)
        new.meta["onnx_name"] = node.meta.get("onnx_name", node.name)
        return new


def _get_attr(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _jsonable(scale):
    arr = np.asarray(scale, dtype=np.float64)
    return float(arr) if arr.ndim == 0 or arr.size == 1 else arr.tolist()


def convert(gm: fx.GraphModule, observers, config) -> tuple[fx.GraphModule, list[LayerRecord], list[dict]]:
    conv = Converter(gm, observers, config)
    out = conv.run()
    return out, conv.layers, conv.output_meta
