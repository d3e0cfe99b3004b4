"""shift_exp: torch == onnxruntime bit for bit; error against math.exp within the documented bounds."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from intq.quantizer.ops.base import as_buffer
from intq.quantizer.ops.onnx_fn import FunctionBuilder, single_op_model
from intq.quantizer.ops.shift_exp import EXP_BITS, MAX_DIVISOR, exp_divisor, shift_exp, shift_exp_onnx

FLOOR = 2.0**-EXP_BITS


class _ShiftExpOp(torch.nn.Module):
    """A one-function op so that ``single_op_model`` can run ``shift_exp_onnx`` alone."""

    op_type = "ShiftExp"
    data_inputs = ("t",)
    param_names = ("D",)
    output_dtype = torch.int64

    def __init__(self, D: int):
        super().__init__()
        self.register_buffer("D", as_buffer(D, torch.int64))

    def params(self) -> dict[str, np.ndarray]:
        return {"D": self.D.numpy()}

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return shift_exp(t, self.D)

    @classmethod
    def function_proto(cls):
        b = FunctionBuilder(cls.op_type, ["t", "D"])
        b.op("Identity", shift_exp_onnx(b, "t", "D"), out="y")
        return b.build()


def run_both(D: int, t: np.ndarray) -> np.ndarray:
    """``shift_exp`` in torch and in onnxruntime; assert they agree bit for bit; return the result."""
    op = _ShiftExpOp(D)
    model = single_op_model(op, [t])
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"t": t})[0]
    want = op(torch.from_numpy(t)).numpy()
    assert got.dtype == want.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    return got


def normalized(e: np.ndarray, D: int) -> np.ndarray:
    return e.astype(np.float64) / (D * 2.0**EXP_BITS)


# --- (a) bit-exact ---------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [1, 2, 3, 7, 16, 100, 1023, 4096])
def test_every_t_exact(D):
    t = np.arange(-16 * D - 40, 1, dtype=np.int64)
    e = run_both(D, t)
    assert e[-1] == D * 2**EXP_BITS  # t = 0: exp(0) = 1 exactly
    assert e.min() == D  # the floor 2**-15


@pytest.mark.parametrize("D", [1, 12345, MAX_DIVISOR])
def test_extreme_t_exact(D):
    rng = np.random.default_rng(D)
    t = np.concatenate(
        [
            np.array([0, -1, -2, -3, -15, -16, -17, -(2**31), -(2**32) + 1, -(2**32)], np.int64),
            -rng.integers(0, 2**32, 500, dtype=np.int64),
            -rng.integers(0, 40 * D, 500, dtype=np.int64),
        ]
    ).reshape(2, 1, -1)
    e = run_both(D, t)
    assert e.min() >= D and e.max() <= D * 2**EXP_BITS


# --- (b) against math.exp ----------------------------------------------------------------------------

# (min D, relative error range for t/D >= -10, absolute error bound) as documented in shift_exp.py
BOUNDS = [(1, -0.12, 0.98, 0.40), (16, -0.012, 0.19, 0.097), (128, 0.0, 0.11, 0.051), (1024, 0.0, 0.10, 0.045)]


def check_bounds(D: int, t: np.ndarray, e: np.ndarray) -> None:
    u = t.astype(np.float64) / D
    E = normalized(e, D)
    ref = np.exp(u)
    _, lo, hi, abs_bound = max(b for b in BOUNDS if b[0] <= D)
    live = u >= -10
    rel = E[live] / ref[live] - 1
    assert np.all((rel >= lo - 1e-12) & (rel <= hi)), (D, rel.min(initial=0), rel.max(initial=0))
    assert np.abs(E - ref).max() <= abs_bound, (D, np.abs(E - ref).max())
    np.testing.assert_array_equal(E[u <= -10.5], FLOOR)
    assert np.all(np.diff(e[np.argsort(t, kind="stable")]) >= 0), "shift_exp is not monotone in t"


@pytest.mark.parametrize("D", [1, 2, 3, 4, 5, 7, 11, 16, 17, 100, 127, 128, 1000, 1024, 4095])
def test_error_bounds_every_t(D):
    t = np.arange(-12 * D, 1, dtype=np.int64)
    check_bounds(D, t, shift_exp(torch.from_numpy(t), D).numpy())


@settings(max_examples=150, deadline=None)
@given(
    D=st.integers(1, MAX_DIVISOR),
    u=st.lists(st.floats(-14.0, 0.0), min_size=1, max_size=64),
)
def test_error_bounds_hypothesis(D, u):
    t = np.minimum(np.round(np.asarray(u) * D), 0).astype(np.int64)
    check_bounds(D, t, shift_exp(torch.from_numpy(t), D).numpy())


# --- (c) the scale's range ------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.5, 1 / (MAX_DIVISOR + 1), 0.0, -0.01, math.inf, math.nan])
def test_exp_divisor_rejects_out_of_range_scale(scale):
    with pytest.raises(ValueError, match="out of range"):
        exp_divisor(scale, "test")


@pytest.mark.parametrize(
    ("scale", "D"), [(1.0, 1), (1 / 2.49, 2), (1 / 2.51, 3), (1e-3, 1000), (2.0**-20, MAX_DIVISOR)]
)
def test_exp_divisor_rounds(scale, D):
    assert exp_divisor(scale) == D
