"""CIFAR-10 (Krizhevsky 2009) from the shared JPEG zips, decoded once and cached as ``.npy``.

The zips (``$INTQ_SHARED/data/cifar10/{test,train}.zip``, else
``../shared/data/cifar10/`` beside the repository) hold ``<class>/<n>.jpg``
files: 32x32 RGB JPEGs (a lossy copy of the original PNG/pickle release),
1,000 test and 5,000 train images per class.  Class names sorted
alphabetically give the standard CIFAR-10 label indices (``CLASSES``).

Order is deterministic and class-balanced: entries are sorted by their rank
within their class, then by class index (``airplane/0000, automobile/0000,
..., truck/0000, airplane/0001, ...``), so every prefix (``limit=n``) holds
each class ``n // 10`` or ``n // 10 + 1`` times.

Decoding the 50,000 train JPEGs takes seconds, so a full split is decoded
once and kept as two ``.npy`` files under the cache folder
(``$INTQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/intq``, else ``~/.cache/intq``),
named by the split and the zip's size and modification time (a changed zip
gets a fresh cache).  Files are written to a temporary name and renamed, so
a crash never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from intq.models.sst2 import SHARED_ENV, _default_shared

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("test", "train")
IMAGE_SHAPE = (32, 32, 3)
CACHE_ENV = "INTQ_CACHE_DIR"
MEAN = (0.4914, 0.4822, 0.4465)
"""Per-channel mean of the CIFAR-10 training images scaled to [0, 1] (the commonly quoted figures)."""
STD = (0.2470, 0.2435, 0.2616)
"""Per-channel standard deviation of the same."""


def cifar10_path(split: str, path: str | Path | None = None) -> Path:
    """The zip ``load_cifar10`` reads for ``split``: ``path`` if given, else the shared data folder's."""
    if split not in SPLITS:
        raise ValueError(f"Unknown CIFAR-10 split {split!r}; choose one of {SPLITS}.")
    if path is not None:
        return Path(path)
    shared = Path(os.environ[SHARED_ENV]) if os.environ.get(SHARED_ENV) else _default_shared()
    return shared / "data" / "cifar10" / f"{split}.zip"


def cache_dir() -> Path:
    """The folder decoded splits are cached in (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "intq"


def load_cifar10(
    split: str = "test",
    limit: int | None = None,
    path: str | Path | None = None,
    cache: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 32, 32, 3] (NHWC, RGB 0..255), labels int64 [N])`` of a CIFAR-10 split.

    ``limit`` keeps the first ``limit`` images of the class-balanced order.
    With ``cache`` the full split is decoded once and read back from the
    cache folder afterwards; a ``limit`` with no cache yet decodes only the
    images it needs (and writes no cache).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}.")
    file = cifar10_path(split, path)
    if not file.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 {split} zip {file} does not exist; pass path=..., or set {SHARED_ENV} to the shared "
            f"folder that holds data/cifar10/{split}.zip (the JPEG copy described in its data/README.md)."
        )
    if cache:
        images_npy, labels_npy = _cache_files(split, file)
        if images_npy.is_file() and labels_npy.is_file():
            images = np.load(images_npy, mmap_mode="r")
            labels = np.load(labels_npy)
            return np.array(images[:limit]), labels[:limit].copy()
        if limit is None:
            images, labels = _decode(file)
            _save_atomic(images_npy, images)
            _save_atomic(labels_npy, labels)
            return images, labels
    return _decode(file, limit)


def to_nchw(images: np.ndarray, normalize: bool = False) -> torch.Tensor:
    """uint8 NHWC images -> float32 NCHW tensor: raw 0..255, or ``(x / 255 - MEAN) / STD`` with ``normalize``."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Expected images [N, H, W, 3] (NHWC), got shape {images.shape}.")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if normalize:
        x = (x / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x.contiguous()


def _cache_files(split: str, file: Path) -> tuple[Path, Path]:
    stat = file.stat()
    where = hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:8]
    stem = f"cifar10-{split}-{stat.st_size}-{stat.st_mtime_ns}-{where}"
    folder = cache_dir()
    return folder / f"{stem}-images.npy", folder / f"{stem}-labels.npy"


def _save_atomic(target: Path, array: np.ndarray) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the cache is as readable as any file we write
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _entries(archive: zipfile.ZipFile, file: Path) -> list[tuple[str, int]]:
    """``(entry name, label)`` of every JPEG in the class-balanced order."""
    per_class: dict[int, list[str]] = {}
    for name in archive.namelist():
        if name.endswith("/"):
            continue
        folder, _, base = name.partition("/")
        if folder not in CLASSES or "/" in base or not base.lower().endswith(".jpg"):
            raise ValueError(
                f"{file}: unexpected entry {name!r}; expected '<class>/<n>.jpg' with a class in {CLASSES}."
            )
        per_class.setdefault(CLASSES.index(folder), []).append(name)
    ranked = [(rank, label, name) for label, names in per_class.items() for rank, name in enumerate(sorted(names))]
    return [(name, label) for _, label, name in sorted(ranked)]


def _decode(file: Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    with zipfile.ZipFile(file) as archive:
        entries = _entries(archive, file)[:limit]
        images = np.empty((len(entries), *IMAGE_SHAPE), dtype=np.uint8)
        for i, (name, _) in enumerate(entries):
            with Image.open(io.BytesIO(archive.read(name))) as image:
                pixels = np.asarray(image.convert("RGB"))
            if pixels.shape != IMAGE_SHAPE:
                raise ValueError(f"{file}: {name} is {pixels.shape[1]}x{pixels.shape[0]}, expected 32x32 RGB.")
            images[i] = pixels
    return images, np.array([label for _, label in entries], dtype=np.int64)
