"""intq.IntLookup through TVM equals onnxruntime and the torch emulation bit for bit: one table (with and
without the AVX-512 VBMI gather), one table per channel, symbolic dims; the lowering's refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from intq.passes.build import build, run
from intq.passes.compat import make_target
from intq.passes.onnx_import import import_onnx
from intq.passes.ops import IntqLoweringError
from intq.passes.schedules import ScheduleKernels
from intq.quantizer.ops.lookup import IntLookup
from intq.quantizer.ops.onnx_fn import single_op_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def ort_run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def with_dims(model: onnx.ModelProto, dims: dict[int, str]) -> onnx.ModelProto:
    for axis, name in dims.items():
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = name
    return model


def silu_table() -> IntLookup:
    return IntLookup.from_function(lambda v: v * torch.sigmoid(v), 0.06, 0.04, -128, 127)


def prelu_tables(channels: int) -> IntLookup:
    slope = torch.linspace(-1, 1, channels).reshape(channels, 1, 1)
    return IntLookup.from_function(lambda v: torch.where(v >= 0, v, v * slope), 0.05, 0.05, -128, 127, channels, -3, 4)


@pytest.mark.parametrize("shape", [(2, 3, 128), (1, 197, 64), (3, 7), (5,)])
def test_one_table_exact(shape):
    op = silu_table()
    x0 = np.zeros(shape, np.int8)
    model = single_op_model(op, [x0])
    runnable = build(import_onnx(model))
    x = np.random.default_rng(2).integers(-128, 128, shape).astype(np.int8)
    (got,) = run(runnable, {"x": x})
    np.testing.assert_array_equal(got, ort_run(model, {"x": x}))
    np.testing.assert_array_equal(got, op(torch.from_numpy(x)).numpy())


def test_one_table_symbolic_rows_and_every_int8_value():
    op = silu_table()
    model = with_dims(single_op_model(op, [np.zeros((2, 4, 256), np.int8)]), {0: "b", 1: "n"})
    runnable = build(import_onnx(model))
    for b, n in ((1, 1), (3, 5)):
        x = np.broadcast_to(np.arange(-128, 128, dtype=np.int8), (b, n, 256)).copy()
        (got,) = run(runnable, {"x": x})
        np.testing.assert_array_equal(got, ort_run(model, {"x": x}))


def test_vbmi_gather_where_the_host_has_it():
    """A last axis of 128 on this AVX-512 VBMI host takes the vpermi2b kernel; its result is the same."""
    op = silu_table()
    model = single_op_model(op, [np.zeros((4, 128), np.int8)])
    mod = import_onnx(model)
    sched = ScheduleKernels(make_target("llvm"))
    sched(mod)
    assert any(v == "rows" for v in sched.scheduled.values())
    x = np.random.default_rng(3).integers(-128, 128, (4, 128)).astype(np.int8)
    (got,) = run(build(mod), {"x": x})
    np.testing.assert_array_equal(got, ort_run(model, {"x": x}))


@pytest.mark.parametrize("channels", [1 + 2, 16])
def test_one_table_per_channel_symbolic_batch_exact(channels):
    op = prelu_tables(channels)
    model = with_dims(single_op_model(op, [np.zeros((1, channels, 5, 6), np.int8)]), {0: "b"})
    runnable = build(import_onnx(model))
    for b in (1, 4):
        x = np.random.default_rng(b).integers(-128, 128, (b, channels, 5, 6)).astype(np.int8)
        (got,) = run(runnable, {"x": x})
        np.testing.assert_array_equal(got, ort_run(model, {"x": x}))
        np.testing.assert_array_equal(got, op(torch.from_numpy(x)).numpy())


def test_refuses_a_wider_input():
    model = single_op_model(silu_table(), [np.zeros((2, 3), np.int8)])
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT16
    with pytest.raises(IntqLoweringError, match="x must be int8"):
        import_onnx(model)


def test_refuses_offsets_that_leave_the_table():
    model = single_op_model(silu_table(), [np.zeros((2, 3), np.int8)])
    offset = next(t for t in model.graph.initializer if t.name == "offset")
    offset.CopyFrom(onnx.numpy_helper.from_array(np.array(300, np.int32), "offset"))
    with pytest.raises(IntqLoweringError, match="would leave the table"):
        import_onnx(model)
