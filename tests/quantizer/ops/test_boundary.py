"""The input quantizer's rule for non-finite inputs, the same in all three executors.

NaN -> 0, +Inf -> 127, -Inf -> -128, every finite value rounded half to even
and saturated, in the torch emulation (``Quantize``), onnxruntime on the
exported ONNX (``IsNaN -> Where -> QuantizeLinear``) and the TVM artifact
(``compile_onnx``); end to end on a tiny quantized CNN whose input holds
NaN and infinite pixels, the three give the same integers.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
from onnx import TensorProto

import intq
from intq.export.onnx_writer import write_onnx
from intq.export.verify import verify_integer_only
from intq.passes import compat
from intq.passes.onnx_import import import_onnx
from intq.passes.pipeline import compile_onnx
from intq.passes.verify import verify_integer_only as verify_relax_integer_only
from intq.quantizer.ops.boundary import Quantize

SCALE = 0.0625  # a power of two: x / SCALE is exact, so the halves below are exact ties
_S = np.float32(SCALE)
_NEG_NAN = np.frombuffer(np.uint32(0xFFC00000).tobytes(), np.float32)[0]  # NaN with the sign bit set
_SNAN = np.frombuffer(np.uint32(0x7F800001).tobytes(), np.float32)[0]  # a signalling NaN payload
CASES = [  # (x, q)
    (np.nan, 0),
    (_NEG_NAN, 0),
    (_SNAN, 0),
    (np.inf, 127),
    (-np.inf, -128),
    (127.5 * _S, 127),  # ties to 128, saturates
    (-127.5 * _S, -128),  # ties to -128
    (128.5 * _S, 127),
    (-128.5 * _S, -128),
    (126.5 * _S, 126),  # half to even
    (-126.5 * _S, -126),
    (2.5 * _S, 2),
    (-2.5 * _S, -2),
    (1.5 * _S, 2),
    (0.5 * _S, 0),
    (-0.5 * _S, 0),
    (0.3, 5),  # 4.8
    (-2.0, -32),
    (7.9375, 127),  # exactly 127
    (-8.0, -128),  # exactly -128
    (1e30, 127),
    (-1e30, -128),
    (np.finfo(np.float32).max, 127),
    (0.0, 0),
    (-0.0, 0),
]
X = np.array([x for x, _ in CASES], dtype=np.float32)
EXPECTED = np.array([q for _, q in CASES], dtype=np.int8)


def _batch() -> np.ndarray:
    """The cases, as 3 rows of 7 copies each: long enough for the vectorized loops of the TVM kernels."""
    return np.ascontiguousarray(np.tile(X, (3, 7)))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _tvm_run(model: onnx.ModelProto, *xs: np.ndarray) -> list[np.ndarray]:
    compiled = compile_onnx(model, "x86")  # runs the Relax integer-only verifier too
    vm = compat.VirtualMachine(compiled.executable, compat.tvm.cpu(0))
    outs = []
    for x in xs:
        out = vm["main"](compat.tvm.runtime.tensor(x))
        outs.append([out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out])
    return outs


def quantizer_model() -> onnx.ModelProto:
    """The input quantizer alone, written by the ONNX writer: ``x (float32 [n, m]) -> q (int8)``."""
    root = torch.nn.Module()
    root.add_module("x_quant", Quantize(SCALE))
    g = fx.Graph()
    q = g.call_module("x_quant", (g.placeholder("x"),))
    q.meta["dtype"] = torch.int8
    g.output((q,))
    return write_onnx(
        fx.GraphModule(root, g),
        [{"name": "x", "elem_type": TensorProto.FLOAT, "shape": ["n", "m"]}],
        [{"name": "q", "shape": ["n", "m"]}],
        integer_outputs=True,
    )


def test_torch_quantize_maps_nan_to_zero_and_saturates_infinities():
    got = Quantize(SCALE)(torch.from_numpy(X))
    assert got.dtype == torch.int8
    np.testing.assert_array_equal(got.numpy(), EXPECTED)


def test_exported_quantizer_replaces_nan_before_quantize_linear():
    model = quantizer_model()
    assert [n.op_type for n in model.graph.node] == ["IsNaN", "Where", "QuantizeLinear", "Identity"]
    onnx.checker.check_model(model, full_check=True)
    verify_integer_only(model)  # IsNaN / Where act on the float input, outside the integer region
    verify_relax_integer_only(import_onnx(model))


def test_onnxruntime_follows_the_rule():
    got = _session(quantizer_model()).run(None, {"x": X[None]})[0]
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got[0], EXPECTED)
    np.testing.assert_array_equal(_session(quantizer_model()).run(None, {"x": _batch()})[0], np.tile(EXPECTED, (3, 7)))


def test_tvm_follows_the_rule():
    small, batch = _tvm_run(quantizer_model(), X[None], _batch())
    np.testing.assert_array_equal(small[0][0], EXPECTED)
    assert batch[0].dtype == np.int8
    np.testing.assert_array_equal(batch[0], np.tile(EXPECTED, (3, 7)))


@pytest.fixture(scope="module")
def tiny_cnn_int8():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    ).eval()
    gen = torch.Generator().manual_seed(1)
    return intq.quantize(net, [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(2)], progress=False)


def _non_finite_images() -> tuple[np.ndarray, np.ndarray]:
    """Images with NaN / +-Inf pixels (one image all NaN), and the same with each NaN replaced by 0."""
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)).numpy()
    x[0, 0, 1, 1] = x[0, 2, 7, 0] = x[1, 1, 4, 4] = np.nan
    x[0, 1, 2, 3] = x[1, 0, 0, 0] = np.inf
    x[0, 2, 5, 6] = x[1, 2, 7, 7] = -np.inf
    x[2] = np.nan
    return x, np.where(np.isnan(x), np.float32(0), x)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiny_cnn_with_non_finite_pixels_is_bit_exact_in_all_three(tiny_cnn_int8):
    qmodel = tiny_cnn_int8
    x, x_zeroed = _non_finite_images()
    int_model = qmodel.to_onnx(integer_outputs=True)
    float_model = qmodel.to_onnx()
    verify_integer_only(int_model)
    verify_integer_only(float_model)
    name = qmodel.input_names[0]

    ints_torch = [t.numpy() for t in qmodel.integer_forward(torch.from_numpy(x))]
    ints_ort = _session(int_model).run(None, {name: x})
    (ints_tvm,) = _tvm_run(int_model, x)
    assert len(ints_torch) == len(ints_ort) == len(ints_tvm)
    for t, o, v in zip(ints_torch, ints_ort, ints_tvm, strict=True):
        assert t.dtype == o.dtype == v.dtype
        np.testing.assert_array_equal(o, t)
        np.testing.assert_array_equal(v, t)
    # the rule itself, end to end: a NaN pixel counts as a 0 pixel
    zeroed = [t.numpy() for t in qmodel.integer_forward(torch.from_numpy(x_zeroed))]
    for t, z in zip(ints_torch, zeroed, strict=True):
        np.testing.assert_array_equal(t, z)

    floats_torch = qmodel(torch.from_numpy(x))
    floats_torch = floats_torch if isinstance(floats_torch, tuple) else (floats_torch,)
    floats_ort = _session(float_model).run(None, {name: x})
    (floats_tvm,) = _tvm_run(float_model, x)
    for t, o, v in zip(floats_torch, floats_ort, floats_tvm, strict=True):
        assert np.isfinite(o).all()
        np.testing.assert_array_equal(o, t.numpy())
        np.testing.assert_array_equal(v, t.numpy())
