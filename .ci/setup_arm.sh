#!/usr/bin/env bash
# The aarch64 toolchain of `--target arm` and its tests: a cross compiler, qemu-user, and the aarch64 TVM
# runtime (libtvm_runtime.so, libtvm_ffi.so and their headers, from the aarch64 wheels of the TVM versions
# installed here). Idempotent: what is already in place is kept.  Needs root (or sudo) for apt.
#
# Layout (INTQ_AARCH64_HOME, default ~/.cache/intq/aarch64; intq.passes.arm reads the same):
#   wheels/                                   the downloaded aarch64 wheels
#   tvm-<tvm version>-ffi-<ffi version>/      lib/libtvm_runtime.so, lib/libtvm_ffi.so, include/
# The runner program (passes/arm_runner/runner.cc) is compiled on first use, into runner-<hash>/.
set -euo pipefail

home="${INTQ_AARCH64_HOME:-$HOME/.cache/intq/aarch64}"
python="${PYTHON:-python}"
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

die() { echo "setup_arm.sh: $*" >&2; exit 1; }

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
if [ ${#missing[@]} -gt 0 ]; then
  $sudo apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
fi
for tool in aarch64-linux-gnu-g++ qemu-aarch64; do
  command -v "$tool" >/dev/null || die "$tool is still missing after installing ${missing[*]}"
done
[ -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ] || die "no aarch64 sysroot at /usr/aarch64-linux-gnu"

versions=$("$python" -c 'from importlib.metadata import version as v; print(v("apache-tvm"), v("apache-tvm-ffi"))') \
  || die "apache-tvm and apache-tvm-ffi must be installed in $python first (pip install -e .)"
read -r tvm_version ffi_version <<<"$versions"
runtime="$home/tvm-$tvm_version-ffi-$ffi_version"
if [ ! -e "$runtime/lib/libtvm_runtime.so" ] || [ ! -e "$runtime/lib/libtvm_ffi.so" ]; then
  mkdir -p "$home/wheels"
  # Only the libraries and headers are used, so the Python tag (cp311, for tvm-ffi) need not match this Python.
  if ! log=$("$python" -m pip download -q --disable-pip-version-check --no-deps --dest "$home/wheels" \
    --platform manylinux_2_28_aarch64 --python-version 311 --only-binary=:all: \
    "apache-tvm==$tvm_version" "apache-tvm-ffi==$ffi_version" 2>&1); then
    echo "$log" >&2
    die "pip download of the aarch64 wheels apache-tvm==$tvm_version apache-tvm-ffi==$ffi_version failed"
  fi
  tmp=$(mktemp -d "$home/.unpack.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  shopt -s nullglob
  tvm_wheels=("$home"/wheels/apache_tvm-"$tvm_version"-*aarch64*.whl)
  ffi_wheels=("$home"/wheels/apache_tvm_ffi-"$ffi_version"-*aarch64*.whl)
  [ ${#tvm_wheels[@]} -gt 0 ] && [ ${#ffi_wheels[@]} -gt 0 ] || die "the aarch64 wheels are not in $home/wheels"
  tvm_wheel=${tvm_wheels[0]} ffi_wheel=${ffi_wheels[0]}
  "$python" - "$tvm_wheel" "$ffi_wheel" "$tmp" <<'PY' || die "unpacking the aarch64 wheels failed"
import shutil, sys, zipfile
from pathlib import Path

tvm_wheel, ffi_wheel, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
# What the runner needs: the two runtime libraries, side by side (libtvm_runtime's RUNPATH is $ORIGIN), and the
# headers of tvm-ffi (the runner's API) and of the TVM runtime.
wanted = {
    tvm_wheel: {"tvm/lib/libtvm_runtime.so": "lib/", "tvm/include/": "include/"},
    ffi_wheel: {"tvm_ffi/lib/libtvm_ffi.so": "lib/", "tvm_ffi/include/": "include/"},
}
for wheel, routes in wanted.items():
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            for prefix, dest in routes.items():
                if name.startswith(prefix) and not name.endswith("/"):
                    rel = Path(name).name if not prefix.endswith("/") else name[len(prefix):]
                    target = out / dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
for lib in ("lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "include/tvm/ffi/function.h"):
    if not (out / lib).is_file():
        sys.exit(f"{lib} is not in the wheels")
PY
  rm -rf "$runtime"
  mv "$tmp" "$runtime"
  trap - EXIT
fi
echo "setup_arm.sh: aarch64 toolchain ready (runtime in $runtime)"
