"""intq.IntMul through TVM equals onnxruntime and the torch emulation bit for bit: a squeeze-and-excitation
gate broadcast over symbolic dims, int16 operands, a clamp range; the lowering's refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from intq.passes.build import build, run
from intq.passes.onnx_import import import_onnx
from intq.passes.ops import IntqLoweringError
from intq.quantizer.ops.mul import IntMul
from intq.quantizer.ops.onnx_fn import single_op_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def ort_run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def named_dims(model: onnx.ModelProto, dims: dict[str, dict[int, str]]) -> onnx.ModelProto:
    for vi in model.graph.input:
        for axis, name in dims.get(vi.name, {}).items():
            vi.type.tensor_type.shape.dim[axis].dim_param = name
    return model


@pytest.mark.parametrize("op", [IntMul(0.011), IntMul(0.3, 0, 127), IntMul(123.0, -8, 7)], ids=lambda o: o.op_type)
def test_gate_over_symbolic_batch_exact(op):
    a0, b0 = np.zeros((1, 8, 4, 4), np.int8), np.zeros((1, 8, 1, 1), np.int8)
    model = named_dims(single_op_model(op, [a0, b0]), {"a": {0: "n"}, "b": {0: "n"}})
    runnable = build(import_onnx(model))
    rng = np.random.default_rng(5)
    for n in (1, 3):
        feeds = {
            "a": rng.integers(-128, 128, (n, 8, 4, 4)).astype(np.int8),
            "b": rng.integers(-128, 128, (n, 8, 1, 1)).astype(np.int8),
        }
        (got,) = run(runnable, feeds)
        want = ort_run(model, feeds)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(op(*(torch.from_numpy(v) for v in feeds.values())).numpy(), want)


def test_int16_times_int8_exact():
    a = np.array([[-32768, 32767, -5, 0, 7]], np.int16)
    b = np.array([[-128, 127, 127, 1, -1]], np.int8)
    model = single_op_model(IntMul(2**-14), [a, b])
    (got,) = run(build(import_onnx(model)), {"a": a, "b": b})
    np.testing.assert_array_equal(got, ort_run(model, {"a": a, "b": b}))


def test_refuses_static_dims_that_do_not_broadcast():
    model = single_op_model(IntMul(0.5), [np.zeros((2, 3), np.int8), np.zeros((2, 4), np.int8)])
    with pytest.raises(IntqLoweringError, match="do not broadcast"):
        import_onnx(model)
