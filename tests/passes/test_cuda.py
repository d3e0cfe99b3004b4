"""``--target cuda``: every kernel scheduled for the GPU, the int8 GEMMs on ``__dp4a``, all checked without a GPU.

No GPU is needed (nor, on most machines, present): the tests compile for
``sm_80`` and read what TVM generated.

- MiniLM-L6 (real weights) and a DeiT-tiny-shaped ViT compile for cuda;
  every contraction kernel (linears, attention matmuls, the patch
  convolution) is the dp4a GEMM, every ``intq`` kernel has its loops bound
  to GPU threads, the module stays integer-only, and the library exports.
- ``nvcc`` compiles the generated CUDA source for ``sm_80`` and its PTX
  holds ``dp4a.s32.s32``.
- The arithmetic of the GEMM plans (flattening, padding, the implicit-GEMM
  convolution with padding and stride, the epilogues) is checked bit for
  bit against onnxruntime by compiling the same plans, unscheduled, for the
  CPU: the GPU schedule then only distributes those exact integer
  operations, and ``__dp4a`` is exact (``cuda_int8``'s docstring).
- ``quantize --target cuda`` writes ``model.cuda.so`` and a manifest that
  says whether the bit-exact check ran (it cannot without a GPU).
"""

from __future__ import annotations

import json
import re
import subprocess
from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tvm_ffi
from torch import nn

import intq
from intq.cli import main
from intq.models.bert import BertConfig, BertEncoder
from intq.models.vit import VisionTransformer, ViTConfig
from intq.passes import compat, schedules
from intq.passes.fuse_requantize_epilogue import FuseRequantizeEpilogue
from intq.passes.fuse_residual_epilogue import FuseResidualEpilogue
from intq.passes.onnx_import import import_onnx
from intq.passes.ops.conv import conv2d_te
from intq.passes.pipeline import compile_onnx
from intq.passes.schedules import ScheduleKernels, cuda_int8, cuda_plans
from intq.passes.targets import cuda_device_code, resolve_target
from intq.passes.verify import verify_integer_only
from intq.quantizer.capture import export_torch

CONTRACTIONS = ("IntLinear", "IntMatMul", "IntConv2d")  # op families whose kernels must be dp4a GEMMs
DP4A_SCHEDULES = (cuda_int8.SCHEDULE_NAME, "schedule_matmul")
KERNEL = re.compile(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)\([^)]*\) \{')


def family(op: str) -> str:
    return next((f for f in CONTRACTIONS if op.startswith(f)), op)


def contraction_families(model: onnx.ModelProto) -> set[str]:
    return {family(n.op_type) for n in model.graph.node if n.domain == "intq" and family(n.op_type) in CONTRACTIONS}


def cuda_build(model: onnx.ModelProto):
    """``(scheduled Relax module, the ScheduleKernels pass that ran, executable)`` for ``--target cuda``."""
    target = resolve_target("cuda").target
    mod = import_onnx(model)
    verify_integer_only(mod)
    mod = FuseResidualEpilogue()(FuseRequantizeEpilogue()(mod))
    scheduler = ScheduleKernels(target)
    mod = scheduler(mod)
    return mod, scheduler, compat.build(mod, target)


def cuda_source(executable) -> str:
    pending = [executable.mod]
    while pending:
        module = pending.pop()
        if module.kind == "cuda":
            return module.inspect_source()
        pending.extend(module.imports)
    raise AssertionError("the executable holds no CUDA module")


def kernel_bodies(source: str) -> dict[str, str]:
    """Each ``__global__`` kernel defined in ``source``: name -> its text up to the next definition."""
    found = list(KERNEL.finditer(source))
    ends = [m.start() for m in found[1:]] + [len(source)]
    return {m.group(1): source[m.end() : end] for m, end in zip(found, ends, strict=True)}


def intq_kernels(mod) -> dict[str, compat.tirx.PrimFunc]:
    """The scheduled module's kernels of ``intq`` ops (tagged ``intq.op`` or, when rebuilt, ``intq.scheduled_op``)."""
    out = {}
    for gv, func in mod.functions.items():
        attrs = func.attrs if isinstance(func, compat.tirx.PrimFunc) and func.attrs else {}
        op = attrs.get("intq.op", attrs.get("intq.scheduled_op"))
        if op is not None:
            out[gv.name_hint] = func
    return out


def op_of(func) -> str:
    return str(func.attrs.get("intq.op", func.attrs.get("intq.scheduled_op")))


def thread_bound(func) -> bool:
    loops: list = []
    tvm_ffi.structural_walk(func.body, (compat.tirx.For, loops.append))
    return any(loop.kind == compat.tirx.ForKind.THREAD_BINDING for loop in loops)


def check_cuda_build(model: onnx.ModelProto, build) -> None:
    mod, scheduler, executable = build
    kernels = intq_kernels(mod)
    assert kernels, "no intq kernel in the scheduled module"
    assert not scheduler.skipped, f"kernels left to the fallback: {scheduler.skipped}"
    unbound = sorted(name for name, func in kernels.items() if not thread_bound(func))
    assert not unbound, f"kernels without GPU thread bindings: {unbound}"
    unscheduled = sorted(name for name, func in kernels.items() if "intq.schedule" not in func.attrs)
    assert not unscheduled, f"intq kernels left unscheduled: {unscheduled}"

    gemms = {name: func for name, func in kernels.items() if family(op_of(func)) in CONTRACTIONS}
    assert {family(op_of(f)) for f in gemms.values()} == contraction_families(model)
    not_dp4a = sorted(n for n, f in gemms.items() if str(f.attrs["intq.schedule"]) not in DP4A_SCHEDULES)
    assert not not_dp4a, f"contraction kernels without the dp4a schedule: {not_dp4a}"

    bodies = kernel_bodies(cuda_source(executable))
    for name in gemms:
        body = bodies.get(f"{name}_kernel")
        assert body is not None, f"no CUDA kernel {name}_kernel in the source; it has {sorted(bodies)}"
        assert "__dp4a(" in body, f"{name}_kernel does not call __dp4a"
        assert "__shared__" in body and "__syncthreads()" in body, f"{name}_kernel stages no shared tiles"
    others = [n for n in bodies if not any(n == f"{g}_kernel" for g in gemms)]
    assert all("__dp4a(" not in bodies[n] for n in others), "__dp4a outside the contraction kernels"
    for name, body in bodies.items():
        assert "threadIdx." in body or "blockIdx." in body, f"{name} reads no thread or block index"
    verify_integer_only(mod)


# ---------------------------------------------------------------- the real models


@pytest.fixture(scope="module")
def deit_cuda(deit_tiny):
    _, qmodel = deit_tiny
    model = qmodel.to_onnx()
    return model, cuda_build(model)


@pytest.fixture(scope="module")
def minilm_cuda(minilm_int8):
    _, _, qmodel = minilm_int8
    model = qmodel.to_onnx()
    return model, cuda_build(model)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_deit_tiny_for_cuda(deit_cuda, tmp_path):
    model, build = deit_cuda
    check_cuda_build(model, build)
    assert contraction_families(model) == {"IntLinear", "IntMatMul", "IntConv2d"}
    executable = build[2]
    path = tmp_path / "model.cuda.so"
    executable.export_library(str(path))
    assert path.stat().st_size > 0
    assert cuda_device_code(executable) == ("binary" if compat.tvm.cuda(0).exist else "source")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_minilm_l6_for_cuda(minilm_cuda):
    model, build = minilm_cuda
    check_cuda_build(model, build)
    assert contraction_families(model) == {"IntLinear", "IntMatMul"}


# ---------------------------------------------------------------- small models: nvcc, the plans' arithmetic


class TinyCNN(nn.Module):
    """Padded and strided convolutions (the implicit GEMM's byte-by-byte copy path), then a linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


@pytest.fixture(scope="module")
def small_models() -> dict[str, tuple[onnx.ModelProto, list[np.ndarray]]]:
    """Integer ONNX models with every contraction form, and test inputs of several shapes."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    rng = np.random.default_rng(6)
    vit = VisionTransformer(ViTConfig.deit_tiny(img_size=32, patch=4, depth=1, num_classes=10)).eval()
    bert = BertEncoder(BertConfig(vocab_size=100, hidden=64, layers=1, heads=2, intermediate=128, max_positions=64))
    cnn = TinyCNN().eval()
    out = {}
    for name, model, calib, tests in (
        ("vit", vit, torch.randn(4, 3, 32, 32, generator=gen), [(1, 3, 32, 32), (3, 3, 32, 32)]),
        ("bert", bert.eval(), torch.randint(0, 100, (4, 12), generator=gen), [(1, 5), (2, 17), (3, 40)]),
        ("cnn", cnn, torch.randn(4, 3, 16, 16, generator=gen), [(1, 3, 16, 16), (2, 3, 16, 16)]),
    ):
        qmodel = intq.quantize(model, [calib], progress=False)
        if calib.dtype == torch.int64:
            inputs = [rng.integers(0, 100, shape).astype(np.int64) for shape in tests]
        else:
            inputs = [rng.standard_normal(shape).astype(np.float32) for shape in tests]
        out[name] = (qmodel.to_onnx(), inputs)
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["vit", "bert", "cnn"])
def test_gemm_plans_equal_onnxruntime(small_models, name):
    """The CUDA call rewrites and GEMM plans, compiled unscheduled for the CPU, equal onnxruntime bit for bit."""
    model, inputs = small_models[name]
    plans_only = {op: schedules.CUDA_SCHEDULES[op] for op in ("IntMatMul", "IntMatMulAcc")}
    applied = []

    def unscheduled(func, plan, tiles):
        applied.append(plan)
        return func

    with (
        mock.patch.object(schedules, "registries", lambda _target: (plans_only, schedules.CUDA_CALL_REWRITES)),
        mock.patch.object(cuda_int8, "schedule_gemm", unscheduled),
    ):
        compiled = compile_onnx(model, "x86")
    gemm_nodes = [n for n in model.graph.node if n.domain == "intq" and family(n.op_type) in CONTRACTIONS]
    assert gemm_nodes and applied, "no GEMM plan was built"
    vm = compat.VirtualMachine(compiled.executable, compat.tvm.cpu(0))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for x in inputs:
        got = vm["main"](compat.tvm.runtime.tensor(x)).numpy()
        want = sess.run(None, {compiled.input_names[0]: x})[0]
        np.testing.assert_array_equal(got, want, err_msg=f"{name} at input shape {x.shape}")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nvcc_compiles_the_generated_source(small_models, tmp_path):
    """nvcc (ptxas included) accepts every generated kernel for sm_80; the PTX multiplies with dp4a.s32.s32."""
    for name in ("vit", "cnn"):
        model, _ = small_models[name]
        source = cuda_source(compile_onnx(model, "cuda").executable)
        path = tmp_path / f"{name}.cu"
        path.write_text(source)
        keep = tmp_path / f"{name}_keep"
        keep.mkdir()
        cmd = ["nvcc", "-arch=sm_80", "-cubin", "-keep", "-keep-dir", str(keep), "-o", str(tmp_path / f"{name}.cubin")]
        done = subprocess.run([*cmd, str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        ptx = (keep / f"{name}.ptx").read_text()
        assert ptx.count("dp4a.s32.s32") >= source.count("__dp4a(") > 0


# ---------------------------------------------------------------- refusals and the fallback


def _grouped_conv_module():
    """A Relax module calling one intq convolution kernel with two groups."""
    bb = compat.relax.BlockBuilder()
    x = compat.relax.Var("x", compat.relax.TensorType([1, 4, 8, 8], "int8"))
    w = compat.relax.const(np.ones((6, 2, 3, 3), np.int8))
    b = compat.relax.const(np.zeros(6, np.int32))
    m = compat.relax.const(np.full((6, 1, 1), 3, np.int64))
    s = compat.relax.const(np.full((6, 1, 1), 4, np.int64))
    op = "IntConv2d_s1x1_p1x1x1x1_d1x1_g2"
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(
                bb.call_te(
                    lambda *t: conv2d_te(*t, (1, 1), (1, 1, 1, 1), (1, 1), 2),
                    x,
                    w,
                    b,
                    m,
                    s,
                    primfunc_name_hint="intq_conv2d",
                    primfunc_attrs={"intq.op": op, "intq.immediates": {}},
                )
            )
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def test_grouped_conv_is_refused_and_falls_back():
    mod = _grouped_conv_module()
    func = mod["intq_conv2d"]
    reason = cuda_plans.conv_plan(func)
    assert isinstance(reason, str) and "grouped convolution" in reason
    target = resolve_target("cuda").target
    scheduler = ScheduleKernels(target)
    scheduled = scheduler(mod)
    assert "grouped convolution" in scheduler.skipped["intq_conv2d"]
    kernel = scheduled["intq_conv2d"]
    assert str(kernel.attrs["intq.schedule"]) == "fallback" and thread_bound(kernel)
    bodies = kernel_bodies(cuda_source(compat.build(scheduled, target)))
    assert "intq_conv2d_kernel" in bodies and "__dp4a(" not in bodies["intq_conv2d_kernel"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_refused_kernel_gets_the_fallback(small_models):
    """A schedule that refuses its kernel leaves the reason on record and the kernel to the fallback, never unbound."""
    model, _ = small_models["bert"]
    mod = FuseResidualEpilogue()(FuseRequantizeEpilogue()(import_onnx(model)))
    refuse = {op: (lambda func, target: "refused by the test") for op in ("IntMatMul", "IntMatMulAcc")}
    scheduler = ScheduleKernels(resolve_target("cuda").target)
    with mock.patch.dict(schedules.CUDA_SCHEDULES, refuse):
        scheduled = scheduler(mod)
    matmuls = {n: f for n, f in intq_kernels(scheduled).items() if op_of(f).startswith("IntMatMul")}
    assert matmuls and all(scheduler.skipped[n] == "refused by the test" for n in matmuls)
    assert all(str(f.attrs["intq.schedule"]) == "fallback" and thread_bound(f) for f in matmuls.values())


def test_plans_refuse_kernels_of_other_shapes():
    mod = _grouped_conv_module()
    conv = mod["intq_conv2d"]
    assert "not a batched matmul" in cuda_plans.matmul_plan(conv)
    assert "not a linear" in cuda_plans.linear_plan(conv)
    x = compat.te.placeholder((2, 8), "int8", "x")
    doubled = compat.te.create_prim_func([x, compat.te.compute((2, 8), lambda i, j: x[i, j] * 2, name="twice")])
    assert "no 'acc' block" in cuda_plans.read_contraction(doubled)


# ---------------------------------------------------------------- the target and the command line


def test_cuda_target():
    spec = resolve_target("cuda")
    exported = spec.target.export()
    assert (spec.name, spec.kind, exported["arch"]) == ("cuda", "cuda", "sm_80")
    assert spec.target.host.kind.name == "llvm"
    assert spec.runs_here == bool(compat.tvm.cuda(0).exist)
    assert resolve_target('{"kind": "cuda", "arch": "sm_90"}').target.export()["arch"] == "sm_90"
    with pytest.raises(ValueError, match="sm_61 or newer"):
        resolve_target({"kind": "cuda", "arch": "sm_52"})
    with pytest.raises(ValueError, match="not a CUDA architecture"):
        resolve_target({"kind": "cuda", "arch": "ampere"})


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quantize_cli_target_cuda(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig.deit_tiny(img_size=32, patch=4, depth=1, num_classes=10))
    path = tmp_path / "vit.onnx"
    onnx.save(export_torch(model, (torch.randn(2, 3, 32, 32),)), path)
    np.savez(tmp_path / "calib.npz", images=np.random.default_rng(0).standard_normal((8, 3, 32, 32), np.float32))
    out = tmp_path / "out"
    argv = [path, "--calib", tmp_path / "calib.npz", "--target", "cuda", "-o", out, "--quiet"]
    assert main([str(a) for a in argv]) == 0
    assert (out / "model.cuda.so").stat().st_size > 0
    manifest = json.loads((out / "manifest.json").read_text())
    target = manifest["target"]
    assert (target["name"], target["library"], target["tvm_target"]["kind"]) == ("cuda", "model.cuda.so", "cuda")
    assert "model.cuda.so" in manifest["files"]
    has_gpu = bool(compat.tvm.cuda(0).exist)
    assert target["check"]["ran"] is has_gpu
    if has_gpu:
        assert target["check"]["result"] == "bit-exact with onnxruntime"
    else:
        assert "no CUDA device" in target["check"]["reason"]
    if not has_gpu:  # intq.load names the problem instead of failing inside TVM's CUDA runtime
        import intq
        from intq.runtime import ArtifactError

        with pytest.raises(ArtifactError, match="no CUDA device"):
            intq.load(out)
