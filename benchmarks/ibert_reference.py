"""I-BERT's integer-only nonlinearities, emulated exactly in int64 (a baseline for ``int_ops_error.py``).

Written from the math of Kim et al. 2021, "I-BERT: Integer-only BERT
Quantization" (ICML), Section 3 and Algorithms 1-4; no code was taken from
any implementation.  Integer tensors are torch int64; the float constants
(``floor(b / S)`` and the like) are computed once from the input scale, as
a deployment would precompute them.  ``floor`` is ``math.floor`` of the
float expression; ``>>`` is the arithmetic (floor) shift.

I-POLY (Algorithm 1): with ``q * S = x``, ``q_b = floor(b / S)``,
``q_c = floor(c / (a S**2))``, ``S_out = a S**2``::

    q_out = (q + q_b)**2 + q_c                 q_out * S_out ~ a (x + b)**2 + c

i-exp (Algorithm 3), ``q <= 0``: ``a, b, c = 0.3585, 1.353, 0.344`` (the
polynomial of ``exp`` on ``p in (-ln2, 0]``) and ``q_ln2 = floor(ln2 / S)``::

    z     = (-q) // q_ln2                      x = -z ln2 + p
    q_p   = q + z * q_ln2                      q_p in (-q_ln2, 0]
    q_L   = I-POLY(q_p)                        (q_p + q_b > 0 since q_b >= q_ln2)
    q_out = q_L >> z                           scale S_L = a S**2

i-softmax: ``e = i-exp(q - max(q))`` per row, ``sum = sum(e)``; the output
is 8-bit: ``y = clamp(floor((2**8 e + sum) / (2 sum)), 0, 127)``, i.e.
``128 e / sum`` rounded half up by one integer division, at the fixed
scale ``1/128`` -- the same output grid as intq's Shiftmax, so that a
comparison measures the exp and not the output format.  (``rounding="floor"``
truncates instead: ``floor(128 e / sum)``.)

i-erf and i-GELU (Algorithm 2): ``a, b, c = -0.2888, -1.769, 1``; for the
erf argument ``x / sqrt(2)`` the scale is ``S' = S / sqrt(2)`` (same ``q``)::

    q_erf = sgn(q) * I-POLY(min(|q|, floor(-b / S')))     scale S_erf = a S'**2 (< 0)
    q_1   = floor(1 / S_erf)
    q_out = q * (q_erf + q_1)                             scale S * S_erf / 2

``q_out`` is then requantized to int8 at ``S_out`` by a dyadic multiplier
(``requantize``; 24-bit ``m``, round half up), as every I-BERT layer output is.

I-SQRT (Algorithm 4, Newton): ``x_0 = 2**ceil(bits(n)/2)``, ``x_{i+1} =
(x_i + n // x_i) // 2`` until ``x_{i+1} >= x_i``; returns ``floor(sqrt(n))``
(``0`` for ``n = 0``).

I-LayerNorm, over the last axis of ``C`` channels (integer mean and
variance; the paper's formula has no ``eps`` and neither does this)::

    mean = floor((2 sum(q) + C) / (2 C))        sum(q) / C rounded half up
    y    = q - mean
    std  = I-SQRT(sum(y * y))                   ~ sqrt(C) * sigma, in input LSBs
    n    = y * (2**K // std)                    |n| <= 2**K; scale sqrt(C) / 2**K

``K = 31`` (derived, not stated in the paper: I-BERT computes in INT32, and
``|y| <= std`` makes ``|n| <= 2**31``).  ``gamma`` and ``beta`` are folded into
a per-channel dyadic requantize of ``n`` to int8 at ``S_out``:
``m_c / 2**s_c ~ sqrt(C) gamma_c / (2**K S_out)``,
``bias_c = round(beta_c / S_out * 2**s_c)``.  The wider intermediates
(``sum(y*y)``, the 24-bit multipliers) use int64, as intq does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

EXP_COEFFS = (0.3585, 1.353, 0.344)  # a (p + b)**2 + c ~ exp(p), p in (-ln2, 0]
ERF_COEFFS = (-0.2888, -1.769, 1.0)  # a (min(|x|, -b) + b)**2 + c ~ erf(|x|)
LN_FACTOR_BITS = 31  # K: the normalized value fits INT32
MULTIPLIER_BITS = 24
MAX_SHIFT = 62
BIAS_BITS = 59


def _int64(q) -> torch.Tensor:
    return torch.as_tensor(q).to(torch.int64)


def i_poly(q: torch.Tensor, scale: float, a: float, b: float, c: float) -> tuple[torch.Tensor, float]:
    """Algorithm 1: ``(q_out, S_out)`` with ``q_out * S_out ~ a (q S + b)**2 + c``."""
    q_b = math.floor(b / scale)
    q_c = math.floor(c / (a * scale * scale))
    q = _int64(q)
    return (q + q_b) * (q + q_b) + q_c, a * scale * scale


def i_exp(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """Algorithm 3 on ``q <= 0``: ``(q_out, S_L)`` with ``q_out * S_L ~ exp(q * scale)``; ``q_out >= 0``."""
    q_ln2 = math.floor(math.log(2) / scale)
    if q_ln2 < 1:
        raise ValueError(f"i-exp needs scale <= ln 2 (floor(ln2 / S) >= 1), got scale {scale}")
    q = _int64(q)
    if bool((q > 0).any()):
        raise ValueError("i-exp takes q <= 0 (subtract the row maximum first)")
    z = torch.div(-q, q_ln2, rounding_mode="floor")
    q_p = q + z * q_ln2
    q_l, scale_l = i_poly(q_p, scale, *EXP_COEFFS)
    # q_l < 2**62 for every scale >= 2**-20; a shift by >= 62 gives 0 either way
    return q_l >> z.clamp(max=MAX_SHIFT), scale_l


def i_softmax(q: torch.Tensor, scale: float, rounding: str = "nearest") -> torch.Tensor:
    """i-softmax over the last axis: int64 probabilities in ``[0, 127]`` at scale ``1/128``."""
    q = _int64(q)
    e, _ = i_exp(q - q.amax(dim=-1, keepdim=True), scale)
    total = e.sum(dim=-1, keepdim=True)
    if rounding == "nearest":
        y = torch.div(256 * e + total, 2 * total, rounding_mode="floor")
    elif rounding == "floor":
        y = torch.div(128 * e, total, rounding_mode="floor")
    else:
        raise ValueError(f"rounding must be 'nearest' or 'floor', got {rounding!r}")
    return y.clamp(0, 127)


def i_erf(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """Algorithm 2, I-ERF: ``(q_out, S_out)`` with ``q_out * S_out ~ erf(q * scale)``; ``S_out < 0``."""
    a, b, c = ERF_COEFFS
    q = _int64(q)
    clipped = q.abs().clamp(max=math.floor(-b / scale))
    q_l, scale_l = i_poly(clipped, scale, a, b, c)
    return torch.sign(q) * q_l, scale_l


def i_gelu(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """Algorithm 2, I-GELU: ``(q_out, S_out)`` with ``q_out * S_out ~ GELU(q * scale)`` (int64, wide)."""
    q = _int64(q)
    q_erf, scale_erf = i_erf(q, scale / math.sqrt(2))
    q_one = math.floor(1 / scale_erf)
    return q * (q_erf + q_one), scale * scale_erf / 2


def dyadic(ratio: float, bits: int = MULTIPLIER_BITS) -> tuple[int, int]:
    """``(m, s)`` with ``m / 2**s ~ ratio``, ``|m| < 2**bits``, ``1 <= s <= 62``."""
    if ratio == 0:
        return 0, 1
    exponent = math.frexp(abs(ratio))[1]
    s = min(max(bits - exponent, 1), MAX_SHIFT)
    return round(ratio * 2.0**s), s


def requantize(q: torch.Tensor, ratio: float, qmin: int = -128, qmax: int = 127) -> torch.Tensor:
    """``clamp(round_half_up(q * ratio), qmin, qmax)`` through a 24-bit dyadic multiplier (int64 in and out)."""
    m, s = dyadic(ratio)
    return ((_int64(q) * m + (1 << (s - 1))) >> s).clamp(qmin, qmax)


def i_gelu_int8(q: torch.Tensor, scale_in: float, scale_out: float) -> torch.Tensor:
    """I-GELU of int8 ``q`` at ``scale_in``, requantized to int8 at ``scale_out``."""
    q_out, scale = i_gelu(q, scale_in)
    return requantize(q_out, scale / scale_out).to(torch.int8)


def i_sqrt(n: torch.Tensor) -> torch.Tensor:
    """Algorithm 4 elementwise on int64 ``0 <= n < 2**62``: ``floor(sqrt(n))``."""
    n = _int64(n)
    if bool((n < 0).any()) or bool((n >= 1 << 62).any()):
        raise ValueError("i_sqrt takes 0 <= n < 2**62")
    bits = torch.zeros_like(n)
    for k in range(62):  # bits(n): the number of k with n >= 2**k
        bits += (n >= (1 << k)).to(torch.int64)
    x = torch.ones_like(n) << torch.div(bits + 1, 2, rounding_mode="floor")  # 2**ceil(bits/2) > sqrt(n)
    active = n > 0
    while bool(active.any()):
        x_next = torch.div(x + torch.div(n, x, rounding_mode="floor"), 2, rounding_mode="floor")
        active &= x_next < x
        x = torch.where(active, x_next, x)
    return torch.where(n > 0, x, torch.zeros_like(x))


def i_layernorm_normalized(q: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Integer mean, variance and I-SQRT over the last axis: ``(n, sqrt(C) / 2**K)``, ``n`` int64."""
    q = _int64(q)
    channels = q.shape[-1]
    total = q.sum(dim=-1, keepdim=True)
    mean = torch.div(2 * total + channels, 2 * channels, rounding_mode="floor")
    y = q - mean
    std = i_sqrt((y * y).sum(dim=-1, keepdim=True)).clamp(min=1)  # a constant row has y = 0 anyway
    factor = torch.div(torch.full_like(std, 1 << LN_FACTOR_BITS), std, rounding_mode="floor")
    return y * factor, math.sqrt(channels) / 2.0**LN_FACTOR_BITS


def i_layernorm(q: torch.Tensor, gamma, beta, scale_out: float) -> torch.Tensor:
    """I-LayerNorm of integer ``q`` (int16 / int8 range, any input scale) to int8 at ``scale_out``.

    The input scale cancels in the normalization (and there is no ``eps``),
    so it is not an argument.
    """
    gamma = np.asarray(gamma, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    n, scale_n = i_layernorm_normalized(q)
    m = np.zeros(gamma.shape, dtype=np.int64)
    s = np.zeros(gamma.shape, dtype=np.int64)
    bias = np.zeros(gamma.shape, dtype=np.int64)
    for c in range(gamma.shape[0]):
        ratio = float(gamma[c]) * scale_n / scale_out
        beta_out = float(beta[c]) / scale_out
        s_c = min(dyadic(ratio)[1], BIAS_BITS - max(math.frexp(abs(beta_out))[1], 0))  # keep |bias| <= 2**59
        if s_c < 1:
            raise ValueError(f"channel {c}: beta / scale_out = {beta_out:.4g} is too large for int64")
        m[c], s[c] = round(ratio * 2.0**s_c), s_c
        bias[c] = round(beta_out * 2.0**s_c)
    m_t, s_t, bias_t = torch.from_numpy(m), torch.from_numpy(s), torch.from_numpy(bias)
    acc = n * m_t + bias_t + (torch.ones_like(s_t) << (s_t - 1))
    return (acc >> s_t).clamp(-128, 127).to(torch.int8)
