"""Artifacts: write a folder atomically, with a manifest of what is in it.

``atomic_dir(out)`` yields a temporary folder beside ``out``; when the block
ends without error the folder is renamed to ``out`` (replacing an existing
one only when asked), otherwise it is deleted, so a failure never leaves a
half-written ``out``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"The output folder {out} already exists; choose another -o or pass --force to replace it."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, trash / "old")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(trash / "old", out)  # the previous OUT stays as it was
                shutil.rmtree(trash, ignore_errors=True)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("intq", "torch", "onnx", "onnxruntime", "apache-tvm", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def file_hashes(folder: Path, names) -> dict[str, str]:
    return {n: sha256(folder / n) for n in names}
