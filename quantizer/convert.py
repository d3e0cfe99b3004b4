"""Convert a calibrated canonical float graph into an integer-only graph.

Every value of the integer graph has a *kind* and a real-valued *scale*:

- ``a8``: an activation in an int8 tensor, per-tensor scale ``S`` (value ~=
  q * S), its integers inside a range ``[lo, hi]`` (``base.activation_range``:
  ``[-128, 127]``, ``[-8, 7]``, unsigned ``[0, 15]`` / ``[0, 127]``);
- ``r16``: int16 residual stream, per-tensor scale;
- ``acc``: int32 accumulator, per-tensor scale or a vector along the last
  axis (a linear layer's ``S_x * S_w[c]``), only fed to Shiftmax, a
  requantize or a dequantizer;
- ``int``: integers that are not quantized reals (token ids, shapes);
- ``const`` / ``cchain``: a float constant (or one moved by shape-only ops),
  quantized where it is consumed, at the scale its consumer needs.

Rules (float op -> integer op, output kind):

=============  ==========================================  ===========
FLinear        IntLinear (IntLinearAcc if it feeds only    a8 (acc,
               the graph outputs, IntLinear16 if only      r16)
               residual adds)
FConv2d        IntConv2d                                   a8
FClamp         fused into its producer's requantize        a8
               (conv, linear, residual add, requantize)
               as the clamp range; else ONNX Clip on int8
FAvgPool       depthwise IntConv2d, all-ones weights,      a8
               ratio S_in / (S_out * kh * kw)
MaxPool        the same ONNX op on the int8 tensor         unchanged
FMatMul        IntMatMul (IntMatMulAcc when a softmax,     a8 (acc)
               through scalings, consumes it)
FScale         none: the scale absorbs the factor          unchanged
FSoftmax       Shiftmax                                    a8, 1/128
FMasked-       MaskedShiftmax(x, Unsqueeze(mask)): the     a8, 1/128
Softmax        attention mask's integers, unchanged
FGelu          ShiftGELU                                   a8
FLayerNorm     ILayerNorm                                  a8
FTable         IntLookup: the function at the 256 int8     a8 (>= 0:
               grid points, per channel if it varies       unsigned)
FMul           IntMul: int8 x int8, one dyadic requantize  a8
FAdd           IntAdd; a 4-D add whose only user is a      r16 (a8)
               clamp (HAWQV3 residual + ReLU): IntAdd
               with the clamp's range, int8
Concat         inputs requantized to one scale and range   a8
movement ops   the same ONNX op on the integers            unchanged
=============  ==========================================  ===========

Bits.  Each weighted layer (FConv2d, FLinear) gets ``config.bits_for`` its
ONNX node name (the first and last in graph order count as first/last): its
weights are symmetric per output channel, ``S_w[c] = max|W[c]| / q_w``
with ``q_w = 2**(b-1) - 1`` (127; 7 for 4-bit weights, stored packed as
INT4), bias int32 at ``S_x * S_w[c]``.  An activation's width is chosen by
looking ahead: the largest width among the weighted layers it feeds,
through clamps, pooling, adds, concatenations and movement ops; 8 when it
feeds none.  Its range is signed, or unsigned where a fused clamp has
``lo >= 0``; its scale is ``S = clip / hi`` with ``clip`` the calibrated
clip of the value (after the clamp, for a fused one) or a caller's
override (``clips``, from QAT).  The residual stream keeps ``clip / 32767``.

Any other float op on a quantized value is unsupported; all of them are
reported together, by ONNX node name and op type.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from onnx import helper

from intq.export.onnx_reader import OnnxOp
from intq.quantizer.canonical import (
    FAdd,
    FAvgPool,
    FClamp,
    FConv2d,
    FGelu,
    FLayerNorm,
    FLinear,
    FMaskedSoftmax,
    FMatMul,
    FMul,
    FScale,
    FSoftmax,
    FTable,
)
from intq.quantizer.ops.add import IntAdd
from intq.quantizer.ops.base import ONNX_OPSET, activation_range
from intq.quantizer.ops.boundary import Dequantize, Quantize
from intq.quantizer.ops.conv import IntConv2d
from intq.quantizer.ops.layernorm import ILayerNorm
from intq.quantizer.ops.linear import ACC_LIMIT, INT8_PRODUCT_MAX, MAX_K, IntLinear, IntLinear16, IntLinearAcc
from intq.quantizer.ops.lookup import IntLookup, table_values
from intq.quantizer.ops.matmul import IntMatMul, IntMatMulAcc
from intq.quantizer.ops.mul import IntMul
from intq.quantizer.ops.requantize import Requantize
from intq.quantizer.ops.shiftgelu import ShiftGELU
from intq.quantizer.ops.shiftmax import MaskedShiftmax, Shiftmax

Q8, Q16 = 127, 32767
INT8_RANGE, INT16_RANGE = (-128, 127), (-32768, 32767)

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
    "Pad",
}
SHAPE_OF = {"Shape", "Size"}
QUANTIZED = ("a8", "r16", "acc")
WEIGHTED = (FConv2d, FLinear)
# float ops an activation's width is looked up through (they pass their input's integers on)
PASS_THROUGH = (FClamp, FAvgPool, FAdd, FScale)
PASS_THROUGH_ONNX = MOVEMENT | {"MaxPool", "Concat"}


_REDUCTION_HINT = (
    "a reduction of activations other than a global/average pooling (over H, W) or a LayerNorm's (over the last "
    "axis) has no integer form here; keep it after the model's output"
)
#: why an ONNX op on quantized values is refused, and what to do
REFUSAL_HINTS = {
    "Div": "a quotient of two activations has no integer form here (a division by a constant is a scale); "
    "multiply by a constant instead, or keep the division after the model's output",
    **{
        op: _REDUCTION_HINT
        for op in ("ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2")
    },
    "Sub": "a difference of two activations is not supported (their sum is); keep it after the model's output",
    "Pow": "a power with a non-constant exponent has no integer form here",
    "Where": "a selection between activations by a condition has no integer form here",
}


class UnsupportedModelError(ValueError):
    """The model contains operators that intq cannot run in integer arithmetic."""


@dataclasses.dataclass
class QVal:
    kind: str
    node: fx.Node | None = None
    scale: Any = None  # float or np.ndarray (per last-axis channel)
    const: torch.Tensor | None = None
    replay: list = dataclasses.field(default_factory=list)  # for cchain: [(module name, args with None for data)]
    replay_base: torch.Tensor | None = None  # for cchain: the constant before the replayed ops
    lo: int = -128  # a8: the integer range the values lie in
    hi: int = 127

    @property
    def quantized(self) -> bool:
        return self.kind in QUANTIZED

    @property
    def per_tensor(self) -> bool:
        return np.ndim(self.scale) == 0 or np.size(self.scale) == 1


@dataclasses.dataclass
class LayerRecord:
    """One integer op of the converted graph.

    ``bits``: a weighted layer's width (weights and input); for the other
    ops the width of the activation they produce (16 for the residual
    stream).  ``out_range``: the output's integer range, None for a raw
    accumulator.
    """

    name: str
    op: str
    source: str
    bits: int
    in_scale: Any = None
    out_scale: Any = None
    out_range: tuple[int, int] | None = None


class Converter:
    def __init__(self, gm: fx.GraphModule, observers, config, clips: dict[str, float] | None = None):
        self.src = gm
        self.obs = observers
        self.config = config
        self.clips = dict(clips or {})
        self.root = torch.nn.Module()
        self.graph = fx.Graph()
        self.env: dict[fx.Node, QVal] = {}
        self.unsupported: list[tuple[str, str, str]] = []
        self.layers: list[LayerRecord] = []
        self.output_meta: list[dict] = []
        self.sites: dict[str, dict] = {}  # fx node name -> the clip and integer range its activation got
        self.fused: set[fx.Node] = set()  # clamps folded into their producer
        self.key_masks: dict[tuple[fx.Node, int], fx.Node] = {}  # (mask input, rank) -> its unsqueezed keep mask
        self.layer_bits = self.plan_layer_bits()
        self.need = self.plan_activation_bits()

    # ------------------------------------------------------------ bits
    def plan_layer_bits(self) -> dict[fx.Node, int]:
        """Each weighted layer's width (``QuantConfig.bits_for``); unknown ``layer_bits`` names are refused."""
        weighted = [n for n in self.src.graph.nodes if self._is(n, WEIGHTED)]
        names = {self.source_name(n): n for n in weighted}
        unknown = sorted(set(self.config.layer_bits) - set(names))
        if unknown:
            raise ValueError(
                f"layer_bits names {unknown} are not weighted layers of this model; its conv/linear layers are "
                f"{sorted(names)} (ONNX node names)."
            )
        ends = {weighted[0], weighted[-1]} if weighted else set()
        return {n: self.config.bits_for(self.source_name(n), n in ends) for n in weighted}

    def plan_activation_bits(self) -> dict[fx.Node, int | None]:
        """Per node, the largest width among the weighted layers its value reaches (None: none)."""
        need: dict[fx.Node, int | None] = {}
        for node in reversed(list(self.src.graph.nodes)):
            widths = []
            for user in node.users:
                if user in self.layer_bits:
                    widths.append(self.layer_bits[user])
                elif self._passes_width(user):
                    widths.append(need.get(user))
            known = [w for w in widths if w is not None]
            need[node] = max(known) if known else None
        return need

    def _passes_width(self, node: fx.Node) -> bool:
        if node.op == "call_function":
            return node.target is operator.getitem
        if node.op != "call_module":
            return False
        mod = self.src.get_submodule(node.target)
        return isinstance(mod, PASS_THROUGH) or (isinstance(mod, OnnxOp) and mod.op_type in PASS_THROUGH_ONNX)

    def bits_of(self, node: fx.Node) -> int:
        """The width of ``node``'s value as an activation (8 when it feeds no weighted layer)."""
        return self.need.get(node) or 8

    def _is(self, node, cls) -> bool:
        return node.op == "call_module" and isinstance(self.src.get_submodule(node.target), cls)

    # ------------------------------------------------------------ helpers
    def clip(self, node: fx.Node, qmax: int = Q8) -> float:
        if node.name in self.clips:
            return float(self.clips[node.name])
        ob = self.obs.get(node.name)
        if ob is None:
            raise UnsupportedModelError(f"internal: no calibration statistics for node {node.name!r}")
        return ob.clip(self.config.calibration.value, qmax, self.config.percentile)

    def act_scale(self, node: fx.Node, lo: int, hi: int) -> float:
        """``clip / hi`` for ``node``'s value quantized into ``[lo, hi]``; recorded as a quantization site."""
        c = self.clip(node, hi)
        self.sites[node.name] = {"clip": c, "qmin": int(lo), "qmax": int(hi)}
        return c / hi

    def out_range(self, node: fx.Node, clamp: FClamp | None = None) -> tuple[int, int]:
        """The integer range of ``node``'s value: its width, unsigned when a clamp keeps it >= 0."""
        return activation_range(self.bits_of(node), clamp is not None and clamp.lo >= 0)

    def clamp_bounds(self, clamp: FClamp, scale: float, lo: int, hi: int) -> tuple[int, int]:
        """``[lo, hi]`` narrowed to the clamp's float bounds on the grid ``scale`` (rounded to nearest)."""
        qlo = lo if clamp.lo == -math.inf else max(lo, math.floor(clamp.lo / scale + 0.5))
        qhi = hi if clamp.hi == math.inf else min(hi, math.floor(clamp.hi / scale + 0.5))
        return qlo, qhi

    def fusable_clamp(self, node: fx.Node) -> tuple[fx.Node, FClamp] | None:
        """The clamp that is ``node``'s only user, to fold into ``node``'s requantize.

        Not when the clamp's bounds leave no two integers apart (a clamp to a
        constant): the clamp then runs on its own.
        """
        users = list(node.users)
        if len(users) != 1 or not self._is(users[0], FClamp):
            return None
        clamp = self.src.get_submodule(users[0].target)
        return (users[0], clamp) if clamp.lo < clamp.hi and clamp.hi > 0 and clamp.lo < self.clip(users[0]) else None

    def requant_target(self, node: fx.Node) -> tuple[float, int, int]:
        """``(scale, qmin, qmax)`` of the requantize that ends ``node``, with its only-user clamp folded in."""
        fused = self.fusable_clamp(node)
        if fused is None:
            lo, hi = self.out_range(node)
            return self.act_scale(node, lo, hi), lo, hi
        clamp_node, clamp = fused
        lo, hi = self.out_range(clamp_node, clamp)
        scale = self.act_scale(clamp_node, lo, hi)
        qlo, qhi = self.clamp_bounds(clamp, scale, lo, hi)
        self.fused.add(clamp_node)
        self.sites[clamp_node.name].update(qmin=qlo, qmax=qhi)
        return scale, qlo, qhi

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

    def int8_clip(self, qv: QVal, lo: int, hi: int, hint: str) -> QVal:
        """A standard ONNX ``Clip`` of an int8 value to ``[lo, hi]`` (scale unchanged)."""
        lo_node = self.buffer(hint + "_min", torch.tensor(lo, dtype=torch.int8))
        hi_node = self.buffer(hint + "_max", torch.tensor(hi, dtype=torch.int8))
        name = "".join(c if c.isalnum() else "_" for c in hint).strip("_")
        op = OnnxOp(helper.make_node("Clip", ["x", "min", "max"], [name], name=name), ONNX_OPSET)
        node = self.module(hint, op, (qv.node, lo_node, hi_node))
        op.onnx_name = node.target
        return dataclasses.replace(qv, node=node, lo=lo, hi=hi)

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

    def quantize_const(
        self, qv: QVal, scale: float, bits: int, hint: str, rng: tuple[int, int] | None = None
    ) -> fx.Node:
        """The constant as int8 (``bits`` 8) or int16 (16) at ``scale``, saturated to ``rng`` (the dtype's range)."""
        lo, hi = rng or (INT8_RANGE if bits == 8 else INT16_RANGE)
        dtype = torch.int8 if bits == 8 else torch.int16
        base = qv.const if qv.kind == "const" else qv.replay_base
        q = torch.round(base.double() / scale).clamp(lo, hi).to(dtype)
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
        value is requantized onto one per-tensor scale.  A requantized value
        gets ``float_node``'s width (``bits_of``), signed.
        """
        if qv.kind == "a8" and (qv.per_tensor or allow_channel):
            return qv
        if qv.kind in ("const", "cchain"):
            s = self.const_amax(qv) / Q8
            return QVal("a8", self.quantize_const(qv, s, 8, hint + "_q"), s)
        if qv.kind in ("r16", "acc", "a8"):
            lo, hi = self.out_range(float_node)
            s_out = self.act_scale(float_node, lo, hi)
            ratio = np.asarray(qv.scale, dtype=np.float64) / s_out
            node = self.module(hint + "_rq", Requantize(ratio, lo, hi), (qv.node,))
            bits = self.bits_of(float_node)
            rec = LayerRecord(hint + "_rq", "Requantize", self.source_name(float_node), bits, qv.scale, s_out, (lo, hi))
            self.layers.append(rec)
            return QVal("a8", node, s_out, lo=lo, hi=hi)
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
                "intq supports Linear/MatMul/Gemm, Conv (with BatchNorm, zero Pad and per-channel scales folded "
                "in), Relu/Clip, MaxPool, AveragePool/GlobalAveragePool, Softmax (with a padding attention mask), "
                "GELU, LayerNorm, any elementwise function of one activation (Sigmoid, HardSwish, SiLU, Tanh, Exp, "
                "Erf, LeakyRelu, PRelu, ...: a lookup table), products and sums of activations, Concat, scaling "
                "by a constant and shape-only ops between the input and the output. Re-export the model without "
                "these ops, or keep them outside the quantized region."
            )
        gm = fx.GraphModule(self.root, self.graph)
        gm.graph.lint()
        gm.meta["quant_sites"] = self.sites
        gm.meta["layer_bits"] = {n.name: b for n, b in self.layer_bits.items()}
        return gm

    def do_placeholder(self, node):
        new = self.graph.placeholder(node.name)
        new.meta.update(node.meta)
        if node.meta.get("dtype") is not None and node.meta["dtype"].is_floating_point:
            lo, hi = self.out_range(node)
            s = self.act_scale(node, lo, hi)
            q = self.module(f"{node.name}_quant", Quantize(s), (new,))
            bits = self.bits_of(node)
            self.layers.append(
                LayerRecord(f"{node.name}_quant", "Quantize", self.source_name(node), bits, None, s, (lo, hi))
            )
            qv = QVal("a8", q, s)
            if (lo, hi) != INT8_RANGE:  # QuantizeLinear saturates to int8; a Clip narrows: one rounding, one clamp
                qv = self.int8_clip(qv, lo, hi, f"{node.name}_clip")
                self.layers.append(LayerRecord(qv.node.target, "Clip", self.source_name(node), bits, s, s, (lo, hi)))
            self.env[node] = qv
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
            FMaskedSoftmax: self.masked_softmax,
            FTable: self.table,
            FMul: self.mul,
            FGelu: self.gelu,
            FLayerNorm: self.layernorm,
            FAdd: self.add,
            FClamp: self.clamp,
            FAvgPool: self.avg_pool,
        }.get(type(mod))
        if rule is None:
            self.unsupported.append((name, type(mod).__name__, "no integer rule"))
            self.env[node] = QVal("bad")
            return
        self.env[node] = rule(node, mod, ins)

    # ------------------------------------------------------------ rules
    def _weights(self, w: torch.Tensor, b: torch.Tensor | None, s_x, bits: int = 8, where: str = ""):
        """Per-output-channel ``bits``-bit weights of ``W * S_x`` and the int32 bias.

        ``S_x`` is the input's scale: a scalar, or one per input channel
        (a LayerNorm output); folding it into the weights first makes the
        accumulator's scale ``S_acc[n] = max_k |W[n,k] S_x[k]| / q_w``,
        ``q_w = 2**(bits-1) - 1`` (the weights lie in ``[-q_w, q_w]``).

        Bias floor: the int32 accumulator holds ``sum_k x w + b`` with
        ``|sum_k x w| <= K * 2**14``, so the bias gets what is left,
        ``B = 2**31 - 2 - K * 2**14``, and ``S_acc[n] >= |b[n]| / B``.  A
        near-dead channel (a BatchNorm gain ~ 0 folded in: weights ~ 0, bias
        not) then keeps its bias exactly as a real value (``b_q * S_acc ~ b``)
        and its weights round to ~0, as they are; without the floor its bias
        would saturate at ``2**31``.  onnxruntime's quantizer raises weight
        scales for the int32 bias for the same reason.  A channel that is 0
        in weights and bias keeps ``S_acc = 1e-30 / q_w`` and computes 0.
        """
        if w.numel() == 0:
            raise UnsupportedModelError(
                f"layer {where!r}: its weight has shape {list(w.shape)}, zero elements, so it computes an empty "
                "tensor; remove the layer (or give it at least one input and one output channel) and re-export."
            )
        q_w = (1 << (bits - 1)) - 1
        w = w.double()
        s_x = torch.as_tensor(np.asarray(s_x, dtype=np.float64))
        if s_x.dim() == 1 and s_x.numel() > 1:
            w = w * s_x.reshape((1, -1) + (1,) * (w.dim() - 2))
        else:
            w = w * float(s_x)
        axes = tuple(range(1, w.dim()))
        acc_scale = w.abs().amax(dim=axes).clamp_min(1e-30) / q_w
        if b is not None:
            k = w[0].numel()
            budget = ACC_LIMIT - 2 - k * INT8_PRODUCT_MAX
            if budget <= 0:
                raise UnsupportedModelError(
                    f"layer {where!r}: its reduction length K = {k} (input channels x kernel) leaves no room for a "
                    f"bias in the int32 accumulator (K * 128 * 128 >= 2**31); K must stay below {MAX_K}. Split the "
                    "layer into smaller ones, or keep it outside the quantized model."
                )
            acc_scale = torch.maximum(acc_scale, b.double().abs() / budget)
        shape = (-1,) + (1,) * (w.dim() - 1)
        w_q = torch.round(w / acc_scale.reshape(shape)).clamp(-q_w, q_w).to(torch.int8)
        if b is None:
            b_q = torch.zeros(w.shape[0], dtype=torch.int32)
        else:
            b_q = torch.round(b.double() / acc_scale).to(torch.int32)  # |b_q| <= budget + 1/2 by the floor
        return w_q.numpy(), b_q.numpy(), acc_scale.numpy()

    def _feeds_only_adds(self, node) -> bool:
        return all(u.op == "call_module" and isinstance(self.src.get_submodule(u.target), FAdd) for u in node.users)

    def _feeds_only_outputs(self, node) -> bool:
        return all(u.op == "output" for u in node.users)

    def linear(self, node, mod: FLinear, ins):
        bits = self.layer_bits[node]
        x = self.as_a8(ins[0], node.args[0], node.name + "_in", allow_channel=bits == 8)
        w, b, acc_scale = self._weights(mod.weight, mod.bias, x.scale, bits, self.source_name(node))
        source = self.source_name(node)
        if self._feeds_only_outputs(node):
            out = self.module(node.name, IntLinearAcc(w, b, weight_bits=bits), (x.node,))
            self.layers.append(LayerRecord(node.name, "IntLinearAcc", source, bits, x.scale, None))
            return QVal("acc", out, acc_scale)
        if self._feeds_only_adds(node):  # into the int16 residual stream: keep 16 bits
            s_out = self.act_scale(node, *INT16_RANGE)
            out = self.module(node.name, IntLinear16(w, b, acc_scale / s_out, weight_bits=bits), (x.node,))
            self.layers.append(LayerRecord(node.name, "IntLinear16", source, bits, x.scale, s_out, INT16_RANGE))
            return QVal("r16", out, s_out, lo=INT16_RANGE[0], hi=INT16_RANGE[1])
        s_out, lo, hi = self.requant_target(node)
        op = IntLinear(w, b, acc_scale / s_out, lo, hi, weight_bits=bits)
        out = self.module(node.name, op, (x.node,))
        self.layers.append(LayerRecord(node.name, "IntLinear", source, bits, x.scale, s_out, (lo, hi)))
        return QVal("a8", out, s_out, lo=lo, hi=hi)

    def conv(self, node, mod: FConv2d, ins):
        bits = self.layer_bits[node]
        x = self.as_a8(ins[0], node.args[0], node.name + "_in")
        w, b, acc_scale = self._weights(mod.weight, mod.bias, x.scale, bits, self.source_name(node))
        s_out, lo, hi = self.requant_target(node)
        op = IntConv2d(
            w, b, acc_scale / s_out, mod.stride, mod.pads, mod.dilation, mod.groups, lo, hi, weight_bits=bits
        )
        out = self.module(node.name, op, (x.node,))
        self.layers.append(LayerRecord(node.name, "IntConv2d", self.source_name(node), bits, x.scale, s_out, (lo, hi)))
        return QVal("a8", out, s_out, lo=lo, hi=hi)

    def clamp(self, node, mod: FClamp, ins):
        """A clamp its producer did not absorb: a requantize with the clamp range, or an int8 ``Clip``."""
        if node in self.fused:
            return ins[0]
        qv = ins[0]
        if qv.kind in ("r16", "acc") or (qv.kind == "a8" and not qv.per_tensor):
            lo, hi = self.out_range(node, mod)
            s_out = self.act_scale(node, lo, hi)
            qlo, qhi = self.clamp_bounds(mod, s_out, lo, hi)
            if qlo >= qhi:
                self.unsupported.append((self.source_name(node), "Clip", f"clamps everything to one value {mod}"))
                return QVal("bad")
            self.sites[node.name].update(qmin=qlo, qmax=qhi)
            out = self.module(
                node.name, Requantize(np.asarray(qv.scale, dtype=np.float64) / s_out, qlo, qhi), (qv.node,)
            )
            bits = self.bits_of(node)
            self.layers.append(
                LayerRecord(node.name, "Requantize", self.source_name(node), bits, qv.scale, s_out, (qlo, qhi))
            )
            return QVal("a8", out, s_out, lo=qlo, hi=qhi)
        if qv.kind != "a8":
            self.unsupported.append((self.source_name(node), "Clip", f"clamping a {qv.kind} value"))
            return QVal("bad")
        qlo, qhi = self.clamp_bounds(mod, float(qv.scale), qv.lo, qv.hi)
        if (qlo, qhi) == (qv.lo, qv.hi):
            return qv  # the range already lies inside the clamp
        if qlo > qhi:
            self.unsupported.append((self.source_name(node), "Clip", f"clamps everything to one value {mod}"))
            return QVal("bad")
        out = self.int8_clip(qv, qlo, qhi, node.name)
        self.layers.append(
            LayerRecord(
                out.node.target, "Clip", self.source_name(node), self.bits_of(node), qv.scale, qv.scale, (qlo, qhi)
            )
        )
        return out

    def avg_pool(self, node, mod: FAvgPool, ins):
        """Average pooling as a depthwise ``IntConv2d``: all-ones weights, ``ratio = S_in / (S_out * kh * kw)``."""
        x = self.as_a8(ins[0], node.args[0], node.name + "_in")
        shape = node.args[0].meta.get("shape")
        if mod.kernel is None:
            dynamic = [i["name"] for i in self.src.meta.get("inputs", []) if not _static_after_batch(i.get("shape"))]
            if dynamic:
                self.unsupported.append(
                    (
                        self.source_name(node),
                        "GlobalAveragePool",
                        f"global pooling needs a static H x W, but input(s) {dynamic} have dynamic dims after the "
                        "batch axis; export the model with a fixed image size",
                    )
                )
                return QVal("bad")
            kernel, stride, pads = tuple(shape[2:]), (1, 1), (0, 0, 0, 0)
        else:
            kernel, stride, pads = mod.kernel, mod.stride, mod.pads
        channels = shape[1]
        lo, hi = activation_range(self.bits_of(node), x.lo >= 0)
        s_out = self.act_scale(node, lo, hi)
        ones = np.ones((channels, 1) + tuple(kernel), np.int8)
        ratio = float(x.scale) / (s_out * kernel[0] * kernel[1])
        op = IntConv2d(ones, None, ratio, stride, pads, 1, channels, lo, hi)
        out = self.module(node.name, op, (x.node,))
        self.layers.append(
            LayerRecord(node.name, "IntConv2d", self.source_name(node), self.bits_of(node), x.scale, s_out, (lo, hi))
        )
        return QVal("a8", out, s_out, lo=lo, hi=hi)

    def _feeds_softmax(self, node) -> bool:
        while True:
            users = list(node.users)
            if len(users) != 1 or users[0].op != "call_module":
                return False
            mod = self.src.get_submodule(users[0].target)
            if isinstance(mod, (FSoftmax, FMaskedSoftmax)) and users[0].args[0] is node:
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
        s_out = self.act_scale(node, *INT8_RANGE)
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

    def table(self, node, mod: FTable, ins):
        """``IntLookup``: ``mod`` evaluated at the 256 grid points of the int8 input, per channel if it varies.

        The output range is unsigned where the function is >= 0 at every grid point (a sigmoid, a gate), so
        its step is half as large.
        """
        x = self.as_a8(ins[0], node.args[0], node.name + "_in")
        rank = len(node.meta.get("shape") or ())
        with torch.no_grad():
            values = table_values(mod, float(x.scale), mod.channels, mod.axis, max(rank, 1))
        finite = values[torch.isfinite(values)]
        unsigned = finite.numel() > 0 and bool((finite >= 0).all())
        lo, hi = activation_range(self.bits_of(node), unsigned)
        s_out = self.act_scale(node, lo, hi)
        op = IntLookup.from_values(values, s_out, lo, hi, mod.axis, max(rank, 1))
        out = self.module(node.name, op, (x.node,))
        self.layers.append(
            LayerRecord(node.name, "IntLookup", self.source_name(node), self.bits_of(node), x.scale, s_out, (lo, hi))
        )
        return QVal("a8", out, s_out, lo=lo, hi=hi)

    def mul(self, node, mod: FMul, ins):
        """``IntMul``: both operands int8 (a constant quantized at its own scale), one dyadic requantize."""
        operands = []
        for i, qv in enumerate(ins):
            if qv.kind in ("const", "cchain"):
                s_c = self.const_amax(qv) / Q8
                operands.append(QVal("a8", self.quantize_const(qv, s_c, 8, f"{node.name}_c{i}"), s_c))
            elif qv.quantized:
                operands.append(self.as_a8(qv, node.args[i], f"{node.name}_in{i}"))
            else:
                self.unsupported.append((self.source_name(node), "Mul", f"multiplying a {qv.kind} value"))
                return QVal("bad")
        a, b = operands
        if self.fusable_clamp(node) is None and a.lo >= 0 and b.lo >= 0:
            lo, hi = activation_range(self.bits_of(node), True)  # a product of two non-negative values
            s_out = self.act_scale(node, lo, hi)
        else:
            s_out, lo, hi = self.requant_target(node)
        out = self.module(node.name, IntMul(float(a.scale) * float(b.scale) / s_out, lo, hi), (a.node, b.node))
        self.layers.append(
            LayerRecord(
                node.name, "IntMul", self.source_name(node), self.bits_of(node), [a.scale, b.scale], s_out, (lo, hi)
            )
        )
        return QVal("a8", out, s_out, lo=lo, hi=hi)

    def masked_softmax(self, node, mod: FMaskedSoftmax, ins):
        """``MaskedShiftmax(x, keep)`` with ``keep`` the mask input unsqueezed to ``[B, 1, ..., 1, L]``."""
        x, mask = ins
        if mask.kind != "int":
            self.unsupported.append((self.source_name(node), "Softmax", f"the attention mask is a {mask.kind} value"))
            return QVal("bad")
        if x.kind != "acc" or not x.per_tensor:
            x = self.as_a8(x, node.args[0], node.name + "_in")
        keep = self.key_mask(mask.node, len(node.meta["shape"]))
        out = self.module(node.name, MaskedShiftmax(float(x.scale)), (x.node, keep))
        self.layers.append(
            LayerRecord(node.name, "MaskedShiftmax", self.source_name(node), 8, float(x.scale), Shiftmax.output_scale)
        )
        return QVal("a8", out, Shiftmax.output_scale)

    def key_mask(self, mask: fx.Node, rank: int) -> fx.Node:
        """``Unsqueeze(mask [B, L], axes 1 .. rank-2)`` (an ONNX op on the integers), one per mask and rank."""
        key = (mask, rank)
        if key not in self.key_masks:
            name = f"{mask.name}_keys{rank}d"
            axes = self.buffer(name + "_axes", torch.arange(1, rank - 1, dtype=torch.int64))
            op = OnnxOp(helper.make_node("Unsqueeze", ["mask", "axes"], [name], name=name), ONNX_OPSET)
            self.key_masks[key] = self.module(name, op, (mask, axes))
            op.onnx_name = self.key_masks[key].target
        return self.key_masks[key]

    def gelu(self, node, mod, ins):
        x = self.as_a8(ins[0], node.args[0], node.name + "_in")
        s_out = self.act_scale(node, *INT8_RANGE)
        out = self.module(node.name, ShiftGELU(float(x.scale), s_out), (x.node,))
        self.layers.append(LayerRecord(node.name, "ShiftGELU", self.source_name(node), 8, x.scale, s_out))
        return QVal("a8", out, s_out)

    def layernorm(self, node, mod: FLayerNorm, ins):
        x = ins[0]
        if x.kind not in ("a8", "r16"):
            x = self.as_a8(x, node.args[0], node.name + "_in")
        s_out = self.channel_scale(node) if self.config.per_channel_norm else self.act_scale(node, *INT8_RANGE)
        op = ILayerNorm(mod.gamma.double().numpy(), mod.beta.double().numpy(), mod.eps, float(x.scale), s_out)
        out = self.module(node.name, op, (x.node,))
        self.layers.append(LayerRecord(node.name, "ILayerNorm", self.source_name(node), 8, x.scale, s_out))
        return QVal("a8", out, s_out)

    def add(self, node, mod, ins):
        # HAWQV3's residual: a 4-D add whose only user is a clamp (ReLU) requantizes both branches with one
        # shared shift straight into the clamp's int8 range; other adds feed the int16 residual stream.
        hawq = self.fusable_clamp(node) is not None and len(node.meta.get("shape") or ()) == 4
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
        if hawq:
            s_out, lo, hi = self.requant_target(node)
            kind, bits = "a8", self.bits_of(node)
        else:
            lo, hi = INT16_RANGE
            s_out = self.act_scale(node, lo, hi)
            kind, bits = "r16", 16
        ratio_a, ratio_b = (np.asarray(v.scale, dtype=np.float64) / s_out for v in (a, b))
        out = self.module(node.name, IntAdd(ratio_a, ratio_b, lo, hi), (a.node, b.node))
        self.layers.append(
            LayerRecord(node.name, "IntAdd", self.source_name(node), bits, [a.scale, b.scale], s_out, (lo, hi))
        )
        return QVal(kind, out, s_out, lo=lo, hi=hi)

    # ------------------------------------------------------------ ONNX nodes
    def onnx_node(self, node, mod: OnnxOp, ins) -> QVal:
        qvals = [q for q in ins if isinstance(q, QVal)]
        data = ins[0] if ins else None
        if mod.op_type in SHAPE_OF:
            return QVal("int", self.copy(node, ins))
        if all(q.kind == "int" for q in qvals):
            if node.meta.get("dtype") is not None and node.meta["dtype"].is_floating_point:
                why = node.meta.get("refused") or "produces floats from integers"
                self.unsupported.append((self.source_name(node), mod.op_type, why))
                return QVal("bad")
            return QVal("int", self.copy(node, ins))
        if mod.op_type == "Concat":
            return self.concat(node, mod, ins)
        if mod.op_type == "MaxPool" and isinstance(data, QVal) and data.quantized and len(mod.output_names) == 1:
            # max commutes with a positive scale: same scale, same range, on the int8 tensor
            data = self.as_a8(data, node.args[0], node.name + "_in")
            return dataclasses.replace(data, node=self.copy(node, [data]))
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
        if any(q.quantized for q in qvals) and mod.op_type in REFUSAL_HINTS:
            why = f"{why}: {REFUSAL_HINTS[mod.op_type]}"
        why = node.meta.get("refused") or why
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
        """Inputs requantized onto one scale and range: the largest clip, signed unless every input is >= 0."""
        args = list(ins)
        for i, q in enumerate(args):
            if isinstance(q, QVal) and q.quantized and (q.kind != "a8" or not q.per_tensor):
                args[i] = self.as_a8(q, node.args[i], f"{node.name}_in{i}")
        acts = [q for q in args if isinstance(q, QVal) and q.kind == "a8"]
        if not acts:
            self.unsupported.append((self.source_name(node), "Concat", "no quantized input"))
            return QVal("bad")
        lo, hi = activation_range(self.bits_of(node), all(q.lo >= 0 for q in acts))
        s_out = max(float(q.scale) * q.hi for q in acts) / hi
        new_args = []
        for i, q in enumerate(args):
            if not isinstance(q, QVal):
                new_args.append(q)
            elif q.kind in ("const", "cchain"):
                node_c = self.quantize_const(q, s_out, 8, f"{node.name}_c{i}", (lo, hi))
                new_args.append(QVal("a8", node_c, s_out, lo=lo, hi=hi))
            elif q.kind == "a8" and float(q.scale) == s_out and lo <= q.lo and q.hi <= hi:
                new_args.append(q)
            elif q.kind == "a8":
                ratio = float(q.scale) / s_out
                rq = self.module(f"{node.name}_rq{i}", Requantize(ratio, lo, hi), (q.node,))
                self.layers.append(
                    LayerRecord(
                        f"{node.name}_rq{i}",
                        "Requantize",
                        self.source_name(node),
                        self.bits_of(node),
                        q.scale,
                        s_out,
                        (lo, hi),
                    )
                )
                new_args.append(QVal("a8", rq, s_out, lo=lo, hi=hi))
            else:
                self.unsupported.append((self.source_name(node), "Concat", f"concatenating a {q.kind} value"))
                return QVal("bad")
        return QVal("a8", self.copy(node, new_args), s_out, lo=lo, hi=hi)

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


def _static_after_batch(shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in list(shape)[1:])


def convert(
    gm: fx.GraphModule, observers, config, clips: dict[str, float] | None = None
) -> tuple[fx.GraphModule, list[LayerRecord], list[dict]]:
    """The integer graph, its layer records and the output quantization metadata.

    ``clips``: fx node name -> a float clip that replaces that node's
    calibrated one (QAT's learned clips).  The integer graph's
    ``meta["quant_sites"]`` lists every activation quantized, by fx node
    name: ``{"clip", "qmin", "qmax"}``; ``meta["layer_bits"]`` each
    weighted layer's width, by fx node name.
    """
    conv = Converter(gm, observers, config, clips)
    out = conv.run()
    return out, conv.layers, conv.output_meta


def quantization_sites(gm: fx.GraphModule, observers, config) -> tuple[dict, dict[str, int]]:
    """What QAT fake-quantizes: ``({fx node name: ActSite}, {weighted layer's fx node name: bits})``.

    Read from a conversion of ``gm`` itself, so QAT simulates exactly the
    activations and weight widths the integer model will have.
    """
    from intq.quantizer.qat import ActSite

    out, _, _ = convert(gm, observers, config)
    sites = {name: ActSite(s["clip"], s["qmin"], s["qmax"]) for name, s in out.meta["quant_sites"].items()}
    return sites, dict(out.meta["layer_bits"])
