"""Range observers: a histogram of magnitudes per observed tensor.

Quantization is symmetric, so only ``|x|`` matters.  Each observer keeps a
``BINS``-bin histogram of ``|x|`` over ``[0, top]``; when a batch exceeds
``top`` the histogram is re-binned onto a doubled range (counts merged
pairwise, so nothing is lost but resolution).  From it:

- ``minmax``: the largest magnitude seen (exact, kept apart from the bins);
- ``percentile p``: the smallest bin edge below which ``p`` % of values lie;
- ``mse``: the clip ``c`` minimizing, over the histogram,
  ``sum_i n_i * err(v_i, c)`` with ``err = (v - c)^2`` for ``v > c``
  (clipping) and ``(c / qmax)^2 / 12`` otherwise (uniform rounding noise).
"""

from __future__ import annotations

import numpy as np
import torch

BINS = 2048
#: the clip of a value that is 0 on every calibration sample (a dead ReLU, an all-zero input channel): any
#: scale represents 0 exactly, and 1 keeps the dyadic ratios into and out of it in range for activations of
#: the usual size (a tiny clip would make the producer's requantize ratio overflow 2**23)
DEAD_CLIP = 1.0


class MagnitudeObserver:
    def __init__(self):
        self.hist = np.zeros(BINS, dtype=np.float64)
        self.top = 0.0
        self.amax = 0.0
        self.count = 0
        self.nonfinite = 0
        self.channel_amax: np.ndarray | None = None  # max |x| per index of the last axis

    def observe(self, x: torch.Tensor) -> None:
        if x.dim() >= 1 and x.numel():
            per_channel = x.detach().abs().reshape(-1, x.shape[-1]).to(torch.float32)
            per_channel = torch.where(torch.isfinite(per_channel), per_channel, 0).amax(dim=0).double().numpy()
            if self.channel_amax is None or self.channel_amax.shape != per_channel.shape:
                self.channel_amax = per_channel if self.channel_amax is None else None
            else:
                self.channel_amax = np.maximum(self.channel_amax, per_channel)
        mag = x.detach().abs().reshape(-1).to(torch.float32)
        finite = torch.isfinite(mag)
        if not bool(finite.all()):
            self.nonfinite += int((~finite).sum())
            mag = mag[finite]
        if mag.numel() == 0:
            return
        batch_max = float(mag.max())
        self.amax = max(self.amax, batch_max)
        self.count += mag.numel()
        if batch_max > self.top:
            new_top = batch_max if self.top == 0.0 else self.top
            while new_top < batch_max:
                new_top *= 2.0
                self.hist = np.concatenate([self.hist.reshape(-1, 2).sum(axis=1), np.zeros(BINS // 2)])
            self.top = new_top
        if self.top == 0.0:
            self.hist[0] += mag.numel()
            return
        self.hist += torch.histc(mag, bins=BINS, min=0.0, max=self.top).double().numpy()

    def clip(self, method: str, qmax: int, percentile: float = 99.99) -> float:
        """The clipping magnitude chosen by ``method`` (always > 0; ``DEAD_CLIP`` for a value never nonzero)."""
        if self.amax == 0.0:
            return DEAD_CLIP
        if method == "minmax":
            return self.amax
        edges = np.linspace(0.0, self.top, BINS + 1)[1:]
        if method == "percentile":
            cdf = np.cumsum(self.hist) / max(self.hist.sum(), 1.0)
            idx = int(np.searchsorted(cdf, percentile / 100.0))
            return float(min(edges[min(idx, BINS - 1)], self.amax))
        if method == "mse":
            centers = edges - self.top / BINS / 2
            best, best_err = self.amax, None
            for c in np.linspace(self.amax / 64, self.amax, 256):
                clipped = centers > c
                err = (self.hist[clipped] * (centers[clipped] - c) ** 2).sum()
                err += self.hist[~clipped].sum() * (c / qmax) ** 2 / 12.0
                if best_err is None or err < best_err:
                    best, best_err = float(c), err
            return best
        raise ValueError(f"unknown calibration method {method!r}")
