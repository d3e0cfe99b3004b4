"""IntAdd: torch == onnxruntime bit for bit, against exact and float references."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from intq.quantizer.ops.add import IntAdd
from intq.quantizer.ops.onnx_fn import single_op_model

INT16_MIN, INT16_MAX = -32768, 32767
ELEMENTS = {np.int8: st.integers(-128, 127), np.int16: st.integers(INT16_MIN, INT16_MAX)}


def run_both(op, inputs: list[np.ndarray]) -> np.ndarray:
    """Run ``op`` in torch and in onnxruntime; assert they agree bit for bit; return the result."""
    model = single_op_model(op, inputs)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(inferred, full_check=True)  # the inferred output shape satisfies the checker
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, dict(zip(op.data_inputs, inputs, strict=True)))[0]
    want = op(*[torch.from_numpy(a) for a in inputs]).numpy()
    assert got.dtype == want.dtype == np.int16
    np.testing.assert_array_equal(got, want)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert tuple(d.dim_value for d in dims) == want.shape
    return got


def round_clip(v: np.ndarray) -> np.ndarray:
    """Round half up (towards +inf), then saturate to int16."""
    return np.clip(np.floor(v + 0.5), INT16_MIN, INT16_MAX)


def exact_target(a, b, ratio_a, ratio_b) -> np.ndarray:
    return round_clip(a.astype(np.float64) * ratio_a + b.astype(np.float64) * ratio_b)


# --- (a) bit-exact ------------------------------------------------------------------------------

# Ratio pairs that a shared 24-bit shift holds exactly, so a*ra + b*rb (float64, exact) is the target.
DYADIC_PAIRS = [(1.0, 1.0), (0.5, 0.25), (3 * 2.0**-8, 5 * 2.0**-10), (-0.75, 1.5), (2.0**-12, 2.0**-3), (0.0, 1.0)]


@pytest.mark.parametrize(("ratio_a", "ratio_b"), DYADIC_PAIRS)
@pytest.mark.parametrize(
    ("dtype_a", "dtype_b", "shape_a", "shape_b"),
    [
        (np.int16, np.int8, (2, 5, 8), (2, 5, 8)),  # residual stream + branch output
        (np.int8, np.int16, (3, 8), (8,)),  # broadcast
        (np.int16, np.int16, (4, 1), (1, 6)),  # both broadcast
        (np.int8, np.int8, (7,), (7,)),
    ],
)
def test_random_exact(ratio_a, ratio_b, dtype_a, dtype_b, shape_a, shape_b):
    rng = np.random.default_rng(0)
    info_a, info_b = np.iinfo(dtype_a), np.iinfo(dtype_b)
    a = rng.integers(info_a.min, info_a.max + 1, shape_a).astype(dtype_a)
    b = rng.integers(info_b.min, info_b.max + 1, shape_b).astype(dtype_b)
    np.testing.assert_array_equal(run_both(IntAdd(ratio_a, ratio_b), [a, b]), exact_target(a, b, ratio_a, ratio_b))


def test_extremes_saturate():
    values = np.array([INT16_MIN, INT16_MIN + 1, -1, 0, 1, INT16_MAX - 1, INT16_MAX], np.int16)
    a, b = np.meshgrid(values, values, indexing="ij")
    for ratio_a, ratio_b in [(1.0, 1.0), (1.0, -1.0), (2.0, 2.0), (-1.0, -1.0)]:
        got = run_both(IntAdd(ratio_a, ratio_b), [a, b])
        np.testing.assert_array_equal(got, exact_target(a, b, ratio_a, ratio_b))
    assert run_both(IntAdd(1.0, 1.0), [a, b])[0, 0] == INT16_MIN  # -65536 saturates


def test_one_rounding_on_the_sum():
    # a/2 + b/2 with a = b = 1: two separate roundings would give 1 + 1 = 2; one rounding gives round(1.0) = 1.
    a = np.array([1, -1, 1, 3, -3], np.int16)
    b = np.array([1, -1, 0, 0, 0], np.int8)
    got = run_both(IntAdd(0.5, 0.5), [a, b])
    np.testing.assert_array_equal(got, [1, -1, 1, 2, -1])  # ties -> half up: 0.5 -> 1, 1.5 -> 2, -1.5 -> -1


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_torch_matches_onnxruntime(data):
    dtype_a, dtype_b = (data.draw(st.sampled_from([np.int8, np.int16]), label=n) for n in ("dtype_a", "dtype_b"))
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=6), label="shape")
    a = data.draw(hnp.arrays(dtype_a, shape, elements=ELEMENTS[dtype_a]), label="a")
    b = data.draw(hnp.arrays(dtype_b, shape[-1:], elements=ELEMENTS[dtype_b]), label="b")
    ratio_a, ratio_b = (data.draw(st.floats(-4, 4), label=n) for n in ("ratio_a", "ratio_b"))
    run_both(IntAdd(ratio_a, ratio_b), [a, b])


# --- (b) property against the float reference ---------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_close_to_float_reference(data):
    """``|y - clip(a*ra + b*rb)| <= 1/2 + (|a| + |b|) * max(|ra|, |rb|) * 2**-24``."""
    a = data.draw(hnp.arrays(np.int16, 16, elements=ELEMENTS[np.int16]), label="a")
    b = data.draw(hnp.arrays(np.int8, 16, elements=ELEMENTS[np.int8]), label="b")
    ratio_a, ratio_b = (
        data.draw(st.sampled_from([-1.0, 1.0])) * 2.0 ** data.draw(st.floats(-16, 2), label=f"log2|{n}|")
        for n in ("ra", "rb")
    )
    y = IntAdd(ratio_a, ratio_b)(torch.from_numpy(a), torch.from_numpy(b)).numpy().astype(np.float64)
    v = a * ratio_a + b * ratio_b
    err = np.abs(y - np.clip(v, INT16_MIN, INT16_MAX))
    bound = (
        0.5
        + (np.abs(a.astype(np.float64)) + np.abs(b.astype(np.float64))) * max(abs(ratio_a), abs(ratio_b)) * 2.0**-24
        + 1e-9
    )
    assert np.all(err <= bound), f"max excess {np.max(err - bound)}"


# --- (c) refusals -------------------------------------------------------------------------------


def test_refuses_ratio_past_requantize_margin():
    # ratio 2**50 -> s = 1, m = 2**51; 2**15 * 2**51 passes 2**62.
    with pytest.raises(ValueError, match="IntAdd: scale ratio too large"):
        IntAdd(1.0, 2.0**50)


def test_refuses_non_finite_or_matrix_ratio():
    with pytest.raises(ValueError, match="non-finite"):
        IntAdd(float("nan"), 1.0)
    with pytest.raises(ValueError, match="one value per last-axis channel"):
        IntAdd(np.ones((2, 2)), 1.0)


def test_per_channel_ratio_matches_onnxruntime_and_float():
    """A per-channel ratio (a LayerNorm output with one scale per channel) scales each channel on its own."""
    rng = np.random.default_rng(7)
    ra = rng.uniform(0.01, 3.0, size=16)
    op = IntAdd(ra, 0.37)
    a = rng.integers(-128, 128, size=(3, 5, 16)).astype(np.int8)
    b = rng.integers(-32768, 32768, size=(3, 5, 16)).astype(np.int16)
    got = op(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    sess = ort.InferenceSession(single_op_model(op, [a, b]).SerializeToString())
    np.testing.assert_array_equal(sess.run(None, {"a": a, "b": b})[0], got)
    exact = a.astype(np.float64) * ra + b.astype(np.float64) * 0.37
    expected = np.clip(np.floor(exact + 0.5), -32768, 32767)
    assert np.abs(got - expected).max() <= 1


def test_refuses_wide_inputs():
    op = IntAdd(1.0, 1.0)
    with pytest.raises(ValueError, match="input b must be int8 or int16, got torch.int32"):
        op(torch.zeros(3, dtype=torch.int16), torch.zeros(3, dtype=torch.int32))


# --- (d) int8 output with a clamp range (HAWQV3 residual + ReLU, issue 5) -------------------------


@pytest.mark.parametrize(
    ("qmin", "qmax", "op_type"), [(0, 127, "IntAdd_c0x127"), (0, 15, "IntAdd_c0x15"), (-8, 7, "IntAdd_cm8x7")]
)
def test_clamped_add_is_int8_and_exact(qmin, qmax, op_type):
    rng = np.random.default_rng(5)
    a = rng.integers(-128, 128, (2, 3, 4, 4)).astype(np.int8)
    b = rng.integers(-128, 128, (2, 3, 4, 4)).astype(np.int8)
    ra, rb = 3 * 2.0**-1, 5 * 2.0**-3  # a shared 24-bit shift holds both exactly; large enough to saturate
    op = IntAdd(ra, rb, qmin, qmax)
    assert op.op_type == op_type and op.output_dtype == torch.int8
    model = single_op_model(op, [a, b])
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"a": a, "b": b})[0]
    want = op(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert got.dtype == want.dtype == np.int8
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, np.clip(np.floor(a * ra + b.astype(np.float64) * rb + 0.5), qmin, qmax))
    assert got.min() == qmin and got.max() == qmax


def test_default_add_keeps_its_name_and_int16():
    assert IntAdd(1.0, 1.0).op_type == "IntAdd" and IntAdd(1.0, 1.0).output_dtype == torch.int16
    assert IntAdd.function_proto().name == "IntAdd"


def test_clamped_add_refuses_a_range_outside_int8():
    with pytest.raises(ValueError, match=r"IntAdd: clamp range \[-1000, 1000\] .* <= 127"):
        IntAdd(1.0, 1.0, -1000, 1000)
