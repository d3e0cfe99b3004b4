"""The ``arm`` target off the device: cross-compile for aarch64 Linux and run the library under ``qemu-aarch64``.

``export_library(executable, path)`` links a compiled module with
``aarch64-linux-gnu-g++`` into an aarch64 shared library;
``run_under_qemu(path, inputs)`` runs that library's Relax VM ``main`` on
numpy arrays and returns its outputs, so the artifact's own machine code
(the ``sdot`` GEMM included) is what is checked against onnxruntime.

How it runs: ``passes/arm_runner/runner.cc`` is a small C++ program that
loads the library with the aarch64 TVM runtime (``libtvm_runtime.so`` and
``libtvm_ffi.so`` from the aarch64 wheels of the TVM versions installed
here), creates the VM on the CPU as ``relax.VirtualMachine`` does, calls
``main`` on ``.npy`` inputs and writes ``.npy`` outputs.  It is compiled
once per source and TVM version, into ``runner-<hash>/`` of the cache, and
run by ``qemu-aarch64 -cpu max`` (which has the dot-product extension) with
the cross toolchain's sysroot.  A C++ runner rather than an aarch64 Python
under qemu: it needs no aarch64 Python, numpy or TVM compiler, and starts in
a fraction of a second.

Everything it needs is installed by ``.ci/setup_arm.sh`` (apt:
``gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user``; the two wheels
unpacked into ``$INTQ_AARCH64_HOME``, default ``~/.cache/intq/aarch64``);
what is missing is reported as an ``ArmToolchainError`` that says to run it.
Timings under qemu mean nothing: it translates every instruction.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from intq.passes import compat

CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
SYSROOT = Path("/usr/aarch64-linux-gnu")
RUNNER_SOURCE = Path(__file__).parent / "arm_runner" / "runner.cc"
SETUP = ".ci/setup_arm.sh"


class ArmToolchainError(RuntimeError):
    """A tool or library that ``--target arm`` needs is missing; the message says what to run."""


def aarch64_home() -> Path:
    return Path(os.environ.get("INTQ_AARCH64_HOME", Path.home() / ".cache" / "intq" / "aarch64"))


def runtime_dir() -> Path:
    """Where ``.ci/setup_arm.sh`` unpacked the aarch64 TVM runtime matching the installed TVM."""
    return aarch64_home() / f"tvm-{metadata.version('apache-tvm')}-ffi-{metadata.version('apache-tvm-ffi')}"


def _require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ArmToolchainError(
            f"{name} is not installed (Debian package {package}); --target arm needs it. Run {SETUP} to install "
            "the aarch64 toolchain."
        )
    return path


def _require_runtime() -> Path:
    rt = runtime_dir()
    missing = [
        p
        for p in ("lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "include/tvm/ffi/function.h")
        if not (rt / p).is_file()
    ]
    if missing:
        raise ArmToolchainError(
            f"the aarch64 TVM runtime is not unpacked in {rt} (missing {', '.join(missing)}); run {SETUP} to fetch "
            "the aarch64 wheels of the installed apache-tvm and apache-tvm-ffi."
        )
    if not (SYSROOT / "lib" / "ld-linux-aarch64.so.1").is_file():
        raise ArmToolchainError(f"no aarch64 sysroot at {SYSROOT}; run {SETUP} (it installs g++-aarch64-linux-gnu).")
    return rt


def require_toolchain() -> None:
    """Raise ``ArmToolchainError`` unless everything ``--target arm`` needs is here (builds the runner)."""
    _require_tool(QEMU, "qemu-user")
    runner()


def export_library(executable, path: str) -> None:
    """Link ``executable`` (from ``tvm.compile`` for an aarch64 target) into the aarch64 library ``path``."""
    cxx = _require_tool(CXX, "g++-aarch64-linux-gnu")
    executable.export_library(path, fcompile=compat.cross_compiler(cxx))


def runner() -> Path:
    """The aarch64 runner program, compiled from ``RUNNER_SOURCE`` on first use."""
    cxx = _require_tool(CXX, "g++-aarch64-linux-gnu")
    rt = _require_runtime()
    key = hashlib.sha256(RUNNER_SOURCE.read_bytes() + str(rt).encode()).hexdigest()[:16]
    exe = aarch64_home() / f"runner-{key}" / "intq_arm_runner"
    if exe.is_file():
        return exe
    exe.parent.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(f".{exe.name}.{os.getpid()}")
    cmd = [cxx, "-std=c++17", "-O2", f"-I{rt / 'include'}", str(RUNNER_SOURCE), "-o", str(tmp), f"-L{rt / 'lib'}"]
    # --no-as-needed: nothing in the runner calls libtvm_runtime, but loading it registers the VM executable loader.
    cmd += ["-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", f"-Wl,-rpath,{rt / 'lib'}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ArmToolchainError(f"compiling the aarch64 runner failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
    os.replace(tmp, exe)  # atomic: a concurrent build writes the same program
    return exe


def run_under_qemu(
    library: str | os.PathLike, inputs: Sequence[np.ndarray], threads: int = 1, timeout: float = 600
) -> list[np.ndarray]:
    """Run the Relax VM ``main`` of the aarch64 ``library`` on ``inputs`` (in ``main``'s order) under qemu.

    Returns the outputs as numpy arrays (a tuple output flattened in order).
    ``threads`` is ``TVM_NUM_THREADS`` of the emulated process.
    """
    qemu = _require_tool(QEMU, "qemu-user")
    exe = runner()
    with tempfile.TemporaryDirectory(prefix="intq-arm-") as tmp:
        args = []
        for k, array in enumerate(inputs):
            args.append(os.path.join(tmp, f"in{k}.npy"))
            np.save(args[-1], np.ascontiguousarray(array))
        out = os.path.join(tmp, "out")
        os.mkdir(out)
        cmd = [qemu, "-cpu", "max", "-L", str(SYSROOT), str(exe), os.fspath(library), out, *args]
        env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{os.fspath(library)} ran for more than {timeout:.0f} s under {QEMU}") from None
        if done.returncode != 0:
            raise RuntimeError(
                f"running {os.fspath(library)} under {QEMU} failed (exit status {done.returncode}):\n"
                f"{(done.stderr or done.stdout)[-4000:]}"
            )
        names = sorted(os.listdir(out), key=lambda n: int(n[3:-4]))
        return [np.load(os.path.join(out, n)) for n in names]
