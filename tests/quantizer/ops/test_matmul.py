"""IntMatMul / IntMatMulAcc: torch == onnxruntime bit for bit, against exact and float references."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from intq.quantizer.ops.linear import MAX_K
from intq.quantizer.ops.matmul import IntMatMul, IntMatMulAcc
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


def reference_acc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.matmul(a.astype(np.int64), b.astype(np.int64))


def round_clip(v: np.ndarray, lo: int = -128, hi: int = 127) -> np.ndarray:
    """Round half up (towards +inf), then saturate: the spec's rounding on an exact value."""
    return np.clip(np.floor(v + 0.5), lo, hi)


# --- (a) bit-exact ------------------------------------------------------------------------------

BROADCAST_SHAPES = [
    ((4, 16), (16, 5)),
    ((2, 3, 4, 16), (16, 5)),  # shared right operand
    ((4, 16), (3, 16, 5)),  # shared left operand
    ((2, 1, 4, 16), (1, 3, 16, 5)),  # both broadcast
    ((2, 6, 7, 32), (2, 6, 32, 7)),  # attention-like Q @ K^T
]


@pytest.mark.parametrize(("a_shape", "b_shape"), BROADCAST_SHAPES)
def test_broadcast_shapes_exact(a_shape, b_shape):
    rng = np.random.default_rng(len(a_shape) * 10 + len(b_shape))
    a = rng.integers(-128, 128, a_shape).astype(np.int8)
    b = rng.integers(-128, 128, b_shape).astype(np.int8)
    acc = reference_acc(a, b)
    np.testing.assert_array_equal(run_both(IntMatMulAcc(), [a, b]), acc)
    ratio = 3 * 2.0**-14  # dyadic exactly: acc * ratio is the exact target
    np.testing.assert_array_equal(run_both(IntMatMul(ratio), [a, b]), round_clip(acc * ratio))


@pytest.mark.parametrize("k", [1, 64, 1000])
@pytest.mark.parametrize(("av", "bv"), [(-128, -128), (127, -128), (-128, 127), (127, 127)])
def test_extreme_operands_exact(av, bv, k):
    a = np.full((2, 3, k), av, np.int8)
    b = np.full((k, 4), bv, np.int8)
    acc = reference_acc(a, b)
    np.testing.assert_array_equal(run_both(IntMatMulAcc(), [a, b]), acc)
    for ratio in (2.0**-20, 1.0):  # in range, and saturating both ways
        np.testing.assert_array_equal(run_both(IntMatMul(ratio), [a, b]), round_clip(acc * ratio))


def test_accumulator_at_int32_limit():
    a = np.full((1, MAX_K), -128, np.int8)
    b = np.stack([np.full(MAX_K, -128, np.int8), np.full(MAX_K, 127, np.int8)], axis=1)
    acc = reference_acc(a, b)
    assert acc[0, 0] == MAX_K * 2**14 == 2**31 - 2**14
    np.testing.assert_array_equal(run_both(IntMatMulAcc(), [a, b]), acc)
    np.testing.assert_array_equal(run_both(IntMatMul(2.0**-24), [a, b]), round_clip(acc * 2.0**-24))


def test_ties_round_half_up():
    a = np.array([[-3], [-1], [1], [3], [-2]], np.int8)
    b = np.array([[1]], np.int8)
    got = run_both(IntMatMul(0.5), [a, b])
    np.testing.assert_array_equal(got[:, 0], [-1, 0, 1, 2, -1])


def test_negative_ratio():
    rng = np.random.default_rng(3)
    a = rng.integers(-128, 128, (3, 5, 8)).astype(np.int8)
    b = rng.integers(-128, 128, (8, 6)).astype(np.int8)
    ratio = -(2.0**-9)
    np.testing.assert_array_equal(run_both(IntMatMul(ratio), [a, b]), round_clip(reference_acc(a, b) * ratio))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_torch_matches_onnxruntime(data):
    m, k, n = (data.draw(st.integers(1, 24), label=name) for name in "MKN")
    batch = data.draw(st.sampled_from([(), (2,), (2, 3)]), label="batch")
    a = data.draw(hnp.arrays(np.int8, (*batch, m, k), elements=INT8), label="a")
    b = data.draw(hnp.arrays(np.int8, (k, n), elements=INT8), label="b")
    run_both(IntMatMul(data.draw(st.floats(1e-6, 1.0), label="ratio")), [a, b])
    run_both(IntMatMulAcc(), [a, b])


# --- (b) property against the float reference ---------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_close_to_float_reference(data):
    """``|y - clip(acc * r)| <= 1/2 + |acc * r| * 2**-24`` (24-bit multiplier, one rounding)."""
    m, k, n = (data.draw(st.integers(1, 40), label=name) for name in "MKN")
    a = data.draw(hnp.arrays(np.int8, (2, m, k), elements=INT8), label="a")
    b = data.draw(hnp.arrays(np.int8, (2, k, n), elements=INT8), label="b")
    ratio = data.draw(st.sampled_from([-1.0, 1.0])) * 2.0 ** data.draw(st.floats(-20, 2), label="log2|r|")
    y = IntMatMul(ratio)(torch.from_numpy(a), torch.from_numpy(b)).numpy().astype(np.float64)
    v = reference_acc(a, b) * ratio
    err = np.abs(y - np.clip(v, -128, 127))
    bound = 0.5 + np.abs(v) * 2.0**-24 + 1e-9
    assert np.all(err <= bound), f"max excess {np.max(err - bound)}"


# --- (c) refusals -------------------------------------------------------------------------------


def test_refuses_ratio_past_requantize_margin():
    # The worst int32 accumulator (2**31) times m = 2**32 (ratio 2**31, s = 1) passes 2**62.
    with pytest.raises(ValueError, match="IntMatMul: scale ratio too large"):
        IntMatMul(2.0**31)


def test_refuses_non_scalar_ratio():
    with pytest.raises(ValueError, match="ratio must be a scalar"):
        IntMatMul(np.array([0.1, 0.2]))


@pytest.mark.parametrize("op", [IntMatMul(0.01), IntMatMulAcc()], ids=lambda op: op.op_type)
def test_refuses_k_past_int32_accumulator(op):
    k = MAX_K + 1
    a = torch.zeros((1, k), dtype=torch.int8)
    b = torch.zeros((k, 1), dtype=torch.int8)
    with pytest.raises(ValueError, match=rf"{op.op_type}: reduction length K={k}.*int32 accumulator"):
        op(a, b)
