"""Shiftmax: torch == onnxruntime bit for bit; error against a float softmax within the documented bounds."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from intq.quantizer.ops.onnx_fn import single_op_model
from intq.quantizer.ops.shiftmax import MaskedShiftmax, Shiftmax

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


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


def float_softmax(x: np.ndarray, scale: float) -> np.ndarray:
    return torch.softmax(torch.from_numpy(x.astype(np.float64)) * scale, dim=-1).numpy()


def check_invariants(x: np.ndarray, y: np.ndarray) -> None:
    """Row sums within ``128 +- L/2`` (documented), and ``y`` non-decreasing in ``x`` within each row."""
    L = x.shape[-1]
    sums = y.astype(np.int64).sum(-1)
    assert np.all((sums > 128 - L / 2 - 2) & (sums <= 128 + L / 2)), (L, sums.min(), sums.max())
    order = np.argsort(x, axis=-1, kind="stable")
    assert np.all(np.diff(np.take_along_axis(y, order, -1).astype(np.int64), axis=-1) >= 0)


# --- (a) bit-exact on random and adversarial rows ----------------------------------------------------


def adversarial_rows(L: int, rng: np.random.Generator) -> np.ndarray:
    rows = [
        np.zeros(L),  # all equal
        np.full(L, INT32_MIN),  # all equal at the int32 minimum
        np.full(L, INT32_MAX),
        np.r_[INT32_MAX, np.full(L - 1, INT32_MIN)][:L],  # one huge, the rest tiny
        np.r_[np.full(L - 1, INT32_MIN), INT32_MAX][:L],
        -rng.integers(1, 2**31, L),  # all negative
        rng.choice([INT32_MIN, INT32_MAX, 0, -1, 1], L),  # extremes mixed
        rng.integers(INT32_MIN, INT32_MAX, L, endpoint=True),
        rng.integers(-5000, 5000, L),  # a few units of the scale
        np.r_[0, np.full(L - 1, -7)][:L],  # one just above the rest
    ]
    return np.stack(rows).astype(np.int32)


@pytest.mark.parametrize("scale", [1.0, 1 / 3.3, 1 / 100.0, 1e-3, 2.0**-20])
@pytest.mark.parametrize("L", [1, 2, 7, 197, 512])
def test_adversarial_rows_exact(scale, L):
    x = adversarial_rows(L, np.random.default_rng(L)).reshape(2, 5, L)
    y = run_both(Shiftmax(scale), x)
    check_invariants(x, y)
    if L == 1:
        np.testing.assert_array_equal(y, 127)  # probability 1, saturated at 127/128


def test_random_batches_exact():
    rng = np.random.default_rng(0)
    for scale in (1 / 8.0, 1 / 777.0, 2.0**-17):
        x = rng.integers(-(2**20), 2**20, (2, 3, 4, 33)).astype(np.int32)
        run_both(Shiftmax(scale), x)
        run_both(Shiftmax(scale), x.astype(np.int64))  # any integer input type


@settings(max_examples=40, deadline=None)
@given(
    inv_scale=st.floats(1.0, 2.0**20),
    rows=st.lists(st.lists(st.integers(INT32_MIN, INT32_MAX), min_size=6, max_size=6), min_size=1, max_size=4),
)
def test_exact_hypothesis(inv_scale, rows):
    run_both(Shiftmax(1 / inv_scale), np.array(rows, np.int32))


# --- (b) against a float softmax ----------------------------------------------------------------------

# (min 1/S, max |y/128 - softmax(x / D)|, max |y/128 - softmax(x * S)|) as documented in shiftmax.py
BOUNDS = [(15.5, 0.04, 0.09), (63.5, 0.03, 0.045), (255.5, 0.025, 0.03)]


def check_error(x: np.ndarray, scale: float) -> None:
    op = Shiftmax(scale)
    D = int(op.D)
    y = op(torch.from_numpy(x)).numpy().astype(np.float64)
    _, own, real = max(b for b in BOUNDS if b[0] <= 1 / scale)
    err_own = np.abs(y / 128 - float_softmax(x, 1 / D)).max()
    err_real = np.abs(y / 128 - float_softmax(x, scale)).max()
    assert err_own <= own, f"|y/128 - softmax(x/D)| = {err_own:.4f} > {own} at D={D}"
    assert err_real <= real, f"|y/128 - softmax(x*S)| = {err_real:.4f} > {real} at 1/S={1 / scale:.2f}"
    check_invariants(x, op(torch.from_numpy(x)).numpy())


@pytest.mark.parametrize("inv_scale", [15.51, 16.0, 16.49, 63.51, 64.49, 255.51, 4096.0, 2.0**20])
def test_error_two_level_rows(inv_scale):
    """One row maximum and ``k`` copies of a second logit swept over ``[-12, 0]`` (the worst cases found)."""
    scale = 1 / inv_scale
    gaps = np.round(np.linspace(-12, 0, 241) / scale).astype(np.int64)
    for k in (1, 2, 3, 8, 64, 128, 511):
        x = np.zeros((gaps.size, k + 1), np.int64)
        x[:, 1:] = gaps[:, None]
        check_error(x.astype(np.int32), scale)


@settings(max_examples=60, deadline=None)
@given(
    inv_scale=st.floats(15.5, 2.0**20),
    L=st.sampled_from([1, 2, 3, 5, 16, 64, 197, 512]),
    spread=st.floats(0.01, 20.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_error_hypothesis(inv_scale, L, spread, seed):
    rng = np.random.default_rng(seed)
    logits = np.clip(rng.normal(0.0, spread, (4, L)), -40, 40)
    check_error(np.round(logits * inv_scale).astype(np.int32), 1 / inv_scale)


def test_long_flat_row_rounds_to_zero():
    """Documented: 512 equal logits are 1/512 each, which rounds half up to 0 at scale 1/128."""
    x = np.zeros((1, 512), np.int32)
    expected = np.floor(128 / 512 + 0.5)
    np.testing.assert_array_equal(run_both(Shiftmax(1e-3), x), expected)


# --- (c) the scale's range -------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2.0, 1.0001, 2.0**-20 * 0.99, 0.0, -1e-3, float("nan")])
def test_rejects_out_of_range_scale(scale):
    with pytest.raises(ValueError, match="Shiftmax input scale .* out of range"):
        Shiftmax(scale)


# ---------------------------------------------------------------- MaskedShiftmax


def run_masked(op, x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``MaskedShiftmax`` in torch and in onnxruntime, asserted equal; the result."""
    model = single_op_model(op, [x, keep])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x, "keep": keep})[0]
    want = op(torch.from_numpy(x), torch.from_numpy(keep)).numpy()
    assert got.dtype == want.dtype == np.int8
    np.testing.assert_array_equal(got, want)
    return got


@pytest.mark.parametrize("keep_dtype", [np.int64, np.int32, np.bool_])
def test_masked_equals_shiftmax_on_the_kept_keys(keep_dtype):
    rng = np.random.default_rng(3)
    scale = 1 / 90
    x = rng.integers(-3000, 3000, (3, 2, 5, 9)).astype(np.int32)
    keep = rng.integers(0, 2, (3, 1, 1, 9)).astype(keep_dtype)
    keep[:, ..., 0] = 1
    y = run_masked(MaskedShiftmax(scale), x, keep)
    for b in range(3):
        kept = keep[b, 0, 0].astype(bool)
        assert (y[b][..., ~kept] == 0).all()
        np.testing.assert_array_equal(y[b][..., kept], Shiftmax(scale)(torch.from_numpy(x[b][..., kept])).numpy())


def test_masked_keys_do_not_change_the_kept_ones():
    """Whatever the masked scores hold (int32 extremes included), the kept outputs are the same integers."""
    rng = np.random.default_rng(4)
    op = MaskedShiftmax(1 / 40)
    x = rng.integers(-500, 500, (2, 3, 4, 6)).astype(np.int32)
    keep = np.array([1, 1, 0, 1, 0, 0], np.int64).reshape(1, 1, 1, 6)
    base = run_masked(op, x, keep)
    for fill in (INT32_MIN, INT32_MAX, 0):
        other = x.copy()
        other[..., keep[0, 0, 0] == 0] = fill
        np.testing.assert_array_equal(run_masked(op, other, keep), base)


def test_fully_masked_row_is_zero():
    op = MaskedShiftmax(1 / 64)
    x = np.arange(24, dtype=np.int32).reshape(2, 1, 2, 6) * 100
    keep = np.array([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.int64).reshape(2, 1, 1, 6)
    y = run_masked(op, x, keep)
    assert (y[1] == 0).all()
    np.testing.assert_array_equal(y[0][..., 0], np.full((1, 2), 127, np.int8))  # one kept key: probability 1
