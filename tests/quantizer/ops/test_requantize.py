"""Requantize: torch == onnxruntime bit for bit, with the default and narrow clamp ranges."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from intq.quantizer.ops.onnx_fn import single_op_model
from intq.quantizer.ops.requantize import Requantize


def run_both(op, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(single_op_model(op, [x]).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    want = op(torch.from_numpy(x)).numpy()
    assert got.dtype == want.dtype == np.int8
    np.testing.assert_array_equal(got, want)
    return got


@pytest.mark.parametrize(("qmin", "qmax"), [(-128, 127), (-8, 7), (0, 15), (0, 127)])
@pytest.mark.parametrize("dtype", [np.int32, np.int16, np.int8])
def test_clamp_range_exact(qmin, qmax, dtype):
    info = np.iinfo(dtype)
    x = np.concatenate([np.arange(-300, 301), [info.min, info.max]]).clip(info.min, info.max).astype(dtype)
    ratio = 1.5 if dtype == np.int8 else 3 * 2.0**-6  # dyadic holds both exactly: x * ratio is the exact target
    got = run_both(Requantize(ratio, qmin, qmax), x)
    np.testing.assert_array_equal(got, np.clip(np.floor(x * ratio + 0.5), qmin, qmax))
    assert got.min() == qmin and got.max() == qmax  # both edges reached


def test_op_type_names_the_range():
    assert Requantize(0.5).op_type == "Requantize"
    assert Requantize(0.5, 0, 15).op_type == "Requantize_c0x15"
    assert Requantize(0.5, -8, 7).function_proto().name == "Requantize_cm8x7"
    assert Requantize.function_proto().name == "Requantize"  # the class builds the default configuration


def test_refuses_a_range_outside_int8():
    with pytest.raises(ValueError, match=r"Requantize: clamp range \[0, 255\]"):
        Requantize(0.5, 0, 255)
