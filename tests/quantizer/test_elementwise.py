"""The elementwise and product rules on legacy and dynamo exports: each non-linear function of one activation
becomes one FTable, LayerScale folds into its linear, a gate becomes FMul; the float function is unchanged,
and the integer model (IntLookup, IntMul) equals onnxruntime."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import intq
from intq.quantizer.canonical import FLinear, FMul, FTable
from intq.quantizer.canonicalize import canonicalize
from intq.quantizer.capture import capture


def export(module: nn.Module, example: torch.Tensor, exporter: str) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(
                module.eval(), (example,), dynamo=True, input_names=["x"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )  # fmt: skip
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(
            module.eval(), (example,), buffer, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}},
            opset_version=17,
        )  # fmt: skip
        return onnx.load_from_string(buffer.getvalue())


class Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.conv(x))


ACTIVATIONS = {
    "silu": (F.silu, ["Sigmoid", "Mul"]),
    "hardswish": (F.hardswish, ["HardSwish"]),
    "hardswish-written-out": (lambda v: v * F.relu6(v + 3) / 6, None),
    "hardsigmoid": (F.hardsigmoid, ["HardSigmoid"]),
    "tanh": (torch.tanh, ["Tanh"]),
    "exp": (torch.exp, ["Exp"]),
    "erf": (torch.erf, ["Erf"]),
    "leaky-relu": (lambda v: F.leaky_relu(v, 0.1), ["LeakyRelu"]),
    "gelu-tanh": (lambda v: F.gelu(v, approximate="tanh"), None),
    "mish": (F.mish, None),
}


def kinds(gm) -> list[type]:
    return [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]


def check_float_unchanged(model: onnx.ModelProto, gm, x: torch.Tensor) -> None:
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )[0]
    with torch.no_grad():
        np.testing.assert_allclose(gm(x)[0].numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_each_activation_becomes_one_table(name, exporter):
    torch.manual_seed(0)
    fn, ops = ACTIVATIONS[name]
    x = torch.randn(2, 3, 5, 5)
    model = export(Act(fn), x, exporter)
    gm = capture(model)
    counts = canonicalize(gm, (x,))
    tables = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module" and kinds_of(gm, n, FTable)]
    assert counts["elementwise"] == 1 and len(tables) == 1, (counts, kinds(gm))
    if ops is not None and exporter == "legacy":
        assert list(tables[0].ops) == ops
    check_float_unchanged(model, gm, torch.randn(3, 3, 5, 5))


def kinds_of(gm, node, cls) -> bool:
    return isinstance(gm.get_submodule(node.target), cls)


def test_a_relu_alone_is_left_to_the_clamp_rule():
    x = torch.randn(2, 3, 5, 5)
    gm = capture(export(Act(torch.relu), x, "legacy"))
    counts = canonicalize(gm, (x,))
    assert counts["elementwise"] == 0 and counts["clamp"] == 1


class PerChannel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.act = nn.PReLU(5)
        with torch.no_grad():
            self.act.weight.copy_(torch.linspace(-0.5, 0.8, 5))

    def forward(self, x):
        return self.act(self.conv(x))


def test_prelu_with_one_slope_per_channel_is_one_table_per_channel():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 6)
    model = export(PerChannel(), x, "legacy")
    gm = capture(model)
    canonicalize(gm, (x,))
    (table,) = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module" and kinds_of(gm, n, FTable)]
    assert (table.channels, table.axis) == (5, -3)
    check_float_unchanged(model, gm, torch.randn(1, 3, 6, 6))


class Gated(nn.Module):
    """LayerScale after a linear (folded) and a squeeze-and-excitation gate (a product of two activations)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.gamma = nn.Parameter(torch.linspace(-1, 1, 6))
        self.conv = nn.Conv2d(6, 6, 1)
        self.se = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        h = self.fc(x.permute(0, 2, 3, 1)) * self.gamma  # LayerScale
        h = self.conv(h.permute(0, 3, 1, 2))
        gate = torch.sigmoid(self.se(F.adaptive_avg_pool2d(h, 1)))
        return h * gate


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_layerscale_folds_and_a_gate_is_a_product(exporter):
    torch.manual_seed(2)
    x = torch.randn(2, 6, 4, 4)
    model = export(Gated(), x, exporter)
    gm = capture(model)
    counts = canonicalize(gm, (x,))
    assert counts["fold_channel_scale"] == 1 and counts["mul"] == 1 and counts["elementwise"] == 1
    assert kinds(gm).count(FMul) == 1 and kinds(gm).count(FLinear) == 1
    check_float_unchanged(model, gm, torch.randn(3, 6, 4, 4))


@pytest.mark.parametrize("module", [Gated, PerChannel, lambda: Act(F.silu)], ids=["gated", "prelu", "silu"])
def test_the_integer_model_equals_onnxruntime_and_follows_the_float_one(module):
    torch.manual_seed(3)
    float_model = module().eval()
    channels = 6 if isinstance(float_model, Gated) else 3
    gen = torch.Generator().manual_seed(4)
    calib = [torch.randn(4, channels, 6, 6, generator=gen) for _ in range(4)]
    qmodel = intq.quantize(float_model, calib, progress=False)
    ops = {r.op for r in qmodel.layers}
    assert "IntLookup" in ops
    x = torch.randn(3, channels, 6, 6, generator=gen)
    int_onnx = qmodel.to_onnx()
    session = ort.InferenceSession(int_onnx.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {qmodel.input_names[0]: x.numpy()})[0]
    np.testing.assert_array_equal(qmodel(x).numpy(), got)
    with torch.no_grad():
        want = float_model(x).numpy()
    cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cos > 0.99, cos


class Refused(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.a, self.b, self.kind = nn.Linear(8, 8), nn.Linear(8, 8), kind

    def forward(self, x):
        if self.kind == "div":
            return self.a(x) / (self.b(x).abs() + 1)
        return torch.softmax(self.a(x), dim=0)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("div", r"node '/Div': op Div \(.*a quotient of two activations has no integer form"),
        ("softmax", r"node '/Softmax': op Softmax \(a softmax over axis 0 of a rank-2 tensor; .*transpose"),
    ],
)
def test_what_stays_unsupported_is_refused_with_the_node_and_what_to_do(kind, message):
    from intq.quantizer.convert import UnsupportedModelError

    x = torch.randn(4, 8)
    model = export(Refused(kind), x, "legacy")
    with pytest.raises(UnsupportedModelError, match=message):
        intq.quantize(model, [x], progress=False)
