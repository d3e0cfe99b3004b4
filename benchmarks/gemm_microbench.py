"""Single-core int8 GEMM: intq's scheduled linear kernel against onnxruntime's MatMulInteger and fp32 MatMul.

Shapes are ``M x N x K``: ``M`` rows of activations (batch x sequence), ``N``
output channels, ``K`` the reduction length; ``M * N * K`` multiply-adds
(MAC).  The defaults are the second MLP linear of DeiT-tiny (197 x 192 x 768)
and of MiniLM-L6 (128 x 384 x 1536).

Engines, each (engine, shape) timed in its own process with one thread
(``TVM_NUM_THREADS=1``; onnxruntime ``intra_op_num_threads=1``):

- ``intq``: ``IntLinear`` (int8 x int8, int32 accumulator, bias and
  per-channel requantize to int8, as in the models), imported by intq,
  scheduled by ``passes/schedules`` and compiled for ``--mcpu``: by default
  the host CPU, as ``--target x86`` does (on an AVX-512 VNNI CPU the
  ``vpdpbusd`` dot), ``--mcpu znver3`` for the AVX2-only dot; rows
  symbolic, run through the Relax VM;
- ``intq-acc``: ``IntLinearAcc`` (int32 out, bias only), the bare GEMM;
- ``ort-mmi``: onnxruntime ``MatMulInteger``, uint8 x int8 -> int32, the
  weight a constant initializer (one node);
- ``ort-fp32``: onnxruntime ``MatMul`` in fp32 (one node).

intq is timed by the Relax VM's ``time_evaluator`` (a C++ loop over the VM
call, output allocation included), onnxruntime by ``run_with_iobinding``
with the input and output bound once (no copies).  Prints the median over
``--repeat`` timings of ``--number`` calls each (after warm-up), GMAC/s, the speed relative to ``MatMulInteger``
(``t_mmi / t``, above 1: faster), the fraction of the 80 GMAC/s one core
reaches with the AVX2 int8 sequence (``vpmaddubsw + vpmaddwd + vpaddd``),
and the fastest timing (on a shared machine the least disturbed one).
onnxruntime picks its kernel from the CPU it runs on: on a CPU with
AVX-512 VNNI (the flags line says) its ``MatMulInteger`` uses ``vpdpbusd``
on 512-bit registers, which the AVX2-only deployment CPU does not have.

    python benchmarks/gemm_microbench.py [--shapes 197x192x768,128x384x1536] [--repeat 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ENGINES = ("intq", "intq-acc", "ort-mmi", "ort-fp32")
PEAK_GMACS = 80.0  # one core, AVX2 int8 with exact int32 accumulation (vpmaddubsw + vpmaddwd + vpaddd)


def intq_timer(engine: str, m: int, n: int, k: int, mcpu: str):
    """``timings(number, repeat)`` of the compiled kernel (the VM's time_evaluator), and the schedule report."""
    import tvm

    from intq.passes import compat
    from intq.passes.onnx_import import import_onnx
    from intq.passes.schedules import ScheduleKernels
    from intq.quantizer.ops.linear import IntLinear, IntLinearAcc
    from intq.quantizer.ops.onnx_fn import single_op_model

    rng = np.random.default_rng(0)
    w, b = rng.integers(-127, 128, (n, k)), rng.integers(-(2**20), 2**20, n)
    op = IntLinearAcc(w, b) if engine == "intq-acc" else IntLinear(w, b, rng.uniform(0.5, 2.0, n) / (k * 128 * 16))
    model = single_op_model(op, [np.zeros((1, m, k), np.int8)])
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.dim_param = "seq"  # rows symbolic, as in the models
    target = compat.make_target({"kind": "llvm", "mcpu": mcpu})
    schedule = ScheduleKernels(target)
    mod = schedule(import_onnx(model))
    vm = compat.VirtualMachine(compat.build(mod, target), tvm.cpu(0))
    x = tvm.runtime.tensor(rng.integers(-128, 128, (1, m, k)).astype(np.int8))

    def timings(number: int, repeat: int) -> list[float]:
        vm["main"](x)
        return list(vm.time_evaluator("main", tvm.cpu(0), number=number, repeat=repeat)(x).results)

    return timings, {"scheduled": schedule.scheduled, "skipped": schedule.skipped}


def ort_timer(engine: str, m: int, n: int, k: int):
    """``timings(number, repeat)`` of the one-node model, input and output bound once (``run_with_iobinding``)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if engine == "ort-mmi":
        op, a_type, y_type, y_dtype = "MatMulInteger", TensorProto.UINT8, TensorProto.INT32, np.int32
        w = rng.integers(-127, 128, (k, n)).astype(np.int8)
        a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    else:
        op, a_type, y_type, y_dtype = "MatMul", TensorProto.FLOAT, TensorProto.FLOAT, np.float32
        w = rng.standard_normal((k, n)).astype(np.float32)
        a = rng.standard_normal((m, k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "w"], ["y"])],
        engine,
        [helper.make_tensor_value_info("a", a_type, [m, k])],
        [helper.make_tensor_value_info("y", y_type, [m, n])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    values = [ort.OrtValue.ortvalue_from_numpy(a), ort.OrtValue.ortvalue_from_numpy(np.empty((m, n), y_dtype))]
    binding.bind_ortvalue_input("a", values[0])
    binding.bind_ortvalue_output("y", values[1])

    def timings(number: int, repeat: int, values=values) -> list[float]:  # values: the bound memory lives on
        for _ in range(max(3, number)):
            session.run_with_iobinding(binding)
        out = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                session.run_with_iobinding(binding)
            out.append((time.perf_counter() - start) / number)
        return out

    return timings, {"onnxruntime": ort.__version__}


def child(engine: str, m: int, n: int, k: int, number: int, repeat: int, mcpu: str) -> dict:
    """Time one engine on one shape; runs in its own process so that the thread pools start at one thread."""
    timings, info = intq_timer(engine, m, n, k, mcpu) if engine.startswith("intq") else ort_timer(engine, m, n, k)
    return {"times": timings(number, repeat), **info}


def run_child(engine: str, shape: tuple[int, int, int], args) -> dict:
    env = dict(os.environ, TVM_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", engine, "--shapes", "x".join(map(str, shape))]
    cmd += ["--number", str(args.number), "--repeat", str(args.repeat), "--mcpu", args.mcpu]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{engine} {shape} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_line() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    return f"CPU: {name}, {os.cpu_count()} logical cores, flags {' '.join(isa)}"


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        dims = item.lower().split("x")
        if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise SystemExit(f"--shapes: {item!r} is not MxNxK with positive integers, e.g. 197x192x768")
        shapes.append(tuple(int(d) for d in dims))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="197x192x768,128x384x1536", help="M x N x K, comma separated")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--number", type=int, default=10, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=30, help="timings per engine; the median is reported")
    parser.add_argument(
        "--mcpu", default="", help="LLVM CPU intq compiles for (default: the host's; znver3: AVX2 only, no VNNI)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.mcpu:
        import tvm

        args.mcpu = str(tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")())
    shapes = parse_shapes(args.shapes)
    if args.child:
        print(json.dumps(child(args.child, *shapes[0], args.number, args.repeat, args.mcpu)))
        return
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise SystemExit(f"--engines: unknown {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    print(cpu_line())
    print(f"one thread; median of {args.repeat} x {args.number} calls; intq compiled for mcpu={args.mcpu}")
    header = f"{'M x N x K':>16} {'engine':>9} {'ms':>8} {'GMAC/s':>7} {'vs MMI':>7} {'of AVX2 peak':>14} "
    header += f"{'best ms':>8}"
    for shape in shapes:
        print(f"\n{header}")
        macs = shape[0] * shape[1] * shape[2]
        results = {e: run_child(e, shape, args) for e in engines}
        medians = {e: statistics.median(r["times"]) for e, r in results.items()}
        for engine in engines:
            t = medians[engine]
            ratio = f"{medians['ort-mmi'] / t:7.2f}" if "ort-mmi" in medians else f"{'-':>7}"
            gmacs = macs / t / 1e9
            name = "x".join(map(str, shape))
            best = min(results[engine]["times"]) * 1e3
            row = f"{name:>16} {engine:>9} {t * 1e3:8.3f} {gmacs:7.1f} {ratio} {gmacs / PEAK_GMACS:14.2f} {best:8.3f}"
            skipped = results[engine].get("skipped")
            print(row + (f"   NOT SCHEDULED: {skipped}" if skipped else ""))


if __name__ == "__main__":
    main()
