"""isqrt: torch emulation and ONNX function against math.isqrt, bit for bit."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import intq.quantizer.ops.isqrt as isqrt_module
from intq.quantizer.ops.isqrt import ISQRT_LIMIT, isqrt, isqrt_onnx
from intq.quantizer.ops.onnx_fn import FunctionBuilder, single_op_model

HYPOTHESIS_BATCH = 64


class _ISqrtOp:
    """A one-function wrapper so that ``single_op_model`` can run ``isqrt_onnx`` alone."""

    op_type = "ISqrt"
    data_inputs = ("v",)
    output_dtype = torch.int64

    def params(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def function_proto(cls):
        b = FunctionBuilder(cls.op_type, ["v"])
        b.op("Identity", isqrt_onnx(b, "v"), out="y")
        return b.build()


def _session(n: int) -> ort.InferenceSession:
    model = single_op_model(_ISqrtOp(), [np.zeros(n, dtype=np.int64)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _expected(values) -> np.ndarray:
    return np.array([max(math.isqrt(int(v)), 1) for v in values], dtype=np.int64)


def _check_both(values: np.ndarray, session: ort.InferenceSession | None = None) -> None:
    values = np.asarray(values, dtype=np.int64)
    expected = _expected(values)
    got_torch = isqrt(torch.from_numpy(values)).numpy()
    got_onnx = (session or _session(values.size)).run(None, {"v": values})[0]
    np.testing.assert_array_equal(got_torch, expected, err_msg="torch isqrt != math.isqrt")
    np.testing.assert_array_equal(got_onnx, expected, err_msg="onnxruntime isqrt != math.isqrt")


@pytest.fixture(scope="module")
def batch_session() -> ort.InferenceSession:
    return _session(HYPOTHESIS_BATCH)


def test_exhaustive_below_2_16():
    _check_both(np.arange(1 << 16, dtype=np.int64))


def test_edge_cases():
    ks = [1, 2, 3, 4095, 4096, 4097, (1 << 23) - 1, 1 << 23, (1 << 24) - 2, (1 << 24) - 1]
    ks += [1 << b for b in range(24)]
    values = {0, 1, 2, 3, ISQRT_LIMIT - 1, ISQRT_LIMIT - 2}
    for k in ks:
        values.update(v for v in (k * k - 1, k * k, k * k + 1, k * k + 2 * k) if 0 <= v < ISQRT_LIMIT)
    for b in range(49):
        values.update(v for v in ((1 << b) - 1, 1 << b, (1 << b) + 1) if v < ISQRT_LIMIT)
    _check_both(np.array(sorted(values), dtype=np.int64))


def test_every_bit_length_torch():
    """Random values of each bit length 1..48 (the iteration count falls with the length)."""
    rng = np.random.default_rng(1234)
    values = np.concatenate([rng.integers(1 << (b - 1), 1 << b, 2000) for b in range(1, 49)])
    got = isqrt(torch.from_numpy(values)).numpy()
    np.testing.assert_array_equal(got, _expected(values))


def test_iteration_count_is_minimal(monkeypatch):
    """The docstring's claim: v = 1 (and v = 0) need all 24 iterations."""
    monkeypatch.setattr(isqrt_module, "ISQRT_ITERATIONS", isqrt_module.ISQRT_ITERATIONS - 1)
    assert isqrt(torch.tensor([1], dtype=torch.int64)).item() != 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, ISQRT_LIMIT - 1), min_size=HYPOTHESIS_BATCH, max_size=HYPOTHESIS_BATCH))
def test_random_values(batch_session, values):
    _check_both(np.array(values, dtype=np.int64), batch_session)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, (1 << 24) - 1), min_size=HYPOTHESIS_BATCH, max_size=HYPOTHESIS_BATCH), st.integers(-1, 1)
)
def test_near_squares(batch_session, roots, delta):
    values = np.clip(np.array(roots, dtype=np.int64) ** 2 + delta, 0, ISQRT_LIMIT - 1)
    _check_both(values, batch_session)
