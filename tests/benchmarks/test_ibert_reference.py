"""The I-BERT baseline (benchmarks/ibert_reference.py) against independent float math.

Each integer result is compared with float64 ``exp`` / ``erf`` / GELU /
``layer_norm`` under an error bound derived in the test from the paper's
polynomials and the floors the integer form adds; the polynomials' own
float error is measured here on a dense grid (I-BERT reports ``L_inf ~ 1.8e-2``
for i-GELU, which the grid reproduces).  So the benchmark's baseline is the
paper's method, not a strawman.
"""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "ibert_reference.py"
_SPEC = importlib.util.spec_from_file_location("ibert_reference", _PATH)
ib = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ib)

LN2 = math.log(2)
EXP_A, EXP_B, EXP_C = ib.EXP_COEFFS
ERF_A, ERF_B, ERF_C = ib.ERF_COEFFS


def _exp_poly_rel_error() -> tuple[float, float]:
    """(min, max) of ``L(p) / exp(p) - 1`` on a dense grid of ``[-ln2, 0]``."""
    p = np.linspace(-LN2, 0.0, 200_001)
    rel = (EXP_A * (p + EXP_B) ** 2 + EXP_C) / np.exp(p) - 1
    return float(rel.min()), float(rel.max())


def _gelu_poly_abs_error() -> float:
    """max ``|x (1 + L_erf(x / sqrt 2)) / 2 - GELU(x)|`` on a dense grid of ``[-8, 8]`` (float i-GELU)."""
    x = np.linspace(-8.0, 8.0, 320_001)
    u = np.abs(x) / math.sqrt(2)
    l_erf = np.sign(x) * (ERF_A * (np.minimum(u, -ERF_B) + ERF_B) ** 2 + ERF_C)
    exact = x * 0.5 * (1 + np.array([math.erf(v) for v in x / math.sqrt(2)]))
    return float(np.abs(x * 0.5 * (1 + l_erf) - exact).max())


EXP_REL_LO, EXP_REL_HI = _exp_poly_rel_error()
GELU_POLY_ERR = _gelu_poly_abs_error()


def test_polynomials_are_the_papers():
    # i-exp's polynomial is within 0.31 % of exp on its domain; i-GELU's float form within 1.82e-2 of GELU
    assert -3.2e-3 < EXP_REL_LO < 0 < EXP_REL_HI < 2.6e-3
    assert 0.017 < GELU_POLY_ERR < 0.0182


def test_i_sqrt_is_floor_sqrt():
    rng = random.Random(0)
    values = list(range(0, 1 << 14))
    values += [rng.randrange(1 << bits) for bits in range(1, 63) for _ in range(200)]
    roots = (1, 2, 3, 1 << 15, (1 << 30) + 1, (1 << 31) - 1)  # (2**31 - 1)**2 + 1 < 2**62, the domain's top
    values += [k * k + d for k in roots for d in (-1, 0, 1)]
    got = ib.i_sqrt(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [math.isqrt(v) for v in values]


def _exp_bound(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Derived bounds ``(lo, hi)`` on ``E - exp(q S)`` for i-exp's output ``E``.

    ``x = -z ln2' + p'`` with ``ln2' = floor(ln2/S) S in (ln2 - S, ln2]``, so
    ``2**-z = exp(-z ln2') * exp(-z (ln2 - ln2'))`` loses a factor in
    ``(exp(-z S), 1]``.  ``floor(b/S)`` lowers ``(p' + b)**2`` by at most
    ``2 b S``; ``floor(c/(aS**2))`` lowers the result by at most ``a S**2``;
    with ``exp(p') >= 1/2`` that is a relative ``-(4 a b S + 2 a S**2)``.  The
    shift by ``z`` truncates by less than one unit, ``a S**2``.
    """
    z = torch.div(-q, math.floor(LN2 / scale), rounding_mode="floor").double()
    exact = torch.exp(q.double() * scale)
    low_factor = (1 + EXP_REL_LO) * (1 - 4 * EXP_A * EXP_B * scale - 2 * EXP_A * scale**2) * torch.exp(-z * scale)
    unit = EXP_A * scale**2
    return exact * (low_factor - 1) - unit, exact * EXP_REL_HI


@pytest.mark.parametrize("scale", [1e-3, 0.004, 0.01, 0.05, 0.1])
def test_i_exp_within_derived_bound(scale):
    q = torch.arange(-int(16 / scale), 1, dtype=torch.int64)
    e, scale_e = ib.i_exp(q, scale)
    assert scale_e == pytest.approx(EXP_A * scale**2)
    err = e.double() * scale_e - torch.exp(q.double() * scale)
    lo, hi = _exp_bound(q, scale)
    assert bool((err >= lo - 1e-12).all()) and bool((err <= hi + 1e-12).all())
    if scale <= 1e-3:  # fine scale: within 1 % of exp for x >= -4
        near = q.double() * scale >= -4
        rel = err[near] / torch.exp(q[near].double() * scale)
        assert float(rel.abs().max()) < 0.01


def test_i_exp_is_monotone():
    for scale in (1e-3, 0.03, 0.1):
        e, _ = ib.i_exp(torch.arange(-int(12 / scale), 1, dtype=torch.int64), scale)
        assert bool((e[1:] >= e[:-1]).all())


@pytest.mark.parametrize("scale", [1e-3, 0.01])
@pytest.mark.parametrize("length", [16, 197])
def test_i_softmax_within_derived_bound(scale, length):
    gen = torch.Generator().manual_seed(1)
    logits = 3.0 * torch.randn(64, length, generator=gen, dtype=torch.float64)
    q = torch.round(logits / scale).to(torch.int64)
    y = ib.i_softmax(q, scale)
    p = torch.softmax(q.double() * scale, dim=-1)
    # |E_j - w_j| <= A_j (w_j = exp(x_j - max), the row's exact exps, W = sum w >= 1), so
    # |E_i / sum E - w_i / W| <= (A_i + p_i sum A) / (W - sum A); then rounding to 1/128 (1/256), and the clamp
    # at 127 (up to 1/128 more)
    t = q - q.amax(dim=-1, keepdim=True)
    lo, hi = _exp_bound(t, scale)
    a = torch.maximum(-lo, hi)
    w = torch.exp(t.double() * scale)
    w_sum, a_sum = w.sum(-1, keepdim=True), a.sum(-1, keepdim=True)
    assert bool((a_sum < w_sum).all())
    bound = (a + p * a_sum) / (w_sum - a_sum) + torch.where(y == 127, 1 / 128, 1 / 256)
    err = (y.double() / 128 - p).abs()
    assert bool((err <= bound + 1e-12).all())
    if scale <= 1e-3:
        assert float(err.max()) < 0.01
    total = y.sum(-1)
    assert bool((total - 128).abs().le(length // 2 + 1).all())


def test_i_softmax_floor_rounding_truncates():
    gen = torch.Generator().manual_seed(2)
    q = torch.round(3.0 * torch.randn(32, 128, generator=gen, dtype=torch.float64) / 0.01).to(torch.int64)
    nearest, floor = ib.i_softmax(q, 0.01), ib.i_softmax(q, 0.01, rounding="floor")
    assert bool(((nearest - floor) >= 0).all()) and bool(((nearest - floor) <= 1).all())


def _gelu_bound(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Derived bound on ``|G - GELU(x)|`` for i-GELU's wide output ``G`` (before any requantize).

    With ``S' = S / sqrt 2`` the integer erf differs from its float polynomial
    by at most ``|a| (2 |b| S' + S'**2)`` (``floor(b/S')``), ``|a| S'**2``
    (``floor(c/(aS'**2))``) and ``4 |a| S'**2`` (the clip at ``floor(-b/S')``);
    ``floor(1/S_erf)`` adds ``|a| S'**2``; GELU multiplies it by ``|x|/2``.
    """
    s1 = scale / math.sqrt(2)
    erf_err = abs(ERF_A) * (2 * abs(ERF_B) * s1 + 7 * s1**2)
    return GELU_POLY_ERR + x.abs() / 2 * erf_err


@pytest.mark.parametrize("scale", [1e-3, 0.02, 0.05, 0.1])
def test_i_gelu_within_derived_bound(scale):
    q = torch.arange(-int(8 / scale), int(8 / scale) + 1, dtype=torch.int64)
    g, scale_g = ib.i_gelu(q, scale)
    x = q.double() * scale
    err = (g.double() * scale_g - F.gelu(x)).abs()
    assert bool((err <= _gelu_bound(x, scale) + 1e-12).all())
    if scale <= 1e-3:
        assert float(err.max()) < 0.0185


@pytest.mark.parametrize("scale_in,scale_out", [(0.05, 0.05), (0.1, 0.1), (0.03, 0.02)])
def test_i_gelu_int8_within_bound(scale_in, scale_out):
    q = torch.arange(-128, 128, dtype=torch.int64)
    y = ib.i_gelu_int8(q, scale_in, scale_out)
    assert y.dtype == torch.int8
    x = q.double() * scale_in
    ref = F.gelu(x).clamp(-128 * scale_out, 127 * scale_out)
    err = (y.double() * scale_out - ref).abs()
    # requantize: rounding (S_out / 2) plus the 24-bit multiplier (relative 2**-23 of at most 128 steps)
    bound = _gelu_bound(x, scale_in) + scale_out * (0.5 + 128 * 2.0**-23)
    assert bool((err <= bound + 1e-12).all())


def _ln_rows(rows: int, channels: int, lsb_std: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = lsb_std * torch.randn(rows, channels, generator=gen, dtype=torch.float64)
    x[:, :3] *= 8  # a few outlier channels
    x += 0.3 * lsb_std * torch.randn(1, channels, generator=gen, dtype=torch.float64)
    return torch.round(x).clamp(-(1 << 15), (1 << 15) - 1).to(torch.int64)


def _ln_normalized_bound(q: torch.Tensor, n_ref: torch.Tensor) -> torch.Tensor:
    """Derived bound on ``|n sqrt(C)/2**K - n_ref|``, ``n_ref`` the float normalized value (eps = 0).

    In input LSBs, ``V = sum((q - mu)**2)``.  The rounded mean is off by
    ``d``, ``|d| <= 1/2``: every ``y`` moves by ``d`` (``sqrt(C) / (2 std)``)
    and the sum of squares grows by ``C d**2`` (relative ``C / (8 V)`` on the
    root).  ``std = floor(sqrt(.))``: relative ``1 / (sqrt(V) - 1)``.
    ``2**K // std`` floors: ``sqrt(C) |y| / 2**K <= sqrt(C) sqrt(V + C/4) / 2**K``.
    """
    channels = q.shape[-1]
    qd = q.double()
    v = ((qd - qd.mean(-1, keepdim=True)) ** 2).sum(-1, keepdim=True)
    root = v.sqrt()
    rel = 1 / (root - 1) + channels / (8 * v)
    return (
        n_ref.abs() * rel
        + math.sqrt(channels) / (2 * (root - 1))
        + math.sqrt(channels) * (v + channels / 4).sqrt() / 2.0**ib.LN_FACTOR_BITS
    )


@pytest.mark.parametrize("channels", [384, 768])
@pytest.mark.parametrize("lsb_std", [20.0, 1000.0, 4000.0])
def test_i_layernorm_normalized_within_derived_bound(channels, lsb_std):
    q = _ln_rows(64, channels, lsb_std, seed=channels)
    n, scale_n = ib.i_layernorm_normalized(q)
    assert bool((n.abs() <= 1 << ib.LN_FACTOR_BITS).all())
    n_ref = F.layer_norm(q.double(), (channels,), eps=0.0)
    err = (n.double() * scale_n - n_ref).abs()
    assert bool((err <= _ln_normalized_bound(q, n_ref) + 1e-9).all())


@pytest.mark.parametrize("channels", [384, 768])
def test_i_layernorm_int8_within_bound(channels):
    q = _ln_rows(128, channels, 1500.0, seed=7)
    rng = np.random.default_rng(channels)
    gamma = 1 + 0.3 * rng.standard_normal(channels)
    gamma[:5] = [0.0, -0.7, 1e-4, 3.0, -1e-3]
    beta = 0.2 * rng.standard_normal(channels)
    scale_in = 0.002
    xf = q.double() * scale_in
    n_ref = F.layer_norm(xf, (channels,), eps=0.0)
    ref_real = n_ref * torch.from_numpy(gamma) + torch.from_numpy(beta)
    scale_out = float(ref_real.abs().max()) / 127
    y = ib.i_layernorm(q, gamma, beta, scale_out)
    assert y.dtype == torch.int8
    g = torch.from_numpy(np.abs(gamma)) / scale_out
    # rounding (1/2 LSB) + gamma times the normalized error + the dyadic multiplier (relative 2**-23, or the
    # absolute 2**-(s+1) where the bias cap shortens it; s >= 40 here) and the bias rounding
    bound = 0.5 + g * _ln_normalized_bound(q, n_ref) + (ref_real.abs() / scale_out) * 2.0**-23 + 2.0**-8
    err = (y.double() - ref_real / scale_out).abs()
    assert bool((err <= bound).all())
    assert float(err.max()) < 0.75
