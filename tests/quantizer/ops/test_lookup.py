"""IntLookup: torch == onnxruntime for every int8 input; the tables are exact to the output rounding."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from intq.quantizer.ops.lookup import ENTRIES, OFFSET, IntLookup, table_values
from intq.quantizer.ops.onnx_fn import single_op_model

ALL_INT8 = np.arange(-128, 128, dtype=np.int8)


def run_both(op: IntLookup, x: np.ndarray) -> np.ndarray:
    model = single_op_model(op, [x])
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = op(torch.from_numpy(x)).numpy()
    assert got.dtype == want.dtype == np.int8
    np.testing.assert_array_equal(got, want)
    return got


FUNCTIONS = {
    "sigmoid": (torch.sigmoid, 0, 127, 1 / 127),
    "silu": (lambda v: v * torch.sigmoid(v), -128, 127, 0.05),
    "hardswish": (lambda v: v * torch.clamp(v / 6 + 0.5, 0, 1), -128, 127, 0.04),
    "tanh": (torch.tanh, -128, 127, 1 / 127),
    "exp": (torch.exp, 0, 127, 0.5),
    "erf": (torch.erf, -128, 127, 1 / 127),
}


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("scale_in", [0.01, 0.05, 0.2])
def test_table_is_the_function_rounded_once(name, scale_in):
    f, qmin, qmax, scale_out = FUNCTIONS[name]
    op = IntLookup.from_function(f, scale_in, scale_out, qmin, qmax)
    y = run_both(op, ALL_INT8.reshape(2, 128)).reshape(-1).astype(np.float64)
    real = f(torch.from_numpy(ALL_INT8.astype(np.float64)) * scale_in).numpy()
    clipped = np.clip(real, qmin * scale_out, qmax * scale_out)
    assert np.abs(y * scale_out - clipped).max() <= scale_out / 2 * (1 + 1e-12)


def test_rounds_half_up_and_saturates_infinities_and_nan_to_zero():
    values = torch.tensor([[0.5, 1.5, -0.5, -1.5, math.inf, -math.inf, math.nan] + [0.0] * (ENTRIES - 7)])
    op = IntLookup.from_values(values.double(), 1.0, -10, 10)
    assert op.table[:7].tolist() == [1, 2, 0, -1, 10, -10, 0]


def test_one_table_per_channel_along_the_channel_axis():
    slope = torch.tensor([0.1, -0.5, 2.0]).reshape(3, 1, 1)

    def prelu(v):
        return torch.where(v >= 0, v, v * slope)

    op = IntLookup.from_function(prelu, 0.05, 0.05, -128, 127, channels=3, axis=-3, rank=4)
    assert tuple(op.table.shape) == (3 * ENTRIES,) and tuple(op.offset.shape) == (1, 3, 1, 1)
    x = np.random.default_rng(0).integers(-128, 128, (2, 3, 4, 5)).astype(np.int8)
    y = run_both(op, x)
    want = np.clip(np.floor(np.where(x >= 0, x, x * slope.numpy()) + 0.5), -128, 127)
    np.testing.assert_array_equal(y, want)


def test_table_values_lay_the_grid_against_the_channels():
    gain = torch.tensor([1.0, 2.0]).reshape(2)  # along the last axis
    values = table_values(lambda v: v * gain, 1.0, 2, -1, 3)
    np.testing.assert_array_equal(values[0].numpy(), np.arange(-OFFSET, ENTRIES - OFFSET))
    np.testing.assert_array_equal(values[1].numpy(), 2 * np.arange(-OFFSET, ENTRIES - OFFSET))


@pytest.mark.parametrize(
    "table, offset, match",
    [
        (np.zeros(255, np.int8), OFFSET, "int8 \\[C, 256\\]"),
        (np.zeros(256, np.int16), OFFSET, "int8 \\[C, 256\\]"),
        (np.zeros(256, np.int8), 0, "256 \\* c \\+ 128"),
        (np.zeros((2, 256), np.int8), np.array([128, 128]), "256 \\* c \\+ 128"),
        (np.zeros((2, 256), np.int8), np.array([128, 385]), "256 \\* c \\+ 128"),
    ],
)
def test_refuses_tables_an_int8_index_could_leave(table, offset, match):
    with pytest.raises(ValueError, match=match):
        IntLookup(table, offset)
