"""ILayerNorm: torch emulation == onnxruntime bit for bit; accuracy against float64 F.layer_norm.

The accuracy tests compare with ``torch.nn.functional.layer_norm`` in float64
and the error bound written in ``quantizer/ops/layernorm.py``; nothing here is
derived from the op's own output.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from intq.quantizer.ops.layernorm import E_MAX, ILayerNorm, K
from intq.quantizer.ops.onnx_fn import single_op_model

INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1


# ---------------------------------------------------------------- helpers


def _run_onnx(op: ILayerNorm, x: np.ndarray) -> np.ndarray:
    model = single_op_model(op, [x])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _bit_exact(op: ILayerNorm, x: np.ndarray) -> np.ndarray:
    """Run both executors, assert they agree bit for bit, return the output."""
    got_torch = op(torch.from_numpy(x))
    assert got_torch.dtype == torch.int8
    got_onnx = _run_onnx(op, x)
    assert got_onnx.dtype == np.int8
    assert got_onnx.shape == x.shape
    mismatch = int((got_torch.numpy() != got_onnx).sum())
    assert mismatch == 0, f"{mismatch} of {x.size} outputs differ between torch and onnxruntime"
    return got_onnx


def _reference(x, gamma, beta, eps, scale_in, scale_out) -> tuple[np.ndarray, np.ndarray]:
    """Float64 LayerNorm of ``x * scale_in``: (normalized n, output in S_out units clamped to int8)."""
    xf = torch.from_numpy(np.asarray(x, dtype=np.float64) * scale_in)
    n = F.layer_norm(xf, (x.shape[-1],), eps=eps).numpy()
    return n, np.clip((gamma * n + beta) / scale_out, -128, 127)


def _error_and_bound(op, x, gamma, beta, eps, scale_in, scale_out):
    """|out - ref| and the layernorm.py bound, per element."""
    n, ref = _reference(x, gamma, beta, eps, scale_in, scale_out)
    out = op(torch.from_numpy(x)).numpy().astype(np.float64)
    channels = x.shape[-1]
    xd = np.asarray(x, dtype=np.float64)
    u = xd - xd.mean(axis=-1, keepdims=True)
    v = (u * u).sum(axis=-1, keepdims=True) + channels * eps / scale_in**2
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma = np.sqrt((v - 1) / channels)
        ok = (v > 1) & (math.sqrt(channels) * sigma > 1)
        sigma = np.where(ok, sigma, 1.0)
        g = np.abs(gamma) / scale_out
        an = np.abs(n)
        d = 1 / sigma + an / sigma**2 + (an + 1 / sigma + an / sigma**2) / (math.sqrt(channels) * sigma - 1) + 2.0**-14
        s = op.s.numpy().astype(np.float64)
        m = op.m.numpy()
        mult = np.where(np.abs(m) >= 1 << 19, g * (an + d) * 2.0**-19, 2.0 ** (K - 1 - s))
        bound = 0.5 + g * d + mult + 2.0 ** -(s + 1) + 1e-9  # 1e-9: float64 rounding of the reference
    # Outside the premise (near-constant rows; with eps = 0 the reference itself is 0/0) nothing is claimed.
    return np.where(ok, np.abs(out - ref), 0.0), np.where(ok, bound, np.inf)


def _rows(rng, shape, std, center=0.0, lo=INT16_MIN, hi=INT16_MAX, dtype=np.int16) -> np.ndarray:
    return np.clip(np.rint(rng.normal(center, std, shape)), lo, hi).astype(dtype)


def _vit_params(rng, channels):
    gamma = rng.normal(1.0, 0.5, channels)
    gamma[rng.random(channels) < 0.05] *= 1e-4  # near-zero channels, as trained LayerNorms have
    gamma[rng.random(channels) < 0.02] = 0.0
    beta = rng.normal(0.0, 0.5, channels)
    return gamma, beta


def _fill_int8(gamma, beta, nmax=4.0):
    """S_out that maps |gamma * n + beta| <= max|gamma| * nmax + max|beta| onto 127."""
    return float(np.abs(gamma).max() * nmax + np.abs(beta).max()) / 127


# ---------------------------------------------------------------- bit exactness (torch == onnxruntime)


def test_vit_shape_int16():
    rng = np.random.default_rng(0)
    channels = 192
    gamma, beta = _vit_params(rng, channels)
    gamma[:8] *= -1
    std = np.exp2(rng.uniform(3, 13, (2, 197, 1)))
    x = np.clip(np.rint(rng.normal(0, 1, (2, 197, channels)) * std + rng.normal(0, 3000, (2, 197, 1))), -32768, 32767)
    x = x.astype(np.int16)
    op = ILayerNorm(gamma, beta, 1e-6, 0.01, _fill_int8(gamma, beta))
    _bit_exact(op, x)
    err, bound = _error_and_bound(op, x, gamma, beta, 1e-6, 0.01, _fill_int8(gamma, beta))
    assert (err <= bound).all(), f"max excess over the bound {float((err - bound).max()):.4f} LSB"


def test_int8_input():
    rng = np.random.default_rng(1)
    channels = 384
    gamma, beta = _vit_params(rng, channels)
    x = _rows(rng, (4, 50, channels), 40.0, lo=-128, hi=127, dtype=np.int8)
    _bit_exact(ILayerNorm(gamma, beta, 1e-5, 0.05, _fill_int8(gamma, beta)), x)


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_constant_rows(eps):
    """A constant row has y = 0 and var = E: the output is beta alone, rounded."""
    channels = 64
    rng = np.random.default_rng(2)
    gamma, beta = _vit_params(rng, channels)
    scale_out = 0.05
    x = np.array([[v] * channels for v in (INT16_MIN, INT16_MAX, 0, -1, 1, 12345)], dtype=np.int16)
    op = ILayerNorm(gamma, beta, eps, 0.01, scale_out)
    out = _bit_exact(op, x).astype(np.float64)
    expected = np.clip(beta / scale_out, -128, 127)
    tolerance = 0.5 + 2.0 ** -(op.s.numpy() + 1)
    assert (np.abs(out - expected) <= tolerance).all()


@pytest.mark.parametrize("channels", [768, 4096])
def test_extreme_int16_values(channels):
    """Alternating and one-hot extremes: the largest sum, var (~2**44) and |y| the bounds allow."""
    rng = np.random.default_rng(3)
    gamma, beta = _vit_params(rng, channels)
    gamma[::3] *= -1
    alternating = np.where(np.arange(channels) % 2 == 0, INT16_MIN, INT16_MAX)
    one_hot_hi = np.full(channels, INT16_MIN)
    one_hot_hi[channels // 3] = INT16_MAX
    one_hot_lo = np.full(channels, INT16_MAX)
    one_hot_lo[-1] = INT16_MIN
    half = np.where(np.arange(channels) < channels // 2, INT16_MIN, INT16_MAX)
    x = np.stack([alternating, one_hot_hi, one_hot_lo, half, np.full(channels, INT16_MIN)]).astype(np.int16)
    for eps, scale_out in ((1e-6, 0.05), (1e-5, _fill_int8(gamma, beta, nmax=math.sqrt(channels)))):
        op = ILayerNorm(gamma, beta, eps, 0.001, scale_out)
        _bit_exact(op, x)
        err, bound = _error_and_bound(op, x, gamma, beta, eps, 0.001, scale_out)
        assert (err <= bound).all()


def test_variance_offset_capped():
    """eps / S_in**2 beyond 2**46 / C is capped at E = 2**46; var stays in isqrt's domain."""
    channels = 768
    rng = np.random.default_rng(4)
    gamma, beta = _vit_params(rng, channels)
    op = ILayerNorm(gamma, beta, 1.0, 1e-7, 0.05)
    assert int(op.E.item()) == E_MAX
    x = np.stack([np.where(np.arange(channels) % 2 == 0, INT16_MIN, INT16_MAX), rng.integers(-32768, 32768, channels)])
    _bit_exact(op, x.astype(np.int16))


def test_single_channel():
    """C = 1: y is always 0, so the output is round(beta / S_out) whatever x is."""
    x = np.array([[INT16_MIN], [INT16_MAX], [0], [7]], dtype=np.int16)
    for beta in (0.0, 0.3, -2.71, 100.0, -500.0):
        op = ILayerNorm(np.array([1.5]), np.array([beta]), 1e-5, 0.01, 0.1)
        out = _bit_exact(op, x).astype(np.float64)
        expected = np.clip(beta / 0.1, -128, 127)
        assert (np.abs(out - expected) <= 0.5 + 2.0 ** -(int(op.s.item()) + 1)).all()


def test_negative_zero_and_tiny_gamma():
    channels = 96
    rng = np.random.default_rng(5)
    gamma = np.concatenate([-np.abs(rng.normal(1, 0.3, 32)), np.zeros(32), rng.normal(0, 1e-6, 32)])
    beta = rng.normal(0, 2.0, channels)
    scale_out = 0.04
    x = _rows(rng, (3, 17, channels), 2000.0)
    op = ILayerNorm(gamma, beta, 1e-6, 0.01, scale_out)
    _bit_exact(op, x)
    err, bound = _error_and_bound(op, x, gamma, beta, 1e-6, 0.01, scale_out)
    assert (err <= bound).all()
    assert (op.m.numpy()[:32] < 0).all() and (op.m.numpy()[32:64] == 0).all()


def test_params_layout():
    op = ILayerNorm(np.ones(8), np.zeros(8), 1e-5, 0.01, 0.05)
    params = op.params()
    assert list(params) == ["E", "m", "bias", "s"]
    assert params["E"].size == 1 and int(params["E"].reshape(-1)[0]) == round(8 * 1e-5 / 0.01**2)
    for name in ("m", "bias", "s"):
        assert params[name].shape == (8,) and params[name].dtype == np.int64


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    channels=st.sampled_from([1, 2, 3, 17, 192, 768]),
    log2_std=st.floats(-1, 14),
    log2_gain=st.floats(-6, 12),
    eps=st.sampled_from([0.0, 1e-12, 1e-6, 1e-5]),
)
def test_random_configs_bit_exact(seed, channels, log2_std, log2_gain, eps):
    rng = np.random.default_rng(seed)
    gamma, beta = _vit_params(rng, channels)
    gamma *= rng.choice([-1.0, 1.0], channels)
    x = _rows(rng, (3, 5, channels), 2.0**log2_std, center=rng.uniform(-20000, 20000))
    scale_out = max(float(np.abs(gamma).max()), 1e-3) / 2.0**log2_gain
    _bit_exact(ILayerNorm(gamma, beta, eps, float(np.exp2(rng.uniform(-12, 0))), scale_out), x)


# ---------------------------------------------------------------- accuracy against float64 LayerNorm


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    channels=st.one_of(st.sampled_from([2, 192, 384, 768]), st.integers(2, 768)),
    log2_std=st.floats(-1, 14),
    center=st.floats(-0.9, 0.9),
    int8_input=st.booleans(),
    log2_scale_in=st.floats(-14, 0),
    eps=st.sampled_from([0.0, 1e-12, 1e-6, 1e-5]),
    log2_gain=st.floats(-4, 7),
    beta_lsb=st.floats(0, 200),
)
def test_error_bound(seed, channels, log2_std, center, int8_input, log2_scale_in, eps, log2_gain, beta_lsb):
    rng = np.random.default_rng(seed)
    gamma, beta = _vit_params(rng, channels)
    gamma *= rng.choice([-1.0, 1.0], channels)
    if int8_input:
        x = _rows(rng, (8, channels), 2.0 ** min(log2_std, 7), 127 * center, -128, 127, np.int8)
    else:
        x = _rows(rng, (8, channels), 2.0**log2_std, 32767 * center)
    scale_in = 2.0**log2_scale_in
    scale_out = max(float(np.abs(gamma).max()), 1e-3) / 2.0**log2_gain  # g <= 2**log2_gain
    beta = beta * beta_lsb * scale_out
    op = ILayerNorm(gamma, beta, eps, scale_in, scale_out)
    err, bound = _error_and_bound(op, x, gamma, beta, eps, scale_in, scale_out)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"error {err[worst]:.4f} > bound {bound[worst]:.4f} LSB at {worst}"


def test_measured_vit_regime():
    """The docstring's first table line: int16 rows with std 2**8..2**13 LSB stay within 0.61 LSB."""
    rng = np.random.default_rng(6)
    worst = 0.0
    for channels in (192, 384, 768):
        for _ in range(8):
            gamma, beta = _vit_params(rng, channels)
            std = float(np.exp2(rng.uniform(8, 13)))
            x = _rows(rng, (64, channels), std, center=rng.uniform(-0.3, 0.3) * 32767)
            scale_in, scale_out = float(rng.uniform(0.001, 0.1)), _fill_int8(gamma, beta)
            op = ILayerNorm(gamma, beta, 1e-6, scale_in, scale_out)
            err, _ = _error_and_bound(op, x, gamma, beta, 1e-6, scale_in, scale_out)
            worst = max(worst, float(err.max()))
    assert worst <= 0.61, f"measured max error {worst:.4f} LSB"


# ---------------------------------------------------------------- configurations the op refuses


def test_absurd_beta_names_the_channel():
    beta = np.zeros(16)
    beta[5] = 1e18
    with pytest.raises(ValueError, match="channel 5"):
        ILayerNorm(np.ones(16), beta * 0.05, 1e-5, 0.01, 0.05)


def test_absurd_gamma_names_the_channel():
    gamma = np.ones(16)
    gamma[11] = 1e30
    with pytest.raises(ValueError, match="channel 11"):
        ILayerNorm(gamma, np.zeros(16), 1e-5, 0.01, 0.05)


def test_overflowing_scale_out_names_the_channel():
    beta = np.zeros(4)
    beta[2] = 1.0
    with pytest.raises(ValueError, match="channel 2"):
        ILayerNorm(np.zeros(4), beta, 1e-5, 0.01, 1e-310)  # beta / scale_out overflows float64


def test_small_gamma_with_large_beta_is_accepted():
    """dyadic alone would give s near 62 and overflow bias; the shift cap keeps it in range."""
    gamma = np.full(4, 1e-9)
    beta = np.array([100.0, -120.0, 3.0, 0.0])
    op = ILayerNorm(gamma, beta, 1e-5, 0.01, 1.0)
    x = np.array([[100, -200, 300, 0]], dtype=np.int16)
    out = _bit_exact(op, x).astype(np.float64)
    assert (np.abs(out - np.clip(beta, -128, 127)) <= 0.5 + 1e-6).all()


@pytest.mark.parametrize(
    ("gamma", "beta", "eps", "scale_in", "scale_out", "message"),
    [
        (np.ones(4097), np.zeros(4097), 1e-5, 0.01, 0.05, "4097 channels"),
        (np.ones(4), np.zeros(5), 1e-5, 0.01, 0.05, "same length"),
        (np.ones(4), np.zeros(4), 1e-5, 0.01, 0.0, "scale_out"),
        (np.ones(4), np.zeros(4), 1e-5, -1.0, 0.05, "scale_in"),
        (np.ones(4), np.zeros(4), -1e-5, 0.01, 0.05, "eps"),
        (np.array([1.0, np.nan]), np.zeros(2), 1e-5, 0.01, 0.05, "finite"),
    ],
)
def test_invalid_configuration(gamma, beta, eps, scale_in, scale_out, message):
    with pytest.raises(ValueError, match=message):
        ILayerNorm(gamma, beta, eps, scale_in, scale_out)


def test_wrong_channel_count_at_runtime():
    op = ILayerNorm(np.ones(8), np.zeros(8), 1e-5, 0.01, 0.05)
    with pytest.raises(ValueError, match="expected 8"):
        op(torch.zeros(2, 7, dtype=torch.int16))
