"""quantizer.simplify: shape arithmetic and constant subgraphs of legacy torch exports fold; the function,
the input/output names and the symbolic dims stay."""

from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from intq.export.onnx_reader import read_onnx
from intq.quantizer import simplify as simplify_module
from intq.quantizer.simplify import simplify


class ShapeScaled(torch.nn.Module):
    """Scores scaled by ``C ** -0.5`` with ``C`` read from the input's shape (the legacy exporter's Shape chain)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        b, n, c = x.shape
        q = self.proj(x).reshape(b, n, 2, c // 2).transpose(1, 2)
        scores = q @ q.transpose(-1, -2) * (c // 2) ** -0.5
        return torch.softmax(scores, -1).transpose(1, 2).reshape(b, n, -1)


class InterpolatedTable(torch.nn.Module):
    """A constant [1, 4, 3, 3] table resized to 5 x 5 at run time and added (DINOv2-style position embeddings)."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return x + F.interpolate(self.table, size=(5, 5), mode="bicubic", align_corners=False)


def legacy_export(module, example, dynamic_axes) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), (example,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
            dynamic_axes=dynamic_axes, opset_version=17,
        )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def test_shape_arithmetic_folds_and_batch_stays_symbolic():
    torch.manual_seed(0)
    model = legacy_export(ShapeScaled(), torch.randn(2, 5, 8), {"x": {0: "batch", 1: "tokens"}, "y": {0: "batch"}})
    assert op_counts(model)["Shape"] > 0 and op_counts(model)["Cast"] > 0  # what the exporter made
    out = simplify(model)
    counts = op_counts(out)
    assert counts["Cast"] == 0 and counts["Pow"] == 0 and counts["Sqrt"] == 0, counts  # the scale is a constant
    dims = [d.dim_param or d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "tokens", 8]
    assert [o.name for o in out.graph.output] == ["y"]
    for shape in ((1, 5, 8), (3, 7, 8)):
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(ort_run(out, x), ort_run(model, x), rtol=0, atol=1e-6)


def test_resize_of_a_constant_folds_whatever_its_size():
    model = legacy_export(InterpolatedTable(), torch.randn(1, 4, 5, 5), {"x": {0: "batch"}})
    assert op_counts(model)["Resize"] == 1
    out = simplify(model)
    assert op_counts(out)["Resize"] == 0
    x = np.random.default_rng(2).standard_normal((2, 4, 5, 5)).astype(np.float32)
    # folded by onnx's reference Resize, which rounds the bicubic sums differently from onnxruntime's kernel
    np.testing.assert_allclose(ort_run(out, x), ort_run(model, x), rtol=0, atol=1e-5)


def test_the_callers_model_is_not_changed():
    model = legacy_export(ShapeScaled(), torch.randn(2, 5, 8), {"x": {0: "batch"}})
    before = model.SerializeToString()
    simplify(model)
    assert model.SerializeToString() == before


def test_read_onnx_simplifies_only_when_asked():
    model = legacy_export(ShapeScaled(), torch.randn(2, 5, 8), {"x": {0: "batch"}})
    plain = read_onnx(model)
    simplified = read_onnx(model, simplify=True)
    count = lambda gm: sum(1 for n in gm.graph.nodes if n.op == "call_module")  # noqa: E731
    assert count(simplified) < count(plain)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(simplified(x)[0], plain(x)[0], rtol=0, atol=1e-6)


def test_an_optimizer_failure_reads_the_model_unsimplified(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Error during constant folding for node 'n7' (::Resize)")

    monkeypatch.setattr(simplify_module, "optimize_ir", broken)
    model = legacy_export(ShapeScaled(), torch.randn(2, 5, 8), {"x": {0: "batch"}})
    with pytest.warns(UserWarning, match=r"reading the model unsimplified: onnxscript's optimizer stopped .*'n7'"):
        gm = read_onnx(model, simplify=True)
    assert sum(1 for n in gm.graph.nodes if n.op == "call_module") == len(model.graph.node) - sum(
        1 for n in model.graph.node if n.op_type == "Constant"
    )
