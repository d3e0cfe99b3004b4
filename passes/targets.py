"""Named deployment targets: what ``--target NAME`` compiles for and how its artifact is written.

A ``TargetSpec`` bundles, for one deployment target:

- ``name``: the short name used on the command line and in file names
  (``model.<name>.so``);
- ``target``: the TVM ``Target`` (a JSON dict underneath, 0.27 style);
- ``export(executable, path)``: writes the library (a cross compiler for
  ``arm``);
- ``runs_here``: whether this machine can execute the artifact in-process
  (x86 yes; arm only through ``qemu-user``; cuda only with a GPU), which
  decides how the CLI checks the artifact bit for bit before writing it.

Names: ``x86`` (the host CPU through LLVM), ``arm`` (aarch64 Linux with the
dot-product extension), ``cuda`` (an NVIDIA GPU, ``sm_80`` by default), or a
TVM target JSON dict such as ``{"kind": "llvm", "mcpu": "x86-64-v3"}``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping

from intq.passes import compat

TARGET_NAMES = ("x86", "arm", "cuda")


def _export_host(executable, path: str) -> None:
    executable.export_library(path)


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    name: str
    target: compat.tvm.target.Target
    runs_here: bool = True
    export: Callable[[object, str], None] = _export_host

    @property
    def kind(self) -> str:
        return self.target.kind.name


def _x86(spec: Mapping | None = None) -> TargetSpec:
    return TargetSpec("x86", compat.host_target() if spec is None else compat.make_target(spec))


#: aarch64 Linux with NEON and the dot-product extension (Armv8.2-A and later: Cortex-A55/A76, Neoverse N1,
#: Graviton 2, Apple M1), the ``sdot`` of the linears' schedule (``schedules/arm_int8.py``)
ARM_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}


def _export_arm(executable, path: str) -> None:
    from intq.passes import arm

    arm.export_library(executable, path)


def _arm(spec: Mapping | None = None) -> TargetSpec:
    """Cross-compiled (``aarch64-linux-gnu-g++``); checked by running under qemu (``passes/arm.py``)."""
    return TargetSpec("arm", compat.make_target(ARM_TARGET if spec is None else spec), False, _export_arm)


#: an NVIDIA GPU; the int8 GEMMs use ``__dp4a`` (``schedules/cuda_int8.py``), which needs ``sm_61`` or newer
CUDA_TARGET = {"kind": "cuda", "arch": "sm_80"}
MIN_CUDA_ARCH = 61


def cuda_device_present() -> bool:
    """Whether this process sees a CUDA device (TVM's CUDA runtime loaded and a GPU behind it)."""
    return bool(compat.tvm.cuda(0).exist)


def _cuda(spec: Mapping | None = None) -> TargetSpec:
    """The GPU of ``spec`` (``arch`` defaults to ``sm_80``) with the host CPU (LLVM) as its host side."""
    spec = {**CUDA_TARGET, **(spec or {})}
    arch = str(spec["arch"])
    digits = arch.removeprefix("sm_").rstrip("af")
    if not arch.startswith("sm_") or not digits.isdigit():
        raise ValueError(f"cuda target: arch {arch!r} is not a CUDA architecture such as 'sm_80' or 'sm_90'")
    if int(digits) < MIN_CUDA_ARCH:
        raise ValueError(
            f"cuda target: arch {arch} has no int8 dot product (__dp4a needs sm_{MIN_CUDA_ARCH} or newer); "
            "choose a newer arch such as 'sm_80'"
        )
    host = spec.pop("host", None)
    target = compat.tvm.target.Target(spec, host=compat.make_target(host) if host else compat.host_target())
    return TargetSpec("cuda", target, runs_here=cuda_device_present())


def cuda_device_code(executable) -> str:
    """``"binary"`` when a cuda build holds its kernels compiled (a cubin), ``"source"`` when it holds CUDA source
    only: what TVM writes where its CUDA runtime cannot load (no driver).  Build on the GPU machine for a library
    to run there: whether TVM can load the source form on a GPU was not tested (no GPU was at hand)."""
    pending = [executable.mod]
    while pending:
        module = pending.pop()
        if module.kind == "cuda":
            return "binary" if module.is_runnable() else "source"
        pending.extend(module.imports)
    raise ValueError("cuda_device_code: the executable holds no CUDA module; was it compiled for --target cuda?")


# name -> factory; a factory takes the JSON dict the user gave (or None) and returns the spec
_NAMED: dict[str, Callable[[Mapping | None], TargetSpec]] = {"x86": _x86, "arm": _arm, "cuda": _cuda}


def _check_mcpu(spec: Mapping) -> None:
    """Refuse an ``mcpu`` that LLVM does not know for the spec's triple (LLVM would build a generic library
    and the manifest would record the misspelt name)."""
    import difflib

    from tvm.target import codegen

    mcpu = str(spec["mcpu"])
    bare = {k: v for k, v in spec.items() if k not in ("mcpu", "mattr")}
    known = sorted(str(c) for c in codegen.llvm_get_cpu_archlist(compat.tvm.target.Target(bare)))
    if mcpu not in known and mcpu != "generic":
        close = difflib.get_close_matches(mcpu, known, n=4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        triple = spec.get("mtriple", "this host's triple")
        raise ValueError(
            f"target mcpu {mcpu!r} is not a CPU that LLVM knows for {triple}; {hint}"
            f"LLVM's list has {len(known)} names, e.g. {', '.join(known[:6])}"
        )


def resolve_target(target: str | Mapping | None) -> TargetSpec:
    """The ``TargetSpec`` of a target name or TVM target JSON dict (``None``: x86, the host CPU)."""
    if target is None:
        return _x86()
    if isinstance(target, str) and target in _NAMED:
        return _NAMED[target](None)
    spec = target
    if isinstance(target, str) and target.strip().startswith("{"):
        try:
            spec = json.loads(target)
        except json.JSONDecodeError as exc:
            raise ValueError(f"target {target!r} is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(spec, Mapping):
        kind = str(spec.get("kind", "custom"))
        if kind == "llvm" and "mcpu" in spec:
            _check_mcpu(spec)
        if kind == "llvm" and str(spec.get("mtriple", "")).startswith("aarch64"):
            return _arm(spec)
        if kind == "cuda":
            return _cuda(spec)
        return TargetSpec(kind, compat.make_target(spec)) if kind != "llvm" else _x86(spec)
    raise ValueError(
        f"unknown target {target!r}: use one of {', '.join(sorted(_NAMED))} or a TVM target JSON dict such as "
        '\'{"kind": "llvm", "mcpu": "x86-64-v3"}\''
    )
