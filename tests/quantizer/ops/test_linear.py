"""IntLinear / IntLinearAcc: torch == onnxruntime bit for bit, against exact and float references."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from intq.quantizer.ops.linear import MAX_K, IntLinear, IntLinear16, IntLinearAcc
from intq.quantizer.ops.onnx_fn import single_op_model

INT8 = st.integers(-128, 127)


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
    assert got.dtype == want.dtype == np.dtype(str(op.output_dtype).replace("torch.", ""))
    np.testing.assert_array_equal(got, want)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert tuple(d.dim_value for d in dims) == want.shape
    return got


def reference_acc(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return x.astype(np.int64) @ w.astype(np.int64).T + b.astype(np.int64)


def round_clip(v: np.ndarray, lo: int = -128, hi: int = 127) -> np.ndarray:
    """Round half up (towards +inf), then saturate: the spec's rounding on an exact value."""
    return np.clip(np.floor(v + 0.5), lo, hi)


def dyadic_ratios(n: int, exponent: int = -20) -> np.ndarray:
    """Per-channel ratios with few mantissa bits: dyadic holds them exactly, so ``acc * r`` is the exact target."""
    return (2 * np.arange(n, dtype=np.float64) + 1) * 2.0**exponent


# --- (a) bit-exact on adversarial integers -------------------------------------------------------

EXTREME_CASES = {
    "all_min": (-128, -128),  # largest positive products, pairs of 2**15 (saturates 16-bit pair sums)
    "max_times_min": (127, -128),
    "min_times_max": (-128, 127),
    "all_max": (127, 127),
}


@pytest.mark.parametrize("k", [1, 64, 1000])
@pytest.mark.parametrize("case", sorted(EXTREME_CASES))
def test_extreme_operands_exact(case, k):
    xv, wv = EXTREME_CASES[case]
    n = 5
    x = np.full((3, k), xv, np.int8)
    w = np.full((n, k), wv, np.int8)
    b = np.array([0, 1, -1, 1000, -(2**20)], np.int32)
    acc = reference_acc(x, w, b)
    np.testing.assert_array_equal(run_both(IntLinearAcc(w, b), [x]), acc)
    ratio = dyadic_ratios(n, exponent=-22)
    np.testing.assert_array_equal(run_both(IntLinear(w, b, ratio), [x]), round_clip(acc * ratio))


def test_mixed_extremes_exact():
    rng = np.random.default_rng(1)
    x = rng.choice(np.array([-128, 127, -127, 126, 0], np.int8), (2, 7, 256))
    w = rng.choice(np.array([-128, 127, -1, 1], np.int8), (9, 256))
    x[0, 0] = -128  # an all-negative row
    b = rng.integers(-(2**24), 2**24, 9).astype(np.int32)
    acc = reference_acc(x, w, b)
    np.testing.assert_array_equal(run_both(IntLinearAcc(w, b), [x]), acc)
    ratio = dyadic_ratios(9, exponent=-18)
    np.testing.assert_array_equal(run_both(IntLinear(w, b, ratio), [x]), round_clip(acc * ratio))


def test_accumulator_at_int32_limits():
    """K = MAX_K of (-128)*(-128) plus a bias that lands exactly on 2**31 - 1."""
    k = MAX_K
    x = np.full((1, k), -128, np.int8)
    w = np.stack([np.full(k, -128, np.int8), np.full(k, 127, np.int8)])
    b = np.array([2**31 - 1 - k * 2**14, 0], np.int32)
    acc = reference_acc(x, w, b)
    assert acc[0, 0] == 2**31 - 1 and acc[0, 1] == -k * 128 * 127
    np.testing.assert_array_equal(run_both(IntLinearAcc(w, b), [x]), acc)
    ratio = np.array([2.0**-24, 2.0**-24])  # ~ +128 and ~ -127: both saturate or sit at the edge
    np.testing.assert_array_equal(run_both(IntLinear(w, b, ratio), [x]), round_clip(acc * ratio))


def test_ties_round_half_up_and_saturation():
    # acc = -3, -1, 1, 3 times ratio 1/2: exact ties -1.5, -0.5, 0.5, 1.5 -> -1, 0, 1, 2.
    x = np.array([[-3], [-1], [1], [3]], np.int8)
    w = np.array([[1], [127], [-128]], np.int8)
    ratio = np.array([0.5, 0.5, 0.5])
    got = run_both(IntLinear(w, None, ratio), [x])
    np.testing.assert_array_equal(got[:, 0], [-1, 0, 1, 2])
    np.testing.assert_array_equal(got, round_clip(reference_acc(x, w, np.zeros(3)) * ratio))
    # Negative and zero ratios (a folded negative gamma; a dead channel), saturating both ways.
    ratio = np.array([-1.0, 0.0, 1.0])
    got = run_both(IntLinear(w, None, ratio), [x])
    np.testing.assert_array_equal(got, round_clip(reference_acc(x, w, np.zeros(3)) * ratio))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_torch_matches_onnxruntime(data):
    k = data.draw(st.integers(1, 80), label="K")
    n = data.draw(st.integers(1, 12), label="N")
    x = data.draw(hnp.arrays(np.int8, (data.draw(st.integers(1, 4)), k), elements=INT8), label="x")
    w = data.draw(hnp.arrays(np.int8, (n, k), elements=INT8), label="w")
    b = data.draw(hnp.arrays(np.int32, (n,), elements=st.integers(-(2**24), 2**24)), label="b")
    ratio = data.draw(hnp.arrays(np.float64, (n,), elements=st.floats(1e-6, 1.0)), label="ratio")
    run_both(IntLinear(w, b, ratio), [x])
    run_both(IntLinearAcc(w, b), [x])


# --- (b) property against the float reference ---------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_close_to_float_reference(data):
    """``|y - clip(acc * r)| <= 1/2 + |acc * r| * 2**-24`` (24-bit multiplier, one rounding)."""
    k = data.draw(st.integers(1, 300), label="K")
    n = data.draw(st.integers(1, 8), label="N")
    x = data.draw(hnp.arrays(np.int8, (2, k), elements=INT8), label="x")
    w = data.draw(hnp.arrays(np.int8, (n, k), elements=INT8), label="w")
    b = data.draw(hnp.arrays(np.int32, (n,), elements=st.integers(-(2**20), 2**20)), label="b")
    magnitude = data.draw(hnp.arrays(np.float64, (n,), elements=st.floats(-20, 2)), label="log2|r|")
    sign = data.draw(hnp.arrays(np.float64, (n,), elements=st.sampled_from([-1.0, 1.0])), label="sign")
    ratio = sign * np.exp2(magnitude)
    y = IntLinear(w, b, ratio)(torch.from_numpy(x)).numpy().astype(np.float64)
    v = reference_acc(x, w, b) * ratio
    err = np.abs(y - np.clip(v, -128, 127))
    bound = 0.5 + np.abs(v) * 2.0**-24 + 1e-9
    assert np.all(err <= bound), f"max excess {np.max(err - bound)} at {np.argmax(err - bound)}"


# --- (c) the constructor refuses what would overflow --------------------------------------------


def test_refuses_k_past_int32_accumulator():
    k = MAX_K + 1
    with pytest.raises(ValueError, match=rf"K={k}.*int32 accumulator"):
        IntLinearAcc(np.ones((1, k), np.int8), np.zeros(1, np.int32))
    with pytest.raises(ValueError, match=rf"K={k}.*int32 accumulator"):
        IntLinear(np.ones((1, k), np.int8), None, 0.01)


def test_refuses_bias_that_overflows_with_k():
    k = 1000
    bias = np.array([2**31 - k * 2**14], np.int64)  # K * 2**14 + |b| == 2**31
    with pytest.raises(ValueError, match=r"K=1000 with max \|bias\|"):
        IntLinear(np.ones((1, k), np.int8), bias, 0.01)
    IntLinear(np.ones((1, k), np.int8), bias - 1, 0.01)  # one less fits


def test_refuses_ratio_past_requantize_margin():
    # K = 4: |acc| <= 2**16, and ratio 2**50 gives m = 2**51 (s = 1): |acc * m| reaches 2**67.
    with pytest.raises(ValueError, match="scale ratio too large"):
        IntLinear(np.ones((2, 4), np.int8), None, np.array([1.0, 2.0**50]))


@pytest.mark.parametrize(
    ("weight", "bias", "ratio", "message"),
    [
        (np.full((2, 3), 128), None, 1.0, r"weight has values in \[128, 128\]"),
        (np.ones((2, 3), np.float32), None, 1.0, "weight must be an integer array"),
        (np.ones((3,), np.int8), None, 1.0, r"weight must be a non-empty \[N, K\]"),
        (np.ones((2, 3), np.int8), np.zeros(3, np.int32), 1.0, r"bias must have shape \[2\]"),
        (np.ones((2, 3), np.int8), None, np.ones(3), r"ratio must be a scalar or have shape \[2\]"),
        (np.ones((2, 3), np.int8), None, np.array([1.0, np.inf]), "non-finite"),
    ],
)
def test_refuses_malformed_params(weight, bias, ratio, message):
    with pytest.raises(ValueError, match=message):
        IntLinear(weight, bias, ratio)


# --- (d) clamp ranges and 4-bit weights (issue 5) ------------------------------------------------


@pytest.mark.parametrize(("qmin", "qmax"), [(-128, 127), (-8, 7), (0, 15), (0, 127)])
@pytest.mark.parametrize("weight_bits", [8, 4])
def test_clamp_range_and_int4_weights_exact(qmin, qmax, weight_bits):
    rng = np.random.default_rng(3)
    lo, hi = (-8, 7) if weight_bits == 4 else (-128, 127)
    x = rng.integers(-128, 128, (5, 3, 40)).astype(np.int8)
    w = rng.integers(lo, hi + 1, (9, 40)).astype(np.int8)
    w[0], w[1] = lo, hi
    b = rng.integers(-(2**12), 2**12, 9).astype(np.int32)
    ratio = dyadic_ratios(9, exponent=-7 if weight_bits == 4 else -11)
    op = IntLinear(w, b, ratio, qmin, qmax, weight_bits=weight_bits)
    assert op.op_type == "IntLinear" + ("" if (qmin, qmax) == (-128, 127) else f"_c{qmin}x{qmax}".replace("-", "m"))
    got = run_both(op, [x])
    np.testing.assert_array_equal(got, round_clip(reference_acc(x, w, b) * ratio, qmin, qmax))
    assert got.min() == qmin and got.max() == qmax


def test_int4_weights_acc_and_int16_variants():
    rng = np.random.default_rng(4)
    x = rng.integers(-128, 128, (4, 16)).astype(np.int8)
    w = np.full((3, 16), -8, np.int8)
    b = np.array([0, 5, -5], np.int32)
    acc = run_both(IntLinearAcc(w, b, weight_bits=4), [x])
    np.testing.assert_array_equal(acc, reference_acc(x, w, b))
    op16 = IntLinear16(w, b, 0.5, weight_bits=4)
    assert op16.op_type == "IntLinear16" and op16.packed_int4 == frozenset({"w"})
    np.testing.assert_array_equal(run_both(op16, [x]), round_clip(reference_acc(x, w, b) * 0.5, -32768, 32767))


def test_class_function_is_the_default_configuration():
    assert IntLinear.function_proto().name == "IntLinear"
    assert IntLinear16.function_proto().name == "IntLinear16"
    with pytest.raises(ValueError, match=r"IntLinear: clamp range \[0, 200\]"):
        IntLinear(np.ones((2, 2), np.int8), None, 0.1, 0, 200)
