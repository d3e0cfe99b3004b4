"""``intq.load(OUT)``: run a compiled artifact on numpy arrays.

The artifact folder holds ``manifest.json`` and the TVM library named there;
the returned callable takes the original model's inputs (float images, int64
token ids: positionally or by name) and returns its outputs as numpy arrays,
the same values onnxruntime gives on ``model.int.onnx``.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np


class ArtifactError(ValueError):
    pass


class CompiledModel:
    def __init__(self, folder: Path, manifest: dict, library: Path):
        import tvm
        from tvm import relax

        self.folder = folder
        self.manifest = manifest
        self.input_names = [i["name"] for i in manifest["inputs"]]
        self.output_names = [o["name"] for o in manifest["outputs"]]
        self._dtypes = {i["name"]: _numpy_dtype(i["dtype"]) for i in manifest["inputs"]}
        kind = ((manifest.get("target") or {}).get("tvm_target") or {}).get("kind", "llvm")
        self._device = tvm.cpu(0) if kind in ("llvm", "c") else tvm.device(kind, 0)
        self._vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), self._device)
        self._tvm = tvm

    def __call__(self, *args, **kwargs):
        if args and kwargs:
            raise TypeError("pass the inputs positionally or by name, not both")
        if args:
            if len(args) != len(self.input_names):
                raise TypeError(f"the model takes {len(self.input_names)} input(s) {self.input_names}, got {len(args)}")
            kwargs = dict(zip(self.input_names, args, strict=True))
        missing = [n for n in self.input_names if n not in kwargs]
        if missing:
            raise TypeError(f"missing input(s) {missing}; the model takes {self.input_names}")
        tensors = [
            self._tvm.runtime.tensor(np.ascontiguousarray(np.asarray(kwargs[n]), dtype=self._dtypes[n]), self._device)
            for n in self.input_names
        ]
        out = self._vm["main"](*tensors)
        flat = _flatten(out)
        return flat[0] if len(flat) == 1 else tuple(flat)


_ONNX_NAMES = {"float": "float32", "double": "float64", "float16": "float16"}


def _numpy_dtype(onnx_name: str) -> np.dtype:
    """numpy dtype of an ONNX element type name as the manifest writes it ("float", "int64", ...)."""
    return np.dtype(_ONNX_NAMES.get(onnx_name, onnx_name))


def _flatten(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    out: list[np.ndarray] = []
    for item in value:
        out.extend(_flatten(item))
    return out


def load(folder) -> CompiledModel:
    """The compiled model in artifact folder ``folder`` (written by ``quantize ... --target``)."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ArtifactError(f"{folder} is not an intq artifact: it has no manifest.json (write one with `quantize`).")
    manifest = json.loads(manifest_path.read_text())
    lib = (manifest.get("target") or {}).get("library")
    if not lib:
        raise ArtifactError(
            f"{folder} holds no compiled library (manifest target is {manifest.get('target')}); re-run `quantize` "
            "with --target x86 to compile one."
        )
    library = folder / lib
    if not library.is_file():
        raise ArtifactError(f"the library {library} named in {manifest_path} is missing.")
    if manifest["target"].get("name") == "arm" and platform.machine() not in ("aarch64", "arm64"):
        raise ArtifactError(
            f"{library} is an aarch64 library (--target arm) and this is a {platform.machine()} machine: load it on "
            "an aarch64 Linux machine, or run it here under qemu with intq.passes.arm.run_under_qemu."
        )
    if manifest["target"].get("name") == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            raise ArtifactError(
                f"{library} is a CUDA library (--target cuda) and this machine has no CUDA device: load it on a "
                "machine with an NVIDIA GPU (see benchmarks/GPU.md)."
            )
    return CompiledModel(folder, manifest, library)
