"""The SST-2 sentiment probe on all-MiniLM-L6-v2 sentence embeddings.

A logistic regression on standardized mean-pooled embeddings::

    z = ((e - mean) / std) . weight + bias,     label = 1 (positive) if z > 0 else 0

``e`` is ``intq.models.minilm.encode``'s output (mean pooling, not
normalized).  The parameters ship in ``data/minilm_sst2_probe.npz``, written
by ``benchmarks/train_sst2_probe.py``, which also records how it was trained
(seed, number of phrases, L2 strength, fp32 dev accuracy) in the same file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PROBE_PATH = Path(__file__).resolve().parent / "data" / "minilm_sst2_probe.npz"
_ARRAYS = ("weight", "bias", "mean", "std")


@dataclass(frozen=True)
class Probe:
    """Logistic-regression parameters; ``info`` holds how they were trained (scalars and strings)."""

    weight: np.ndarray  # [H]
    bias: float
    mean: np.ndarray  # [H]
    std: np.ndarray  # [H], > 0
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes = {name: np.shape(getattr(self, name)) for name in ("weight", "mean", "std")}
        if len({*shapes.values()}) != 1 or len(shapes["weight"]) != 1:
            raise ValueError(f"Probe weight, mean and std must be vectors of one length, got shapes {shapes}.")
        if not np.all(np.asarray(self.std) > 0):
            raise ValueError("Probe std must be positive everywhere (it divides the features).")

    @property
    def dim(self) -> int:
        return int(np.shape(self.weight)[0])

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """The positive-class logit of each row of ``embeddings [n, H]`` -> ``[n]`` (float64)."""
        e = np.asarray(embeddings, dtype=np.float64)
        if e.ndim != 2 or e.shape[1] != self.dim:
            raise ValueError(f"The probe takes embeddings [n, {self.dim}], got shape {e.shape}.")
        return ((e - self.mean) / self.std) @ self.weight + self.bias


def save_probe(probe: Probe, path: str | Path = PROBE_PATH) -> Path:
    """Write ``probe`` as an ``.npz`` (arrays plus one ``info_<key>`` entry per info item)."""
    path = Path(path)
    arrays = {
        "weight": np.asarray(probe.weight, dtype=np.float32),
        "bias": np.asarray(probe.bias, dtype=np.float32),
        "mean": np.asarray(probe.mean, dtype=np.float32),
        "std": np.asarray(probe.std, dtype=np.float32),
    }
    arrays.update({f"info_{key}": np.asarray(value) for key, value in probe.info.items()})
    np.savez(path, **arrays)
    return path


def load_probe(path: str | Path = PROBE_PATH) -> Probe:
    """The shipped SST-2 probe (or the one at ``path``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Probe file {path} does not exist; train it with `python benchmarks/train_sst2_probe.py`."
        )
    with np.load(path, allow_pickle=False) as data:
        missing = [name for name in _ARRAYS if name not in data]
        if missing:
            raise ValueError(f"{path} is not a probe file: it lacks {missing}.")
        info = {key.removeprefix("info_"): data[key].item() for key in data.files if key.startswith("info_")}
        return Probe(
            weight=data["weight"].astype(np.float64),
            bias=float(data["bias"]),
            mean=data["mean"].astype(np.float64),
            std=data["std"].astype(np.float64),
            info=info,
        )


def probe_predict(embeddings: np.ndarray, probe: Probe | None = None) -> np.ndarray:
    """SST-2 labels (int64, 1 = positive) for ``embeddings [n, H]``; ``probe`` defaults to the shipped one."""
    probe = load_probe() if probe is None else probe
    return (probe.logits(embeddings) > 0).astype(np.int64)
