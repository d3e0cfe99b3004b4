"""SST-2 (GLUE) sentiment data: the dev split ships with intq; train is read from the shared data folder.

Files are ``text<TAB>label`` with a header row; label 1 is positive, 0
negative.  The text is lowercased, tokenized by spaces as released
("it 's a charming ... journey ."); trailing whitespace is stripped.  See
``data/SOURCES.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
SHARED_ENV = "INTQ_SHARED"
"""Environment variable naming the shared folder (the one holding ``data/sst2/train.tsv``)."""

SPLITS = ("dev", "train")


def _default_shared() -> Path:
    # models/ sits at the repository root; the shared folder is the repository's sibling.
    return Path(__file__).resolve().parents[2] / "shared"


def sst2_path(split: str, path: str | Path | None = None) -> Path:
    """Where the ``split`` file is read from (see ``load_sst2``)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown SST-2 split {split!r}; choose one of {SPLITS}.")
    if path is not None:
        return Path(path)
    if split == "dev":
        return DATA_DIR / "sst2_dev.tsv"
    shared = Path(os.environ[SHARED_ENV]) if os.environ.get(SHARED_ENV) else _default_shared()
    return shared / "data" / "sst2" / "train.tsv"


def load_sst2(split: str = "dev", path: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """``(sentences, labels int64 [n])`` of an SST-2 split, in file order.

    ``dev`` (872 sentences) ships with intq.  ``train`` (67,349 phrases) is
    read from ``path`` if given, else ``$INTQ_SHARED/data/sst2/train.tsv``,
    else ``../shared/data/sst2/train.tsv`` relative to the repository.
    """
    file = sst2_path(split, path)
    if not file.is_file():
        hint = (
            f"pass path=..., or set {SHARED_ENV} to the shared folder that holds data/sst2/train.tsv"
            if split == "train"
            else "pass path=..."
        )
        raise FileNotFoundError(f"SST-2 {split} file {file} does not exist; {hint}.")
    sentences: list[str] = []
    labels: list[int] = []
    with file.open(encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header[-1:] != ["label"]:
            raise ValueError(f"{file}: expected a header row ending in 'label', got {header!r}.")
        for line_no, line in enumerate(f, start=2):
            if not line.strip():
                continue
            text, sep, label = line.rstrip("\r\n").rpartition("\t")
            if not sep or label not in ("0", "1"):
                raise ValueError(f"{file}, line {line_no}: expected 'text<TAB>0|1', got {line.rstrip()!r}.")
            sentences.append(text.strip())
            labels.append(int(label))
    return sentences, np.asarray(labels, dtype=np.int64)


CALIB_PATH = Path(__file__).parent / "data" / "sst2_calib.tsv"


def load_calibration_sentences(n: int = 256) -> list[str]:
    """``n`` (at most 512) SST-2 train phrases shipped for calibration.

    They are the last 512 of ``numpy.random.default_rng(0).permutation(67349)``
    over SST-2 train: disjoint from the probe's 8,000 training phrases (the
    first 8,000 of the same permutation) and from dev.
    """
    sentences, _ = load_sst2("dev", path=CALIB_PATH)
    if not 1 <= n <= len(sentences):
        raise ValueError(f"n={n}: the shipped calibration slice holds 1 to {len(sentences)} phrases.")
    return sentences[:n]
