"""End-to-end latency: the TVM integer-only artifact against onnxruntime fp32,
onnxruntime int8 (its own ``quantize_static``: QDQ, per-channel weights,
uint8 activations) and torch fp32, on the same machine, in one run.

Models: MiniLM-L6 (real weights; sequence 128) and a DeiT-tiny-shaped ViT
(random weights; 224x224), each at batch 1 and 8.  Each model is quantized by
intq (16 calibration samples) and compiled for the host CPU; onnxruntime's
int8 model is calibrated on the same samples.  Every (engine, threads) pair
runs in its own process, so thread pools are fixed before they start
(TVM_NUM_THREADS, ORT intra_op_num_threads, torch.set_num_threads).  Prints
the median of ``--repeat`` runs after 2 warm-ups and the ratios of TVM to
the others (< 1: TVM faster).

    python benchmarks/tvm_latency.py [--models minilm,deit_tiny] [--batches 1,8] [--repeat 10]
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

ENGINES = ("tvm_int8", "ort_fp32", "ort_int8_qdq", "torch_fp32")


def _model(name: str):
    import torch

    torch.manual_seed(0)
    if name == "minilm":
        from intq.models.minilm import load_minilm_l6

        model, _ = load_minilm_l6()
        return model, lambda b, g: torch.randint(1000, 30000, (b, 128), generator=g)
    if name == "deit_tiny":
        from intq.models.vit import VisionTransformer, ViTConfig

        return VisionTransformer(ViTConfig.deit_tiny()).eval(), lambda b, g: torch.randn(b, 3, 224, 224, generator=g)
    raise SystemExit(f"unknown model {name}")


def prepare(name: str, folder: Path, batches) -> dict:
    """float.onnx, qdq.onnx, model.so, the torch model, and inputs per batch size, into ``folder``."""
    import onnx
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    import intq
    from intq.passes.pipeline import compile_onnx
    from intq.quantizer.capture import export_torch

    model, make = _model(name)
    g = torch.Generator().manual_seed(1)
    calib = [make(4, g) for _ in range(4)]
    float_proto = export_torch(model, (calib[0],))
    onnx.save(float_proto, folder / "float.onnx")
    input_name = float_proto.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{input_name: c.numpy()} for c in calib])

        def get_next(self):
            return next(self.items, None)

    quantize_static(
        str(folder / "float.onnx"),
        str(folder / "qdq.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    qmodel = intq.quantize(model, calib, progress=False)
    t0 = time.perf_counter()
    compiled = compile_onnx(qmodel.to_onnx(), "x86")
    compile_s = time.perf_counter() - t0
    compiled.executable.export_library(str(folder / "model.so"))
    torch.save(model, folder / "model.pt")
    for b in batches:
        np.save(folder / f"input_{b}.npy", make(b, g).numpy())
    return {"compile_s": compile_s, "input": input_name}


CHILD = r"""
import json, sys, time, numpy as np
folder, engine, threads, repeat, batch, input_name = sys.argv[1:7]
threads, repeat = int(threads), int(repeat)
x = np.load(f"{folder}/input_{batch}.npy")
if engine == "tvm_int8":
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(tvm.runtime.load_module(f"{folder}/model.so"), tvm.cpu(0))
    arg = tvm.runtime.tensor(x)
    fn = lambda: vm["main"](arg)
elif engine.startswith("ort"):
    import onnxruntime as ort
    o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
    path = f"{folder}/float.onnx" if engine == "ort_fp32" else f"{folder}/qdq.onnx"
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    fn = lambda: s.run(None, {input_name: x})
else:
    import torch
    torch.set_num_threads(threads)
    m = torch.load(f"{folder}/model.pt", weights_only=False).eval()
    xt = torch.from_numpy(x)
    def fn():
        with torch.inference_mode():
            m(xt)
for _ in range(2):
    fn()
times = []
for _ in range(repeat):
    t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def time_one(engine: str, folder: Path, threads: int, repeat: int, batch: int, input_name: str) -> float:
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    argv = [sys.executable, "-c", CHILD, str(folder), engine, str(threads), str(repeat), str(batch), input_name]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return 1e3 * statistics.median(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,deit_tiny")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    threads_list = [int(t) for t in args.threads.split(",")]
    head = f"{'model':10s} {'batch':>5s} {'thr':>3s} " + " ".join(f"{e + ' ms':>16s}" for e in ENGINES)
    print(head + f" {'tvm/ort32':>9s} {'tvm/ort8':>8s} {'tvm/torch':>9s}")
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            info = prepare(name, folder, batches)
            for batch in batches:
                for threads in threads_list:
                    ms = {e: time_one(e, folder, threads, args.repeat, batch, info["input"]) for e in ENGINES}
                    row = f"{name:10s} {batch:5d} {threads:3d} " + " ".join(f"{ms[e]:16.1f}" for e in ENGINES)
                    t = ms["tvm_int8"]
                    print(row + f" {t / ms['ort_fp32']:9.2f} {t / ms['ort_int8_qdq']:8.2f} {t / ms['torch_fp32']:9.2f}")
            print(f"{name:10s} TVM compile {info['compile_s']:.1f} s")


if __name__ == "__main__":
    main()
