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

TARGET_NAMES = ("x86",)


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


# name -> factory; a factory takes the JSON dict the user gave (or None) and returns the spec
_NAMED: dict[str, Callable[[Mapping | None], TargetSpec]] = {"x86": _x86}


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
        return TargetSpec(kind, compat.make_target(spec)) if kind != "llvm" else _x86(spec)
    raise ValueError(
        f"unknown target {target!r}: use one of {', '.join(sorted(_NAMED))} or a TVM target JSON dict such as "
        '\'{"kind": "llvm", "mcpu": "x86-64-v3"}\''
    )
