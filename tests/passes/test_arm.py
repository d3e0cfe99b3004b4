"""``--target arm``: aarch64 libraries, cross-compiled, run under qemu-aarch64, equal onnxruntime bit for bit.

The libraries are the real artifacts (``passes/arm.py``: linked with
``aarch64-linux-gnu-g++``, run by the aarch64 TVM runtime under
``qemu-aarch64 -cpu max``), so the ``sdot`` GEMM's machine code is what is
checked.  The toolchain comes from ``.ci/setup_arm.sh``; without it these
tests fail and say so (they do not skip).

The single-op integers are adversarial for the GEMM: rows of -128 and 127,
alternating signs, zeros, weights of +-127 and -128 (which the AVX2 path
refuses and ``sdot`` takes), ``K`` not a multiple of 4 or 16, ``N`` not a
multiple of the 16-channel tile, ``M`` (symbolic) at 1 and 7 through one
library.  The models are small (a 2-block, width-64 DeiT-shaped ViT on
32x32 images) so that qemu's part stays a few seconds.
"""

from __future__ import annotations

import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import intq
from intq.models.vit import VisionTransformer, ViTConfig
from intq.passes import arm, compat
from intq.passes.fuse_requantize_epilogue import FuseRequantizeEpilogue
from intq.passes.fuse_residual_epilogue import FuseResidualEpilogue
from intq.passes.onnx_import import import_onnx
from intq.passes.pipeline import compile_onnx
from intq.passes.schedules import ScheduleKernels, kernel_op
from intq.passes.schedules.arm_int8 import LANES, REDUCE
from intq.passes.schedules.gemm import AARCH64_SDOT, Tiles, dot_intrinsic, pack_weight
from intq.passes.targets import ARM_TARGET, resolve_target
from intq.quantizer.ops.linear import IntLinear, IntLinear16, IntLinearAcc
from intq.quantizer.ops.onnx_fn import single_op_model

pytestmark = pytest.mark.filterwarnings(
    "ignore:Field 'shape' of 'type' is required:UserWarning",
    "ignore:Renaming name:UserWarning",
    "ignore:Input .* has unknown dimension shapes:UserWarning",
)

EM_AARCH64 = 183  # ELF e_machine


@pytest.fixture(scope="module")
def toolchain():
    """The cross compiler, qemu and the aarch64 TVM runtime: present, or the test fails saying what to run."""
    try:
        arm.require_toolchain()
    except arm.ArmToolchainError as e:
        pytest.fail(f"{e}", pytrace=False)


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def elf_machine(path) -> int:
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(head[18:20], "little")


def build_arm(model: onnx.ModelProto, tmp_path, name: str = "model"):
    """``compile_onnx`` for arm, exported: ``(Compiled, library path)``."""
    compiled = compile_onnx(model, "arm")
    library = tmp_path / f"{name}.arm.so"
    compiled.export(str(library))
    assert elf_machine(library) == EM_AARCH64
    return compiled, library


# --- the target ------------------------------------------------------------------------------------


def test_arm_target_is_aarch64_with_dotprod_and_cross_compiled():
    spec = resolve_target("arm")
    assert spec.name == "arm" and not spec.runs_here
    assert spec.target.attrs["mtriple"] == "aarch64-linux-gnu"
    assert compat.tvm.target.codegen.target_has_features("dotprod", spec.target)
    assert dot_intrinsic(spec.target) is AARCH64_SDOT
    # a TVM JSON dict for aarch64 is the arm target too (cross-compiled, not run in-process)
    custom = resolve_target({**ARM_TARGET, "mcpu": "cortex-a76"})
    assert custom.name == "arm" and not custom.runs_here and custom.target.attrs["mcpu"] == "cortex-a76"


def test_aarch64_without_dotprod_leaves_the_linear_unscheduled():
    rng = np.random.default_rng(0)
    model = single_op_model(IntLinearAcc(weights(rng, 8, 16), np.zeros(8, np.int64)), [np.zeros((3, 16), np.int8)])
    schedule = ScheduleKernels(compat.make_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}))
    schedule(import_onnx(model))
    assert "gemm" not in schedule.scheduled.values()
    assert "+dotprod" in schedule.skipped["intq_linear_acc"]


def test_sdot_packed_weight_layout():
    """``w_packed[jo, ko, j, k] = w[4 jo + j, 4 ko + k]``: one sdot's 16 weight bytes are contiguous."""
    w = np.arange(10 * 6).reshape(10, 6).astype(np.int8)
    packed = pack_weight(w, Tiles(rows=1, col_blocks=2), AARCH64_SDOT)
    assert (LANES, REDUCE) == (4, 4) and packed.shape == (4, 2, 4, 4)  # ceil(10/4)=3 blocks -> 4 (tile of 2)
    assert packed[2, 1, 1, 1] == w[9, 5] and packed[1, 0, 3, 2] == w[7, 2]
    assert (packed[2, :, 2:] == 0).all() and (packed[3] == 0).all() and (packed[:, 1, :, 2:] == 0).all()


def test_tile_that_overflows_the_neon_registers_is_refused():
    with pytest.raises(ValueError, match="32 vector registers"):
        AARCH64_SDOT.check_tiles(Tiles(rows=4, col_blocks=6))  # 24 accumulators + 4 + 6 operands


def test_runner_passes_dtypes_shapes_and_tuple_outputs(toolchain, tmp_path):
    """The runner's .npy in and out: int64 with a symbolic dim, float32, bool, uint8; a nested tuple result."""
    from tvm.script import ir as I  # noqa: N812
    from tvm.script import relax as R  # noqa: N812

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor(("n", 3), "int64"), y: R.Tensor((2,), "float32"), b: R.Tensor((4,), "bool")):
            return (R.add(x, x), (R.multiply(y, y), R.logical_not(b)), R.astype(x, "uint8"))

    library = tmp_path / "io.so"
    arm.export_library(compat.build(Module, resolve_target("arm").target), str(library))
    x = np.array([[1, -2, 3], [2**40, 0, -(2**40)]], np.int64)
    y, b = np.array([1.5, -3.0], np.float32), np.array([True, False, False, True])
    got = arm.run_under_qemu(library, [x, y, b])
    want = [x + x, y * y, ~b, x.astype(np.uint8)]
    assert [(g.dtype, g.shape) for g in got] == [(w.dtype, w.shape) for w in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


# --- the sdot GEMM under qemu -----------------------------------------------------------------------


def activations(rng, shape) -> np.ndarray:
    """int8 rows of -128, of 127, alternating -128/127, zeros, then random with a third at the extremes."""
    k = shape[-1]
    x = rng.integers(-128, 127, size=shape, endpoint=True).reshape(-1, k)
    extreme = rng.random(x.shape) < 0.33
    x[extreme] = rng.choice([-128, 127], size=int(extreme.sum()))
    for row, pattern in zip(range(x.shape[0]), [[-128], [127], [-128, 127], [0]], strict=False):
        x[row] = np.resize(pattern, k)
    return x.reshape(shape).astype(np.int8)


def weights(rng, n: int, k: int) -> np.ndarray:
    """int8 [n, k] over the full range: rows of -128, +127, alternating, then random with extremes."""
    w = rng.integers(-128, 127, size=(n, k), endpoint=True)
    extreme = rng.random(w.shape) < 0.33
    w[extreme] = rng.choice([-128, 127], size=int(extreme.sum()))
    w[:3] = [np.full(k, -128), np.full(k, 127), np.resize([127, -128], k)]
    return w.astype(np.int8)


def linear_model(cls, rng, n: int, k: int) -> onnx.ModelProto:
    """A one-op model of ``cls`` whose input ``x`` is ``[rows, K]`` with ``rows`` symbolic."""
    w, b = weights(rng, n, k), rng.integers(-(2**20), 2**20, n)
    if cls is IntLinearAcc:
        op = cls(w, b)
    else:
        ratio = rng.uniform(0.5, 8.0, n) * cls.qmax / (k * 128 * 128)  # |y| from a few to beyond qmax
        ratio[::5] *= -1
        op = cls(w, b, ratio)
    model = single_op_model(op, [np.zeros((1, k), np.int8)])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "rows"
    return model


@pytest.mark.parametrize(
    ("cls", "k", "n"),
    [(IntLinear, 197, 40), (IntLinear16, 64, 48), (IntLinearAcc, 100, 20)],
    ids=["IntLinear-K197-N40", "IntLinear16-K64-N48", "IntLinearAcc-K100-N20"],
)
def test_sdot_gemm_equals_onnxruntime_under_qemu(toolchain, tmp_path, cls, k, n):
    rng = np.random.default_rng(k)
    model = linear_model(cls, rng, n, k)
    schedule = ScheduleKernels(resolve_target("arm").target)
    schedule(import_onnx(model))
    assert list(schedule.scheduled.values()) == ["gemm"], schedule.skipped  # -128 weights included
    _, library = build_arm(model, tmp_path)
    for rows in (1, 7):
        x = activations(rng, (rows, k))
        (got,) = arm.run_under_qemu(library, [x])
        np.testing.assert_array_equal(got, ort_run(model, {"x": x})[0])


def test_assembly_uses_sdot(toolchain, tmp_path):
    """The linear's kernel is tensorized with sdot: in TVM's assembly and in the linked library."""
    rng = np.random.default_rng(1)
    compiled, library = build_arm(linear_model(IntLinear, rng, 32, 64), tmp_path)
    asm = compiled.executable.mod.imports[0].inspect_source("asm")
    assert "sdot\tv" in asm
    objdump = arm.CXX.replace("g++", "objdump")
    disassembly = subprocess.run([objdump, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert "sdot" in disassembly, f"no sdot in {objdump} -d {library}"


# --- a ViT end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_vit():
    """A DeiT-shaped ViT (2 blocks, width 64, 2 heads, 32x32 images, patch 4) quantized by intq.quantize."""
    torch.manual_seed(0)
    config = ViTConfig(embed_dim=64, depth=2, heads=2, img_size=32, patch=4, num_classes=10)
    model = VisionTransformer(config).eval()
    gen = torch.Generator().manual_seed(1)
    qmodel = intq.quantize(model, [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(2)], progress=False)
    return qmodel, qmodel.to_onnx()


def test_vit_linears_all_take_the_sdot_schedule(small_vit):
    _, int_model = small_vit
    mod = FuseResidualEpilogue()(FuseRequantizeEpilogue()(import_onnx(int_model)))
    ops = {gv.name_hint: kernel_op(f) for gv, f in mod.functions.items() if kernel_op(f)}
    linears = {name for name, op in ops.items() if op.startswith("IntLinear")}
    # qkv and fc1 (IntLinear), proj and fc2 fused with the residual add (IntLinear16+IntAdd), the head (IntLinearAcc)
    assert {ops[name] for name in linears} == {"IntLinear", "IntLinear16+IntAdd", "IntLinearAcc"}, ops
    schedule = ScheduleKernels(resolve_target("arm").target)
    schedule(mod)
    assert {name: schedule.scheduled.get(name) for name in linears} == dict.fromkeys(linears, "gemm"), schedule.skipped


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_vit_arm_equals_onnxruntime_and_torch_under_qemu(toolchain, tmp_path, small_vit):
    qmodel, int_model = small_vit
    compiled, library = build_arm(int_model, tmp_path, "vit")
    gen = torch.Generator().manual_seed(2)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        got = arm.run_under_qemu(library, [x.numpy()], threads=2)
        want = ort_run(int_model, {compiled.input_names[0]: x.numpy()})
        assert len(got) == len(want) == 1
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[0], qmodel(x).numpy())


# --- ResNet-8 ---------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resnet8_arm_equals_onnxruntime_under_qemu(toolchain, tmp_path):
    from intq.models.resnet8 import load_resnet8

    gen = torch.Generator().manual_seed(3)
    calib = [torch.rand(4, 3, 32, 32, generator=gen) * 255 for _ in range(2)]
    qmodel = intq.quantize(load_resnet8(), calib, progress=False)
    int_model = qmodel.to_onnx()
    compiled, library = build_arm(int_model, tmp_path, "resnet8")
    x = torch.rand(2, 3, 32, 32, generator=gen) * 255
    (got,) = arm.run_under_qemu(library, [x.numpy()], threads=2)
    np.testing.assert_array_equal(got, ort_run(int_model, {compiled.input_names[0]: x.numpy()})[0])
    np.testing.assert_array_equal(got, qmodel(x).numpy())


# --- a missing toolchain ----------------------------------------------------------------------------


def test_missing_runtime_says_to_run_setup_arm(tmp_path, monkeypatch):
    monkeypatch.setenv("INTQ_AARCH64_HOME", str(tmp_path / "empty"))
    with pytest.raises(arm.ArmToolchainError, match=r"aarch64 TVM runtime .* run \.ci/setup_arm\.sh"):
        arm.require_toolchain()


def test_missing_qemu_names_the_package_and_setup_arm(monkeypatch):
    monkeypatch.setattr(arm, "QEMU", "qemu-aarch64-not-installed")
    with pytest.raises(arm.ArmToolchainError, match=r"qemu-aarch64-not-installed .*qemu-user.*setup_arm\.sh"):
        arm.require_toolchain()
