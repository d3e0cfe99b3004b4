from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from intq.models.cifar10 import CLASSES, cifar10_path, load_cifar10, to_nchw


def test_test_split_from_the_shared_folder(tmp_path, monkeypatch):
    # CI runs with ../shared beside the checkout: a missing zip is a failure, not a skip
    assert cifar10_path("test").is_file(), f"CIFAR-10 test zip not found at {cifar10_path('test')}"
    monkeypatch.setenv("INTQ_CACHE_DIR", str(tmp_path))
    images, labels = load_cifar10("test", limit=1000)
    assert images.shape == (1000, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert labels[:20].tolist() == list(range(10)) * 2  # class-balanced order
    assert np.bincount(labels).tolist() == [100] * 10
    with zipfile.ZipFile(cifar10_path("test")) as archive:
        frog = np.asarray(Image.open(io.BytesIO(archive.read("frog/0003.jpg"))).convert("RGB"))
    np.testing.assert_array_equal(images[3 * 10 + CLASSES.index("frog")], frog)
    assert not list(tmp_path.iterdir()), "a limited load with no cache must not write one"


def _fake_zip(path, per_class: int) -> dict[str, tuple[int, int, int]]:
    """A zip of flat-colour 32x32 JPEGs, ``per_class`` a class, written in a scrambled order."""
    colours = {}
    names = [f"{c}/{n:04d}.jpg" for n in range(per_class) for c in CLASSES]
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for name in rng.permutation(names):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), colour).save(buf, "JPEG", quality=100)
            archive.writestr(str(name), buf.getvalue())
            colours[str(name)] = colour
    return colours


def test_order_decoding_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTQ_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "train.zip"
    colours = _fake_zip(path, per_class=3)
    images, labels = load_cifar10("train", path=path)
    assert labels.tolist() == list(range(10)) * 3
    for i, label in enumerate(labels):
        want = colours[f"{CLASSES[label]}/{i // 10:04d}.jpg"]
        # JPEG at quality 100 on a flat colour is off by at most a few levels after YCbCr rounding
        assert np.abs(images[i].astype(int) - np.array(want)).max() <= 3, (i, images[i, 0, 0], want)
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 2 and all(name.startswith("cifar10-train-") for name in cached), cached

    # the cache answers later calls (a corrupted cache shows it is read) and serves limits
    np.save(tmp_path / "cache" / cached[1], np.full(30, 7, dtype=np.int64))
    again, again_labels = load_cifar10("train", path=path)
    np.testing.assert_array_equal(again, images)
    assert again_labels.tolist() == [7] * 30
    assert load_cifar10("train", limit=4, path=path)[1].tolist() == [7] * 4

    # a zip with another modification time gets a fresh cache
    os.utime(path, ns=(0, 10**18))
    assert load_cifar10("train", path=path)[1].tolist() == list(range(10)) * 3
    assert len(list((tmp_path / "cache").iterdir())) == 4
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix != ".npy"], "temporary files left behind"

    # no cache: decode only what is asked
    images4, labels4 = load_cifar10("train", limit=4, path=path, cache=False)
    np.testing.assert_array_equal(images4, images[:4])
    assert labels4.tolist() == [0, 1, 2, 3]


def test_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("INTQ_SHARED", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"cifar10/train\.zip does not exist.*set INTQ_SHARED"):
        load_cifar10("train")
    with pytest.raises(ValueError, match="Unknown CIFAR-10 split 'val'"):
        load_cifar10("val")
    with pytest.raises(ValueError, match="limit must be"):
        load_cifar10("test", limit=-1)
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("cats/0.jpg", b"")
    with pytest.raises(ValueError, match=r"unexpected entry 'cats/0\.jpg'"):
        load_cifar10("test", path=bad, cache=False)


def test_to_nchw():
    images = np.arange(2 * 32 * 32 * 3, dtype=np.int64).reshape(2, 32, 32, 3).astype(np.uint8)
    raw = to_nchw(images)
    assert raw.shape == (2, 3, 32, 32) and raw.dtype == torch.float32
    assert raw[1, 2, 5, 7] == float(images[1, 5, 7, 2])
    normalized = to_nchw(images, normalize=True)
    assert torch.allclose(normalized[1, 0, 5, 7], (raw[1, 0, 5, 7] / 255 - 0.4914) / 0.2470)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        to_nchw(images.transpose(0, 3, 1, 2))
