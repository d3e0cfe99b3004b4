"""The ILP's cost columns, per weighted layer and width: size, BOPs, and latency measured on the target.

For a weighted layer (a conv or linear layer of the float model, named by its
ONNX node as ``LayerRecord.source`` and ``quantizer.sensitivity`` name it)
with ``params`` weights, ``C`` output channels and ``macs`` multiply-
accumulates per sample, at ``b`` bits (``b``-bit weights and a ``b``-bit
input activation, as ``QuantConfig`` defines a layer's width):

    size_bytes[b] = ceil(params * b / 8) + 4 * C     (weights packed, 4-bit two per byte; int32 bias)
    bops[b]       = macs * b * b                     (per sample: HAWQV3's bit operations)
    latency[b]    = median seconds of the layer's own integer kernel on the target

``macs`` = output elements per sample (the first axis is the batch) times
weight elements per output channel, as ``quantizer.sensitivity`` counts them.
The per-channel requantize multipliers and shifts are left out of the size:
they are the same at every width.

Latency.  The layer's integer op (``IntLinear``, ``IntLinear16``,
``IntLinearAcc``, ``IntConv2d_...``) is written as a one-node integer ONNX
model (``single_op_model``: its own function, its weights as initializers,
4-bit ones packed as INT4 + ``Cast``) whose input has the dims the layer's
input has in the exported model (ONNX shape inference: the batch axis stays
symbolic where the model's is), compiled with ``passes.pipeline.compile_onnx``
for the target (the same import, schedules and weight packing as the whole
model) and timed by ``ilp.timing.Runner`` (TVM ``time_evaluator``, median of
``repeats``) on an int8 input of the example batch's shape: the shapes the
``QuantizedModel`` recorded from its first calibration batch.  Values do not
change an integer kernel's time; the input holds random integers of the
layer's input range.

The 4-bit latency of a layer is measured on its instance in ``qmodel_4bit``
(quantize with ``QuantConfig(bits=4, first_last_bits=4)`` so that every
layer has one).  A layer that is not at 4 bits there, or every layer when
no ``qmodel_4bit`` is given, is timed on a *synthetic* 4-bit instance: the
8-bit op with its weights mapped onto ``[-7, 7]`` (``round(w * 7 / 127)``)
and marked packed INT4, on an input in ``[-8, 7]``.  Its ONNX is what a
4-bit layer writes (packed INT4 weights, the same function), so it compiles
to the 4-bit kernel; only the output clamp range, which the layer's
consumers choose, may differ from a real 4-bit model's, and that changes
constants of the epilogue, not its work.  Such costs carry ``synthetic=True``.

What one-node timing leaves out: the whole model fuses an ``IntLinear16``
with the residual ``IntAdd`` that uses it, and an accumulator op with its
requantize (``passes/pipeline.py``); the one-node kernel has no such
epilogue, whose cost stays in the remainder below.

Remainder and prediction.  ``layer_costs`` also times the whole models
(``measure_model_latency``): ``T_8`` of ``qmodel_8bit`` and, when given,
``T_4`` of ``qmodel_4bit``, whose widths ``a4`` are 4 for the layers timed
on their own 4-bit instance and 8 for the synthetic ones.  The remainder is
the time outside the weighted layers' kernels (quantize, pooling,
attention, residual adds, movement, the requantize a 4-bit layer's output
gets on its own) plus the per-call overhead of the one-node measurements
(negative when that overhead is the larger).  Measured at two assignments:

    r_8    = T_8 - sum_i latency_i[8]                         (``remainder_s``)
    r(a4)  = T_4 - sum_i latency_i[a4_i]
    w(a)   = sum_{i: a_i = 4} latency_i[8] / sum_j latency_j[8]   (the share of the layers' time at 4 bits)
    r_4    = r_8 + (r(a4) - r_8) / w(a4)                      (``remainder_4_s``; r(a4) itself when a4 is all-4)

and linear in ``w`` between them, the model ``ilp.table`` states and the
ILP's latency budget uses (``ilp.table.remainder_shifts``):

    predict_latency(a) = r_8 + (r_4 - r_8) * w(a) + sum_i latency_i[a_i]

It equals ``T_8`` at all-8 and ``T_4`` at ``a4`` (all-4 when ``qmodel_4bit``
is quantized with ``first_last_bits=4``) by construction.  Without ``T_4``
(or when ``a4`` has no layer at 4 bits) ``r_4 = r_8``: the remainder is the
same at every width.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import helper
from tqdm.auto import tqdm

from intq.ilp.table import remainder_shifts
from intq.ilp.timing import RemoteSpec, Runner, check_timing
from intq.passes.pipeline import Compiled, compile_onnx
from intq.passes.targets import resolve_target
from intq.quantizer.ops.base import IntegerOp, activation_range
from intq.quantizer.ops.conv import IntConv2d
from intq.quantizer.ops.linear import IntLinear, IntLinearAcc
from intq.quantizer.ops.onnx_fn import single_op_model

__all__ = [
    "Cost",
    "CostTable",
    "RemoteSpec",
    "WeightedLayer",
    "as_4bit",
    "layer_costs",
    "layer_model",
    "measure_model_latency",
    "model_layer_bits",
    "predict_latency",
    "weighted_layers",
]

#: the converter's record ops of weighted layers (``LayerRecord.op``), and their module classes
WEIGHTED_OPS = ("IntLinear", "IntLinear16", "IntLinearAcc", "IntConv2d")
_WEIGHTED_CLASSES = (IntLinear, IntLinearAcc, IntConv2d)
BIAS_BYTES = 4  # int32


@dataclasses.dataclass(frozen=True)
class Cost:
    """One layer at one width (see the module docstring); ``latency_s`` None when not measured."""

    size_bytes: int
    bops: int
    latency_s: float | None = None
    synthetic: bool = False  # latency timed on a synthetic 4-bit instance (module docstring)


@dataclasses.dataclass(frozen=True)
class WeightedLayer:
    """A weighted layer of a ``QuantizedModel``, as the cost table sees it."""

    name: str  # the float model's ONNX node name (LayerRecord.source)
    node: str  # the integer graph's module, also the integer ONNX node's name
    op: IntegerOp
    bits: int
    input_shape: tuple[int, ...]  # of the example batch
    output_shape: tuple[int, ...]
    input_dims: tuple[int | str, ...] | None  # the input's dims in the exported ONNX (str: symbolic)

    @property
    def params(self) -> int:
        return int(self.op.w.numel())

    @property
    def out_channels(self) -> int:
        return int(self.op.w.shape[0])

    @property
    def macs(self) -> int:
        """Per sample: output elements per sample times weight elements per output channel."""
        per_sample = math.prod(self.output_shape[1:]) if len(self.output_shape) > 1 else math.prod(self.output_shape)
        return int(per_sample * self.op.w[0].numel())

    def size_bytes(self, bits: int) -> int:
        return math.ceil(self.params * bits / 8) + BIAS_BYTES * int(self.op.b.numel())

    def bops(self, bits: int) -> int:
        return self.macs * bits * bits


# ---------------------------------------------------------------- layers of a quantized model
def weighted_layers(qmodel, onnx_model: onnx.ModelProto | None = None) -> list[WeightedLayer]:
    """The weighted layers of ``qmodel`` in graph order (average pooling's depthwise convs excluded).

    ``onnx_model``: ``qmodel.to_onnx()`` if already built (the layers' input dims are read from it).
    """
    gm = qmodel.graph_module
    planned = gm.meta.get("layer_bits")
    if planned is None:
        raise ValueError("This QuantizedModel records no layer widths (graph meta 'layer_bits'); quantize it again.")
    records = [r for r in qmodel.layers if r.op in WEIGHTED_OPS]
    nodes = [
        n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _WEIGHTED_CLASSES)
    ]
    if len(records) != len(nodes):
        raise RuntimeError(
            f"internal: {len(records)} weighted layer records but {len(nodes)} integer conv/linear modules"
        )
    dims = _input_dims(onnx_model if onnx_model is not None else qmodel.to_onnx())
    out: list[WeightedLayer] = []
    for rec, node in zip(records, nodes, strict=True):
        op = gm.get_submodule(node.target)
        if type(op).op_type != rec.op:
            raise RuntimeError(f"internal: layer record {rec.name} ({rec.op}) pairs with module {node.target} ({op})")
        if rec.name not in planned:
            continue  # an average pooling
        arg = node.args[0]
        if "shape" not in node.meta or not hasattr(arg, "meta") or "shape" not in arg.meta:
            raise ValueError(
                f"Layer {rec.source!r}: the QuantizedModel has no example shapes (graph meta 'shape'); build it with "
                "intq.quantize, which records them from the first calibration batch."
            )
        out.append(
            WeightedLayer(
                name=rec.source,
                node=str(node.target),
                op=op,
                bits=int(rec.bits),
                input_shape=tuple(int(d) for d in arg.meta["shape"]),
                output_shape=tuple(int(d) for d in node.meta["shape"]),
                input_dims=dims.get(str(node.target)),
            )
        )
    names = [layer.name for layer in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"Several weighted layers come from the ONNX node(s) {dup}; give the nodes unique names.")
    return out


def model_layer_bits(qmodel) -> dict[str, int]:
    """Each weighted layer's width in ``qmodel``, by ONNX node name (the ``layer_bits`` of ``QuantConfig``)."""
    return {r.source: int(r.bits) for r in qmodel.layers if r.name in qmodel.graph_module.meta.get("layer_bits", {})}


def _input_dims(model: onnx.ModelProto) -> dict[str, tuple[int | str, ...]]:
    """Intq node name -> its first input's dims after ONNX shape inference (symbolic names kept)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            known[vi.name] = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim)
    return {n.name: known[n.input[0]] for n in model.graph.node if n.input and n.input[0] in known}


def as_4bit(op: IntegerOp) -> IntegerOp:
    """A synthetic 4-bit instance of an 8-bit conv/linear op (see the module docstring)."""
    op4 = copy.deepcopy(op)
    with torch.no_grad():
        op4.w.copy_(torch.round(op.w.to(torch.float64) * 7 / 127).clamp(-7, 7).to(torch.int8))
    op4.packed_int4 = frozenset({"w"})
    return op4


def layer_model(
    op: IntegerOp,
    input_shape: Sequence[int],
    input_dims: Sequence[int | str] | None = None,
    output_rank: int | None = None,
) -> onnx.ModelProto:
    """The one-node integer ONNX model of ``op`` (``single_op_model``) on an int8 input of ``input_shape``.

    ``input_dims``: the dims to declare instead (symbolic names where the full model has them); they must
    agree with ``input_shape`` wherever they are numbers.  ``output_rank``: declare the output with that
    many symbolic dims (its type then is complete, as TVM's ONNX frontend checks).
    """
    model = single_op_model(op, [np.zeros(tuple(input_shape), np.int8)])
    if output_rank is not None:
        y = model.graph.output[0]
        dims = [f"{y.name}_d{k}" for k in range(output_rank)]
        model.graph.output[0].CopyFrom(helper.make_tensor_value_info(y.name, y.type.tensor_type.elem_type, dims))
    if input_dims is not None:
        dims = list(input_dims)
        fixed = [(d, s) for d, s in zip(dims, input_shape, strict=False) if isinstance(d, int) and d > 0]
        if len(dims) != len(input_shape) or any(d != s for d, s in fixed):
            raise ValueError(f"{op.op_type}: input dims {dims} do not match the example shape {list(input_shape)}")
        dims = [d if (isinstance(d, str) and d) or d > 0 else f"d{k}" for k, d in enumerate(dims)]
        # the reduction axis (a linear's last, a conv's channels) is the weight's, static in the model; ONNX shape
        # inference loses it after a Reshape to a computed shape (MiniLM's attention output), so restore it
        axis = 1 if isinstance(op, IntConv2d) else len(dims) - 1
        dims[axis] = int(input_shape[axis])
        x = model.graph.input[0]
        model.graph.input[0].CopyFrom(helper.make_tensor_value_info(x.name, x.type.tensor_type.elem_type, dims))
    return model


def _layer_input(shape: Sequence[int], bits: int, seed: int) -> np.ndarray:
    lo, hi = activation_range(bits, False)
    return np.random.default_rng(seed).integers(lo, hi + 1, size=tuple(shape), dtype=np.int8)


# ---------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class CostTable(Mapping):
    """``{layer name: {bits: Cost}}`` in graph order, and the whole-model timings it was measured with.

    model_latency_s: the whole model's median seconds, by the width its quantized model was given at
        (8: ``qmodel_8bit``; 4: ``qmodel_4bit``), when measured.
    remainder_s: ``r_8``, ``model_latency_s[8]`` minus the sum of the 8-bit layer latencies (module docstring);
        ``remainder_4_s`` and ``remainders`` derive ``r_4`` from ``model_latency_s[4]``.
    """

    costs: Mapping[str, Mapping[int, Cost]]
    target: str
    model_latency_s: Mapping[int, float] = dataclasses.field(default_factory=dict)
    remainder_s: float | None = None
    remote: str | None = None  # "key at host:port" when measured through an RPC tracker
    input_shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str) -> Mapping[int, Cost]:
        return self.costs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.costs)

    def __len__(self) -> int:
        return len(self.costs)

    @property
    def remainder_4_s(self) -> float | None:
        """``r_4`` (module docstring), or None without ``model_latency_s[4]``, ``remainder_s`` or a 4-bit layer."""
        t4 = self.model_latency_s.get(4)
        latency = self.latency()
        if t4 is None or self.remainder_s is None or any(set(per) != {4, 8} for per in latency.values()):
            return None
        at4 = [n for n, per in self.items() if not per[4].synthetic]  # a4: at 4 bits in qmodel_4bit
        share = math.fsum(latency[n][8] for n in at4) / math.fsum(per[8] for per in latency.values())
        if not share > 0:
            return None
        r_a4 = t4 - math.fsum(per[4 if n in at4 else 8] for n, per in latency.items())
        return self.remainder_s + (r_a4 - self.remainder_s) / share

    @property
    def remainders(self) -> dict[int, float] | None:
        """``{8: r_8, 4: r_4}`` (4 only when known), the ``remainder_s`` of ``ilp.table.Table``; None untimed."""
        if self.remainder_s is None:
            return None
        r4 = self.remainder_4_s
        return {8: self.remainder_s} if r4 is None else {8: self.remainder_s, 4: r4}

    def latency(self) -> dict[str, dict[int, float]]:
        """``{layer: {bits: seconds}}``, the ``latency`` argument of ``ilp.table.Table.from_sensitivity``."""
        return {n: {b: c.latency_s for b, c in per.items() if c.latency_s is not None} for n, per in self.items()}

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "remote": self.remote,
            "model_latency_s": {str(b): v for b, v in self.model_latency_s.items()},
            "remainder_s": self.remainder_s,
            "remainder_4_s": self.remainder_4_s,  # derived (from_dict recomputes it)
            "input_shapes": {n: list(s) for n, s in self.input_shapes.items()},
            "layers": {n: {str(b): dataclasses.asdict(c) for b, c in per.items()} for n, per in self.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> CostTable:
        try:
            return cls(
                costs={n: {int(b): Cost(**c) for b, c in per.items()} for n, per in d["layers"].items()},
                target=d["target"],
                model_latency_s={int(b): float(v) for b, v in d.get("model_latency_s", {}).items()},
                remainder_s=d.get("remainder_s"),
                remote=d.get("remote"),
                input_shapes={n: tuple(s) for n, s in d.get("input_shapes", {}).items()},
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"Cost table JSON is malformed ({type(exc).__name__}: {exc}).") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> CostTable:
        return cls.from_dict(json.loads(text))


def _compile(model: onnx.ModelProto, target, what: str) -> Compiled:
    try:
        return compile_onnx(model, target)
    except Exception as exc:
        exc.add_note(f"while compiling {what} for target {target!r}")
        raise


def _model_inputs(qmodel, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the example batch's shapes: standard normal floats; zeros for integer inputs (token ids)."""
    rng = np.random.default_rng(seed)
    places = [n for n in qmodel.graph_module.graph.nodes if n.op == "placeholder"]
    out = {}
    for info, node in zip(qmodel.inputs, places, strict=True):
        shape = node.meta.get("shape")
        if shape is None:
            raise ValueError(f"Input {info['name']!r} has no example shape; build the model with intq.quantize.")
        dtype = helper.tensor_dtype_to_np_dtype(info["elem_type"])
        out[info["name"]] = (
            rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating) else np.zeros(shape, dtype)
        )
    return out


def measure_model_latency(
    onnx_model: onnx.ModelProto,
    target: str | Mapping = "x86",
    *,
    inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    repeats: int = 20,
    min_repeat_ms: float = 10.0,
    remote: RemoteSpec | None = None,
) -> float:
    """Median seconds per call of the whole integer ONNX model, compiled with ``compile_onnx`` for ``target``.

    ``inputs``: by input name, or in the model's input order.
    """
    check_timing(repeats, min_repeat_ms)
    spec = resolve_target(target)
    compiled = _compile(onnx_model, target, f"model {onnx_model.graph.name!r}")
    with Runner(spec, remote) as runner:
        return runner.time(compiled, _ordered(compiled, inputs), repeats, min_repeat_ms)


def _ordered(compiled: Compiled, inputs) -> list[np.ndarray]:
    if isinstance(inputs, Mapping):
        missing = [n for n in compiled.input_names if n not in inputs]
        unknown = sorted(set(inputs) - set(compiled.input_names))
        if missing or unknown:
            raise ValueError(f"Inputs must be exactly {compiled.input_names}; missing {missing}, unexpected {unknown}.")
        return [np.asarray(inputs[n]) for n in compiled.input_names]
    return [np.asarray(a) for a in inputs]


def layer_costs(
    qmodel_8bit,
    qmodel_4bit=None,
    target: str | Mapping = "x86",
    *,
    repeats: int = 20,
    min_repeat_ms: float = 10.0,
    remote: RemoteSpec | None = None,
    measure_model: bool = True,
    progress: bool = True,
) -> CostTable:
    """Size, BOPs and measured latency of every weighted layer at 8 and 4 bits (see the module docstring).

    qmodel_8bit: the model quantized with every layer at 8 bits (``QuantConfig()``).
    qmodel_4bit: optional, the same model at 4 bits (``QuantConfig(bits=4, first_last_bits=4)``),
        quantized on a first calibration batch of the same shapes.
    target: a target name (``x86``, ``arm``, ``cuda``) or TVM target JSON dict, as ``compile_onnx`` takes.
    repeats, min_repeat_ms: the timing (``ilp.timing``): the median of ``repeats`` measurements of at
        least ``min_repeat_ms`` each.
    remote: time on a device behind an RPC tracker instead of in this process (required for a target
        that does not run here, such as ``arm``).
    measure_model: also time the whole model(s), which gives ``remainder_s`` for ``predict_latency``.
    """
    check_timing(repeats, min_repeat_ms)
    spec = resolve_target(target)
    onnx8 = qmodel_8bit.to_onnx()
    layers8 = weighted_layers(qmodel_8bit, onnx8)
    not8 = {layer.name: layer.bits for layer in layers8 if layer.bits != 8}
    if not8:
        raise ValueError(
            f"qmodel_8bit has layers at other widths {not8}; quantize it with every layer at 8 bits (QuantConfig())."
        )
    if not layers8:
        raise ValueError("The model has no weighted (conv/linear) layers to cost.")
    real4: dict[str, WeightedLayer] = {}
    onnx4 = None
    if qmodel_4bit is not None:
        onnx4 = qmodel_4bit.to_onnx()
        layers4 = weighted_layers(qmodel_4bit, onnx4)
        if [x.name for x in layers4] != [x.name for x in layers8]:
            raise ValueError(
                f"qmodel_4bit's weighted layers {[x.name for x in layers4]} are not qmodel_8bit's "
                f"{[x.name for x in layers8]}; quantize the same model twice."
            )
        for l8, l4 in zip(layers8, layers4, strict=True):
            if l4.input_shape != l8.input_shape:
                raise ValueError(
                    f"Layer {l8.name!r}: input shape {l4.input_shape} in qmodel_4bit but {l8.input_shape} in "
                    "qmodel_8bit; quantize both with first calibration batches of the same shape."
                )
        real4 = {x.name: x for x in layers4 if x.bits == 4}

    total = 2 * len(layers8) + (1 + (qmodel_4bit is not None) if measure_model else 0)
    bar = tqdm(total=total, desc="latency table", unit="kernel", disable=not progress, leave=False)
    costs: dict[str, dict[int, Cost]] = {}
    model_latency: dict[int, float] = {}
    try:
        with Runner(spec, remote) as runner:
            for k, l8 in enumerate(layers8):
                per = {}
                for bits in (8, 4):
                    layer = l8 if bits == 8 else real4.get(l8.name)
                    synthetic = bits == 4 and layer is None
                    op = as_4bit(l8.op) if synthetic else layer.op
                    bar.set_postfix(layer=f"{l8.name} @{bits}")
                    model = layer_model(op, l8.input_shape, l8.input_dims, len(l8.output_shape))
                    compiled = _compile(model, target, f"layer {l8.name!r} ({op.op_type}) at {bits} bits")
                    x = _layer_input(l8.input_shape, bits, seed=k)
                    latency = runner.time(compiled, [x], repeats, min_repeat_ms)
                    per[bits] = Cost(l8.size_bytes(bits), l8.bops(bits), latency, synthetic)
                    bar.update(1)
                costs[l8.name] = per
            if measure_model:
                for bits, qm, proto in ((8, qmodel_8bit, onnx8), (4, qmodel_4bit, onnx4)):
                    if qm is None:
                        continue
                    bar.set_postfix(layer=f"whole model @{bits}")
                    compiled = _compile(proto, target, f"the whole {bits}-bit model")
                    model_latency[bits] = runner.time(
                        compiled, _ordered(compiled, _model_inputs(qm)), repeats, min_repeat_ms
                    )
                    bar.update(1)
    finally:
        bar.close()
    remainder = None
    if 8 in model_latency:
        remainder = model_latency[8] - math.fsum(per[8].latency_s for per in costs.values())
    return CostTable(
        costs=costs,
        target=spec.name,
        model_latency_s=model_latency,
        remainder_s=remainder,
        remote=None if remote is None else f"{remote.key} at {remote.address}",
        input_shapes={x.name: x.input_shape for x in layers8},
    )


def predict_latency(
    costs: Mapping[str, Mapping[int, Cost]], layer_bits: Mapping[str, int], remainder_s: float | None = None
) -> float:
    """``r_8 + (r_4 - r_8) * w(a) + sum_i latency_i[layer_bits[i]]`` in seconds (see the module docstring).

    ``remainder_s``: ``r_8``, by default ``costs.remainder_s`` (a ``CostTable`` measured with ``measure_model``);
    the slope ``r_4 - r_8`` is the table's (0 for a plain mapping or without ``model_latency_s[4]``).
    """
    if remainder_s is None:
        remainder_s = getattr(costs, "remainder_s", None)
    if remainder_s is None:
        raise ValueError(
            "predict_latency needs the time outside the weighted layers: measure the table with "
            "layer_costs(..., measure_model=True) or pass remainder_s."
        )
    missing = [n for n in costs if n not in layer_bits]
    unknown = sorted(set(layer_bits) - set(costs))
    if missing or unknown:
        raise ValueError(
            f"layer_bits must give a width for exactly the table's layers; missing {missing}, unknown {unknown}."
        )
    total = [float(remainder_s)]
    for name, per in costs.items():
        b = int(layer_bits[name])
        if b not in per or per[b].latency_s is None:
            raise ValueError(f"Layer {name!r} has no measured latency at {b} bits (it has {sorted(per)}).")
        total.append(per[b].latency_s)
    latency = {n: {b: c.latency_s for b, c in per.items()} for n, per in costs.items()}
    shifts = remainder_shifts(latency, getattr(costs, "remainders", None), 8)
    total += [shifts[name].get(int(layer_bits[name]), 0.0) for name in costs]
    return math.fsum(total)
