"""Latency of the TVM integer-only artifact against onnxruntime fp32.

Models: MiniLM-L6 (real weights; batch 1, sequence 128) and a DeiT-tiny-shaped
ViT (random weights; batch 1, 224x224).  For each, the float model is exported
to ONNX (onnxruntime fp32 runs it), quantized to INT8 with 16 calibration
samples, compiled by intq for the host CPU, and both are timed with 1 and 2
threads: each (engine, threads) pair runs in its own process so that the
thread pools are set before they start (TVM_NUM_THREADS / ORT
intra_op_num_threads).  Prints the median of ``--repeat`` runs after 2
warm-ups, and the ratio TVM / onnxruntime fp32 (< 1: TVM faster).

    python benchmarks/tvm_latency.py [--models minilm,deit_tiny] [--repeat 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def prepare(model_name: str, folder: Path) -> dict:
    """Write float.onnx, the artifact (model.int.onnx + library) and an input .npz into ``folder``."""
    import onnx
    import torch

    import intq
    from intq.passes.pipeline import compile_onnx
    from intq.quantizer.capture import export_torch

    torch.manual_seed(0)
    if model_name == "minilm":
        from intq.models.minilm import load_minilm_l6

        model, _ = load_minilm_l6()
        make = lambda b: torch.randint(1000, 30000, (b, 128))  # noqa: E731
    elif model_name == "deit_tiny":
        from intq.models.vit import VisionTransformer, ViTConfig

        model = VisionTransformer(ViTConfig.deit_tiny()).eval()
        make = lambda b: torch.randn(b, 3, 224, 224)  # noqa: E731
    else:
        raise SystemExit(f"unknown model {model_name}")
    x = make(1)
    onnx.save(export_torch(model, (x,)), folder / "float.onnx")
    qmodel = intq.quantize(model, [make(4) for _ in range(4)], progress=False)
    int_model = qmodel.to_onnx()
    onnx.save(int_model, folder / "model.int.onnx")
    t0 = time.perf_counter()
    compiled = compile_onnx(int_model, "x86")
    compile_s = time.perf_counter() - t0
    compiled.executable.export_library(str(folder / "model.so"))
    np.savez(folder / "input.npz", **{qmodel.input_names[0]: x.numpy()})
    return {"compile_s": compile_s, "input": qmodel.input_names[0]}


def time_one(engine: str, folder: Path, threads: int, repeat: int) -> list[float]:
    """Run in a child process (thread pools are fixed at start-up)."""
    code = f"""
import json, sys, time, numpy as np
folder, engine, threads, repeat = {str(folder)!r}, {engine!r}, {threads}, {repeat}
feeds = dict(np.load(folder + "/input.npz"))
if engine == "tvm":
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(tvm.runtime.load_module(folder + "/model.so"), tvm.cpu(0))
    args = [tvm.runtime.tensor(v) for v in feeds.values()]
    fn = lambda: vm["main"](*args)
else:
    import onnxruntime as ort
    o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
    s = ort.InferenceSession(folder + "/float.onnx", o, providers=["CPUExecutionProvider"])
    fn = lambda: s.run(None, feeds)
for _ in range(2):
    fn()
times = []
for _ in range(repeat):
    t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
print(json.dumps(times))
"""
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,deit_tiny")
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args(argv)
    print(f"{'model':10s} {'threads':>7s} {'TVM int8 ms':>12s} {'ORT fp32 ms':>12s} {'TVM/ORT':>8s}")
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            info = prepare(name, folder)
            for threads in (1, 2):
                tvm_ms = 1e3 * statistics.median(time_one("tvm", folder, threads, args.repeat))
                ort_ms = 1e3 * statistics.median(time_one("ort", folder, threads, args.repeat))
                print(f"{name:10s} {threads:7d} {tvm_ms:12.1f} {ort_ms:12.1f} {tvm_ms / ort_ms:8.2f}")
            print(f"{name:10s} compile {info['compile_s']:.1f} s (no schedules yet: kernels run as TVM lowers them)")


if __name__ == "__main__":
    main()
