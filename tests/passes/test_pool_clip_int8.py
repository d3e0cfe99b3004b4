"""Standard ``MaxPool`` and ``Clip`` on int8 tensors through TVM's own ONNX frontend equal onnxruntime and torch.

The CNN contract carries max pooling and a standalone clamp as standard ONNX
ops on the int8 activation.  TVM's frontend converts both (``max_pool2d``
pads with the dtype's minimum, ``Clip`` with int8 bounds is a max / min),
so no converter of ours is needed; these tests are what says so.  Padding
must act as ``-inf`` (ignored), as in onnxruntime: the inputs are all
negative where a window overlaps the padding, so a zero pad would show.
torch runs ``max_pool2d`` on the integers as float64 (exact), padded with
``-inf`` by ``F.pad`` for the asymmetric cases.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from intq.passes import compat
from intq.passes.pipeline import compile_onnx

TARGET = {"kind": "llvm", "mcpu": "znver3"}

pytestmark = pytest.mark.filterwarnings(
    "ignore:Renaming name:UserWarning", "ignore:Field 'shape' of 'type' is required:UserWarning"
)


def model_of(node: onnx.NodeProto, x_shape, inits=(), symbolic_batch: bool = False) -> onnx.ModelProto:
    dims = ["batch", *x_shape[1:]] if symbolic_batch else list(x_shape)
    graph = helper.make_graph(
        [node],
        node.op_type,
        [helper.make_tensor_value_info("x", TensorProto.INT8, dims)],
        [helper.make_tensor_value_info("y", TensorProto.INT8, None)],
        initializer=list(inits),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def tvm_and_ort(model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    compiled = compile_onnx(model, TARGET)
    got = compat.VirtualMachine(compiled.executable, compat.tvm.cpu(0))["main"](compat.tvm.runtime.tensor(x)).numpy()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, {"x": x})[0]
    assert got.dtype == want.dtype == np.int8 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    np.testing.assert_array_equal(got, want)
    return got, want


def negative_int8(rng, shape) -> np.ndarray:
    """int8 in [-128, -1], with -128 at the corners: any window that counts a zero pad differs."""
    x = rng.integers(-128, -1, size=shape, endpoint=True)
    x[..., 0, 0] = x[..., -1, -1] = -128
    return x.astype(np.int8)


POOLS = {
    "3x3_s2_pad1": ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, (2, 3, 9, 9)),
    "3x3_s2_tf_pads": ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 0, 1, 1]}, (1, 4, 8, 8)),
    "2x2_s2": ({"kernel_shape": [2, 2], "strides": [2, 2]}, (1, 4, 7, 7)),
    "3x3_s2_ceil": ({"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, (1, 2, 8, 8)),
    "3x3_dilated_pad2": ({"kernel_shape": [3, 3], "dilations": [2, 2], "pads": [2, 2, 2, 2]}, (1, 2, 8, 8)),
}


def torch_max_pool(x: np.ndarray, attrs: dict) -> np.ndarray:
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    padded = F.pad(torch.from_numpy(x).double(), (left, right, top, bottom), value=-float("inf"))
    y = F.max_pool2d(
        padded,
        attrs["kernel_shape"],
        attrs.get("strides", 1),
        dilation=attrs.get("dilations", 1),
        ceil_mode=bool(attrs.get("ceil_mode", 0)),
    )
    return y.numpy().astype(np.int8)


@pytest.mark.parametrize("case", list(POOLS))
def test_maxpool_int8(case):
    attrs, shape = POOLS[case]
    rng = np.random.default_rng(len(case))
    model = model_of(helper.make_node("MaxPool", ["x"], ["y"], **attrs), shape, symbolic_batch=True)
    for x in (negative_int8(rng, shape), rng.integers(-128, 127, size=shape, endpoint=True).astype(np.int8)):
        got, _ = tvm_and_ort(model, x)
        np.testing.assert_array_equal(got, torch_max_pool(x, attrs))


@pytest.mark.parametrize(("lo", "hi"), [(0, 15), (-8, 7), (0, 127), (-128, 127)])
def test_clip_int8(lo, hi):
    rng = np.random.default_rng(hi)
    inits = [numpy_helper.from_array(np.array(v, np.int8), n) for n, v in (("lo", lo), ("hi", hi))]
    model = model_of(helper.make_node("Clip", ["x", "lo", "hi"], ["y"]), (2, 3, 5, 5), inits, symbolic_batch=True)
    x = rng.integers(-128, 127, size=(2, 3, 5, 5), endpoint=True).astype(np.int8)
    x[0, 0, 0, :2] = -128, 127
    got, _ = tvm_and_ort(model, x)
    np.testing.assert_array_equal(got, torch.clamp(torch.from_numpy(x), lo, hi).numpy())
    assert got.min() == lo and got.max() == hi


def test_clip_int8_lower_bound_only():
    model = model_of(
        helper.make_node("Clip", ["x", "lo"], ["y"]), (1, 4, 3, 3), [numpy_helper.from_array(np.int8(0), "lo")]
    )
    x = np.arange(-18, 18, dtype=np.int8).reshape(1, 4, 3, 3)
    got, _ = tvm_and_ort(model, x)
    np.testing.assert_array_equal(got, np.maximum(x, 0))
