"""IntMul: torch == onnxruntime bit for bit, broadcasting and extremes; the float meaning within one step."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from intq.quantizer.ops.mul import IntMul
from intq.quantizer.ops.onnx_fn import single_op_model


def run_both(op: IntMul, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    model = single_op_model(op, [a, b])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"a": a, "b": b})[0]
    want = op(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert got.dtype == want.dtype == np.int8
    np.testing.assert_array_equal(got, want)
    return got


@pytest.mark.parametrize("ratio", [1 / 127, 0.013, 1.7, 3000.0])
def test_gate_broadcast_exact(ratio):
    rng = np.random.default_rng(1)
    a = rng.integers(-128, 128, (2, 3, 4, 5)).astype(np.int8)
    b = rng.integers(0, 128, (2, 3, 1, 1)).astype(np.int8)
    y = run_both(IntMul(ratio), a, b)
    want = np.clip(np.floor(a.astype(np.float64) * b * ratio + 0.5), -128, 127)
    assert np.abs(y - want).max() <= 1  # the 24-bit multiplier's error can move a rounding by one step


def test_int16_operand_and_extremes():
    a = np.array([-32768, 32767, -1, 0, 1], np.int16)
    b = np.array([-128, 127, -128, 5, 127], np.int8)
    run_both(IntMul(2**-16), a, b)
    y = run_both(IntMul(1.0, 0, 127), np.array([-128, 127, 3], np.int8), np.array([3], np.int8))
    np.testing.assert_array_equal(y, [0, 127, 9])  # the clamp range of a fused ReLU


def test_range_suffix_names_the_op():
    assert IntMul(0.5).op_type == "IntMul"
    assert IntMul(0.5, 0, 127).op_type == "IntMul_c0x127"


@pytest.mark.parametrize("ratio", [0.0, -1.0, float("nan"), 2.0**24, [0.1, 0.2]])
def test_refuses_a_ratio_the_requantize_cannot_hold(ratio):
    with pytest.raises(ValueError, match="positive number below 2\\*\\*23"):
        IntMul(ratio)
