"""intq kernels unscheduled against scheduled (``passes/schedules``), 1 and 2 threads.

Row-wise kernels and attention matmuls at the sizes of one layer of
DeiT-tiny (197 tokens, hidden 192, 3 heads of 64, MLP 768) and of MiniLM-L6
(sequence 128, hidden 384, 12 heads of 32, MLP 1536); convolutions (``cnn``)
of ResNet-8 (3x3 16->16 at 32x32, its stride-2 16->32 with TF pads), a
depthwise 3x3 (64 channels at 32x32) and DeiT's 16x16/16 patch embedding
(3->192 on 224x224).  Batch 1, each built as the pipeline builds it (a
one-node ONNX model, ``import_onnx``, then ``ScheduleKernels``) with the dims
the models leave symbolic (batch; MiniLM's sequence too), compiled for an
AVX2 CPU (``--mcpu``, default ``x86-64-v3``) unscheduled and scheduled.
Timed alone (the PrimFunc, outputs preallocated; a dense conv's scheduled
kernel with its weight packed as the call rewrite packs it; ShiftGELU's
kernel reads its 256-byte table, and its schedule depends on the target:
``--mcpu znver4`` gathers with AVX-512 VBMI), after checking that both give
the same bits; ``--kernels`` keeps only the named kernels.  Each thread
count runs in its own process (``TVM_NUM_THREADS`` is read when the thread
pool starts).  Prints the median
over ``--repeat`` timings (each of at least 20 ms of calls), the fastest one
in brackets (on a shared machine the least disturbed), and
scheduled-over-unscheduled speedups.  ``--clock cpu`` times the calling
thread's CPU time instead of the wall clock: on a machine other processes
load, it counts only this kernel's cycles (one thread only: the pool's other
threads are not counted).

    python benchmarks/kernel_microbench.py [--threads 1,2] [--repeat 25] [--models deit_tiny,minilm,cnn]
        [--kernels ShiftGELU,...] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

DEIT = "deit_tiny"
MINILM = "minilm"
CNN = "cnn"


def conv_cases() -> dict:
    """``{kernel: (op, {input: (shape, dtype)}, {input: {axis: symbol}}, None)}``: ``ScheduleKernels`` picks."""
    from intq.quantizer.ops.conv import IntConv2d

    rng = np.random.default_rng(0)

    def conv(w_shape, **config):
        w = rng.integers(-127, 127, size=w_shape, endpoint=True)
        return IntConv2d(w, rng.integers(-500, 500, w_shape[0]), np.geomspace(1e-4, 1e-2, w_shape[0]), **config)

    def image(channels, size):
        return {"x": ((1, channels, size, size), np.int8)}

    batch = {"x": {0: "b"}}
    return {
        "conv 3x3 16->16": (conv((16, 16, 3, 3), padding=1), image(16, 32), batch, None),
        "conv 3x3 s2 16->32": (conv((32, 16, 3, 3), stride=2, padding=(0, 0, 1, 1)), image(16, 32), batch, None),
        "dwconv 3x3 64": (conv((64, 1, 3, 3), padding=1, groups=64), image(64, 32), batch, None),
        "patch 16x16/16 3->192": (conv((192, 3, 16, 16), stride=16), image(3, 224), batch, None),
    }


def cases(model: str) -> dict:
    """``{kernel: (op, {input: (shape, dtype)}, {input: {axis: symbol}}, schedule function name)}``."""
    if model == CNN:
        return conv_cases()
    from intq.quantizer.ops.add import IntAdd
    from intq.quantizer.ops.layernorm import ILayerNorm
    from intq.quantizer.ops.matmul import IntMatMul, IntMatMulAcc
    from intq.quantizer.ops.requantize import Requantize
    from intq.quantizer.ops.shiftgelu import ShiftGELU
    from intq.quantizer.ops.shiftmax import Shiftmax

    seq, hidden, heads, mlp = (197, 192, 3, 768) if model == DEIT else (128, 384, 12, 1536)
    head = hidden // heads
    seq_dim = None if model == DEIT else "s"  # DeiT's token count is static, MiniLM's sequence is not

    def dims(*axes):
        return {axis: ("b" if axis == 0 else seq_dim) for axis in axes if axis == 0 or seq_dim}

    rng = np.random.default_rng(0)
    gamma, beta = rng.normal(1.0, 0.5, hidden), rng.normal(0.0, 0.5, hidden)
    return {
        "Shiftmax": (
            Shiftmax(0.0137),
            {"x": ((1, heads, seq, seq), np.int32)},
            {"x": dims(0, 2, 3)},
            "schedule_shiftmax",
        ),
        "ILayerNorm": (
            ILayerNorm(gamma, beta, 1e-6, 0.01, 0.05),
            {"x": ((1, seq, hidden), np.int16)},
            {"x": dims(0, 1)},
            "schedule_layernorm",
        ),
        # None: the registered schedule, which takes the target (the table's vpermi2b gather needs AVX-512 VBMI)
        "ShiftGELU": (ShiftGELU(0.05, 0.03), {"x": ((1, seq, mlp), np.int8)}, {"x": dims(0, 1)}, None),
        "IntAdd": (
            IntAdd(np.linspace(0.1, 0.9, hidden), 0.37),
            {"a": ((1, seq, hidden), np.int16), "b": ((1, seq, hidden), np.int16)},
            {"a": dims(0, 1), "b": dims(0, 1)},
            "schedule_add",
        ),
        "Requantize": (
            Requantize(np.linspace(1e-4, 1e-3, hidden)),
            {"x": ((1, seq, hidden), np.int32)},
            {"x": dims(0, 1)},
            "schedule_requantize",
        ),
        "IntMatMulAcc QK^T": (
            IntMatMulAcc(),
            {"a": ((1, heads, seq, head), np.int8), "b": ((1, heads, head, seq), np.int8)},
            {"a": dims(0, 2), "b": dims(0, 3)},
            None,  # ScheduleKernels picks: the x86 plan of --mcpu's dot (batch_matmul.schedule_matmul)
        ),
        "IntMatMul PV": (
            IntMatMul(3e-3),
            {"a": ((1, heads, seq, seq), np.int8), "b": ((1, heads, seq, head), np.int8)},
            {"a": dims(0, 2, 3), "b": dims(0, 2)},
            None,
        ),
    }


def kernel(op, inputs: dict, symbols: dict):
    """The op's PrimFunc as ``import_onnx`` builds it, and its buffer params (in order) as numpy arrays.

    Those after the data inputs are constants of the call (multi-element initializers; ShiftGELU's table):
    single-element integer params are immediates in the kernel (``passes/ops/base.param_operand``).
    """
    import tvm

    from intq.passes import compat
    from intq.passes.onnx_import import import_onnx
    from intq.quantizer.ops.onnx_fn import single_op_model

    model = single_op_model(op, [np.zeros(shape, dtype) for shape, dtype in inputs.values()])
    for value in model.graph.input:
        for axis, name in symbols.get(value.name, {}).items():
            value.type.tensor_type.shape.dim[axis].dim_param = name
    mod = import_onnx(model)
    (call,) = [
        b.value
        for block in mod["main"].body.blocks
        for b in block.bindings
        if isinstance(b.value, compat.relax.Call) and isinstance(b.value.args[0], tvm.ir.GlobalVar)
    ]
    params = [compat.constant_value(a) for a in call.args[1].fields[len(inputs) :]]
    return mod[call.args[0]], [np.ascontiguousarray(p) for p in params]


def scheduled_kernel(op, inputs: dict, symbols: dict, mcpu: str):
    """The op's kernel after ``ScheduleKernels`` for ``mcpu`` and its constant params (a call rewrite repacks them)."""
    import tvm

    from intq.passes import compat
    from intq.passes.onnx_import import import_onnx
    from intq.passes.schedules import ScheduleKernels
    from intq.quantizer.ops.onnx_fn import single_op_model

    model = single_op_model(op, [np.zeros(shape, dtype) for shape, dtype in inputs.values()])
    for value in model.graph.input:
        for axis, name in symbols.get(value.name, {}).items():
            value.type.tensor_type.shape.dim[axis].dim_param = name
    mod = ScheduleKernels(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))(import_onnx(model))
    (call,) = [
        b.value
        for block in mod["main"].body.blocks
        for b in block.bindings
        if isinstance(b.value, compat.relax.Call)
        and isinstance(b.value.args[0], tvm.ir.GlobalVar)
        and "intq.schedule" in (mod[b.value.args[0]].attrs or {})
    ]
    params = [compat.constant_value(a) for a in call.args[1].fields[len(inputs) :]]
    return mod[call.args[0]], [np.ascontiguousarray(p) for p in params]


def compile_kernel(func, schedule, mcpu: str):
    import tvm

    from intq.passes import compat

    if schedule is not None:
        sch = compat.s_tir.Schedule(func)
        schedule(sch)
        func = sch.mod["main"]
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).jit()


def timings(fn, call_args, args) -> list[float]:
    """``args.repeat`` timings (ms per call) of ``fn["main"]``, each over at least 20 ms, by ``args.clock``."""
    import time

    import tvm

    if args.clock == "wall":
        timer = fn.time_evaluator("main", tvm.cpu(0), number=1, repeat=args.repeat, min_repeat_ms=20)
        return [t * 1e3 for t in timer(*call_args).results]
    out = []
    for _ in range(args.repeat):
        calls, start = 0, time.thread_time()
        while time.thread_time() - start < 0.02:
            fn["main"](*call_args)
            calls += 1
        out.append((time.thread_time() - start) / calls * 1e3)
    return out


def worker(args) -> None:
    """Time every case of ``args.models`` in this process; one JSON line per case."""
    import tvm

    from intq.passes.schedules import rows

    schedules = {n: getattr(rows, n) for n in dir(rows) if n.startswith("schedule_")}
    rng = np.random.default_rng(1)
    for model in args.models:
        for name, (op, inputs, symbols, schedule) in cases(model).items():
            if args.kernels and name not in args.kernels:
                continue
            func, params = kernel(op, inputs, symbols)
            data = []
            for shape, dtype in inputs.values():
                info = np.iinfo(dtype)
                lo, hi = max(info.min, -(2**20)), min(info.max, 2**20)
                data.append(rng.integers(lo, hi, shape, endpoint=True).astype(dtype))
            row = {"model": model, "kernel": name, "shape": " x ".join(str(list(d.shape)) for d in data)}
            variants = [("unscheduled", func, None, params)]
            if schedule is None:  # the kernel ScheduleKernels makes (a conv's GEMM call rewrite or a schedule)
                scheduled, scheduled_params = scheduled_kernel(op, inputs, symbols, args.mcpu)
                variants.append(("scheduled", scheduled, None, scheduled_params))
            else:
                variants.append(("scheduled", func, schedules[schedule], params))
            outputs = []
            for label, kernel_func, sched, kernel_params in variants:
                fn = compile_kernel(kernel_func, sched, args.mcpu)
                out_shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else 1 for d in kernel_func.params[-1].ty.shape]
                same_shape = str(kernel_func.params[-1].ty.shape) == str(kernel_func.params[0].ty.shape)
                if "MatMul" in name or schedule is not None or same_shape:  # their symbolic dims are the inputs'
                    out_shape = data[0].shape[:-1] + data[-1].shape[-1:] if "MatMul" in name else data[0].shape
                out = tvm.runtime.tensor(np.zeros(out_shape, str(kernel_func.params[-1].ty.dtype)))
                call_args = [tvm.runtime.tensor(a) for a in [*data, *kernel_params]] + [out]
                fn["main"](*call_args)
                outputs.append(out.numpy().reshape(-1))
                times = timings(fn, call_args, args)
                row[label] = (statistics.median(times), min(times))
            if not np.array_equal(*outputs):
                raise SystemExit(f"{model} {name}: the scheduled kernel differs from the unscheduled one")
            print(json.dumps(row), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma-separated TVM_NUM_THREADS values, one process each")
    p.add_argument("--repeat", type=int, default=25)
    p.add_argument("--models", default=f"{DEIT},{MINILM}")
    p.add_argument("--kernels", default="", help="comma-separated kernel names (default: every kernel)")
    p.add_argument("--mcpu", default="x86-64-v3", help="LLVM CPU of the target (x86-64-v3: AVX2, no AVX-512)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: this thread's CPU time (1 thread)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    args.kernels = [k for k in args.kernels.split(",") if k]
    if args.clock == "cpu" and args.threads != "1":
        p.error("--clock cpu counts the calling thread only: use it with --threads 1")
    if args.worker:
        worker(args)
        return

    results: dict[tuple[str, str], dict] = {}
    threads = [int(t) for t in args.threads.split(",")]
    for n in threads:
        env = dict(os.environ, TVM_NUM_THREADS=str(n))
        argv_ = [sys.executable, __file__, "--worker", "--repeat", str(args.repeat), "--mcpu", args.mcpu]
        argv_ += ["--clock", args.clock, "--threads", str(n)]
        argv_ += ["--models", ",".join(args.models), "--kernels", ",".join(args.kernels)]
        done = subprocess.run(argv_, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the worker with TVM_NUM_THREADS={n} failed:\n{done.stderr}")
        for row in map(json.loads, done.stdout.splitlines()):
            entry = results.setdefault((row["model"], row["kernel"]), {"shape": row["shape"]})
            entry[n] = (row["unscheduled"], row["scheduled"])

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"mcpu={args.mcpu}, {os.cpu_count()} CPUs, load average after the runs {load}")
    clock = "thread CPU time" if args.clock == "cpu" else "wall clock"
    print(f"ms ({clock}): median [fastest] of", args.repeat, "timings; speedup = unscheduled / scheduled (medians)")
    head = f"{'model':10} {'kernel':22} {'shape':38}"
    for n in threads:
        head += f" | {f'unsched {n}T':>16} {f'sched {n}T':>16} {'x':>5}"
    print(head)
    for (model, name), entry in results.items():
        line = f"{model:10} {name:22} {entry['shape']:38}"
        for n in threads:
            (u_med, u_min), (s_med, s_min) = entry[n]
            line += f" | {u_med:7.3f} [{u_min:6.3f}] {s_med:7.3f} [{s_min:6.3f}] {u_med / s_med:5.1f}"
        print(line)


if __name__ == "__main__":
    main()
