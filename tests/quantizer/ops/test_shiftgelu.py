"""ShiftGELU: torch == onnxruntime bit for bit; error against the erf GELU within the documented bounds."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from intq.quantizer.ops.onnx_fn import single_op_model
from intq.quantizer.ops.shiftgelu import ShiftGELU, shift_sigmoid

ALL_INT8 = np.arange(-128, 128, dtype=np.int8)
# max |z sigmoid(1.702 z) - GELU(z)|, measured on a dense grid (see test_sigmoid_form_gap)
SIGMOID_FORM_GAP = 0.0204
# (min D, max |sig/128 - sigmoid(1.702 x S_in)|) as documented in shiftgelu.py
SIGMOID_BOUNDS = [(1, 0.162), (4, 0.095), (8, 0.061), (16, 0.036), (64, 0.024), (256, 0.020)]


def run_both(op, x: np.ndarray) -> np.ndarray:
    """Run ``op`` in torch and in onnxruntime; assert they agree bit for bit; return the result."""
    model = single_op_model(op, [x])
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    want = op(torch.from_numpy(x)).numpy()
    assert got.dtype == want.dtype == np.int8
    np.testing.assert_array_equal(got, want)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert tuple(d.dim_value for d in dims) == want.shape
    return got


def erf_gelu(z: np.ndarray) -> np.ndarray:
    return 0.5 * z * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# --- (a) bit-exact ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scale_in", "scale_out"),
    [
        (0.5, 0.5),  # D = 1
        (0.1, 0.1),
        (0.05, 0.02),  # saturates at 127
        (0.03, 0.5),  # most outputs round to 0
        (1e-3, 1e-3),
        (1 / (1.702 * (2**20 - 0.4)), 1e-6),  # D = 2**20
    ],
)
def test_every_int8_exact(scale_in, scale_out):
    op = ShiftGELU(scale_in, scale_out)
    run_both(op, ALL_INT8.reshape(2, 128))
    run_both(op, ALL_INT8.reshape(1, 2, 4, 32))


def test_random_and_constant_rows_exact():
    rng = np.random.default_rng(0)
    op = ShiftGELU(0.06, 0.05)
    rows = np.stack(
        [
            np.full(64, -128),
            np.full(64, 127),
            np.zeros(64),
            np.r_[127, np.full(63, -128)],  # one huge, the rest tiny
            -rng.integers(1, 129, 64),  # all negative
            rng.integers(-128, 128, 64),
        ]
    ).astype(np.int8)
    run_both(op, rows)
    run_both(op, rows[:, :1])  # C = 1


@settings(max_examples=30, deadline=None)
@given(
    inv=st.floats(1.0, 2.0**20 - 1),
    ratio=st.floats(0.05, 20.0),
    x=st.lists(st.integers(-128, 127), min_size=1, max_size=16),
)
def test_exact_hypothesis(inv, ratio, x):
    scale_in = 1 / (1.702 * inv)
    run_both(ShiftGELU(scale_in, scale_in * ratio), np.array(x, np.int8))


def test_elementwise_not_row_dependent():
    """A large row maximum must not change the other elements (the row-max variant gave x/2 here)."""
    op = ShiftGELU(0.06, 0.06)
    alone = run_both(op, ALL_INT8.reshape(-1, 1))
    with_max = run_both(op, np.stack([ALL_INT8, np.full(256, 127, np.int8)], axis=1))
    np.testing.assert_array_equal(with_max[:, :1], alone)
    # GELU(-128 * 0.06) = GELU(-7.68) ~ -6e-14: zero at scale 0.06
    assert with_max[0, 0] == np.floor(erf_gelu(np.array([-128 * 0.06]))[0] / 0.06 + 0.5) == 0


# --- (b) against float sigmoid and erf GELU ---------------------------------------------------------------


def test_sigmoid_form_gap():
    z = np.linspace(-12, 12, 240001)
    assert np.abs(z * sigmoid(1.702 * z) - erf_gelu(z)).max() <= SIGMOID_FORM_GAP


def check_error(scale_in: float, scale_out: float) -> None:
    op = ShiftGELU(scale_in, scale_out)
    D = int(op.D)
    delta = max(b for b in SIGMOID_BOUNDS if b[0] <= D)[1]
    x = ALL_INT8.astype(np.float64)
    sig = shift_sigmoid(torch.from_numpy(ALL_INT8), op.D).numpy() / 128
    sig_err = np.abs(sig - sigmoid(1.702 * x * scale_in)).max()
    assert sig_err <= delta, f"|sig/128 - sigmoid| = {sig_err:.4f} > {delta} at D={D}"
    y = op(torch.from_numpy(ALL_INT8)).numpy().astype(np.float64)
    want = np.clip(erf_gelu(x * scale_in), -128 * scale_out, 127 * scale_out)
    bound = scale_out / 2 + SIGMOID_FORM_GAP + delta * np.abs(x * scale_in) + 1e-12
    excess = np.abs(y * scale_out - want) - bound
    assert excess.max() <= 0, f"GELU error bound exceeded by {excess.max():.3g} at x={x[excess.argmax()]}, D={D}"


@pytest.mark.parametrize("D", [1, 2, 4, 5, 8, 12, 16, 20, 64, 256, 5000])
@pytest.mark.parametrize("offset", [-0.4999, 0.0, 0.4999])
def test_error_at_scale_edges(D, offset):
    """``1/(1.702 S_in)`` at both ends of ``D``'s rounding interval, where the sigmoid error peaks."""
    inv = max(D + offset, 1.0)
    scale_in = 1 / (1.702 * inv)
    for ratio in (0.25, 1.0, 4.0):
        check_error(scale_in, scale_in * ratio)


@settings(max_examples=80, deadline=None)
@given(inv=st.floats(1.0, 2.0**20 - 1), ratio=st.floats(0.25, 4.0))
def test_error_hypothesis(inv, ratio):
    scale_in = 1 / (1.702 * inv)
    check_error(scale_in, scale_in * ratio)


@pytest.mark.parametrize(("scale", "max_steps"), [(0.05, 1.18), (0.03, 1.6), (0.08, 1.0 + 1e-9)])
def test_measured_error_in_output_steps(scale, max_steps):
    """The measured maxima quoted in the docstring (S_in = S_out)."""
    y = ShiftGELU(scale, scale)(torch.from_numpy(ALL_INT8)).numpy().astype(np.float64)
    want = np.clip(erf_gelu(ALL_INT8.astype(np.float64) * scale) / scale, -128, 127)
    assert np.abs(y - want).max() <= max_steps


# --- (c) the scales' range ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_in", [0.6, 1.0, 1 / (1.702 * 2**20) * 0.99, 0.0, -0.05, float("inf")])
def test_rejects_out_of_range_input_scale(scale_in):
    with pytest.raises(ValueError, match="ShiftGELU input scale .* out of range"):
        ShiftGELU(scale_in, 0.05)


@pytest.mark.parametrize("scale_out", [0.0, -0.05, float("nan")])
def test_rejects_bad_output_scale(scale_out):
    with pytest.raises(ValueError, match="ShiftGELU output scale"):
        ShiftGELU(0.05, scale_out)
