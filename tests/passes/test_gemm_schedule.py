"""The x86 GEMM schedules: scheduled linear kernels equal onnxruntime bit for bit, and run the dot they claim.

Every model is compiled for an AVX2-only CPU (``znver3``) after
``ScheduleKernels``, and the bit-exact cases again for an AVX-512 VNNI CPU
(``znver4``: ``vpdpbusd`` on activations offset by 128, ``VNNI`` below,
run where the host has VNNI); onnxruntime runs the ``intq`` ONNX
function (``MatMulInteger`` and the integer requantize) on the same inputs.
The integers are adversarial for the ``vpmaddubsw`` trick: rows of -128
(``|a| = 128``, the unsigned operand at its top), weights of +-127 (pair sums
at the ``32512`` bound), alternating signs, zeros (``vpsignb`` zeroes
``w``), and random extremes.  ``K`` covers multiples of 4 (768, 1536) and odd
lengths (197, 100 is a multiple of 4 but not of 16); ``M`` (batch x
sequence, symbolic) runs at 1, 7 and 197 through one compiled module.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from intq.passes import compat
from intq.passes.onnx_import import import_onnx
from intq.passes.pipeline import compile_onnx
from intq.passes.schedules import SCHEDULE_ATTR, SCHEDULES, ScheduleKernels, schedule_with
from intq.passes.schedules.gemm import (
    MAX_OFFSET_K,
    SCHEDULE_NAME,
    X86_AVX2,
    X86_VNNI,
    Tiles,
    dot_intrinsic,
    match_linear,
    pack_weight,
)
from intq.quantizer.ops.add import IntAdd
from intq.quantizer.ops.base import ONNX_OPSET
from intq.quantizer.ops.linear import IntLinear, IntLinear16, IntLinearAcc
from intq.quantizer.ops.matmul import IntMatMul
from intq.quantizer.ops.onnx_fn import single_op_model
from intq.quantizer.ops.requantize import Requantize

TARGET = {"kind": "llvm", "mcpu": "znver3"}  # AVX2 and FMA, no AVX-512: the Zen 3 the artifacts run on
VNNI = {"kind": "llvm", "mcpu": "znver4"}  # AVX-512 F/BW/VL and VNNI
HOST_HAS_VNNI = compat.tvm.target.codegen.llvm_cpu_has_features(["avx512vnni", "avx512vl"], compat.host_target())
needs_vnni = pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI to run the kernels")
BOTH = [TARGET, pytest.param(VNNI, marks=needs_vnni, id="vnni")]

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:Field 'shape' of 'type' is required:UserWarning",
        "ignore:Renaming name:UserWarning",
        "ignore:Input .* has unknown dimension shapes:UserWarning",
    ),
    pytest.mark.skipif(
        not compat.tvm.target.codegen.llvm_cpu_has_features(["avx2"], compat.host_target()),
        reason="the scheduled kernels need an AVX2 CPU to run",
    ),
]


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def symbolic_rows(model: onnx.ModelProto, names: tuple[str, ...] = ("x",)) -> onnx.ModelProto:
    """``model`` with the leading dims of the inputs ``names`` renamed to ``batch``, ``seq``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in out.graph.input:
        if value.name in names:
            dims = value.type.tensor_type.shape.dim
            for dim, symbol in zip(dims[:-1], ("batch", "seq"), strict=False):
                dim.dim_param = symbol
    return out


def activations(rng, shape) -> np.ndarray:
    """int8 rows of -128, of 127, alternating -128/127, zeros, then random with a third at the extremes."""
    k = shape[-1]
    x = rng.integers(-128, 127, size=shape, endpoint=True).reshape(-1, k)
    extreme = rng.random(x.shape) < 0.33
    x[extreme] = rng.choice([-128, 127], size=int(extreme.sum()))
    patterns = [np.full(k, -128), np.full(k, 127), np.resize([-128, 127], k), np.zeros(k)]
    for row, pattern in zip(range(x.shape[0]), patterns, strict=False):
        x[row] = pattern
    return x.reshape(shape).astype(np.int8)


def weights(rng, n: int, k: int) -> np.ndarray:
    """int8 [n, k] in [-127, 127]: rows of +127, -127, alternating +-127, then random with extremes."""
    w = rng.integers(-127, 127, size=(n, k), endpoint=True)
    extreme = rng.random(w.shape) < 0.33
    w[extreme] = rng.choice([-127, 127], size=int(extreme.sum()))
    w[:3] = [np.full(k, 127), np.full(k, -127), np.resize([127, -127], k)]
    return w.astype(np.int8)


def make_op(cls, rng, n: int, k: int):
    w, b = weights(rng, n, k), rng.integers(-(2**20), 2**20, n)
    if cls is IntLinearAcc:
        return cls(w, b)
    bound = k * 128 * 127
    ratio = rng.uniform(0.5, 8.0, n) * cls.qmax / bound  # |y| from a few to beyond qmax: both clamps engage
    ratio[::5] *= -1
    return cls(w, b, ratio)


def compile_scheduled(model: onnx.ModelProto, expect_scheduled: int = 1, target=TARGET):
    """Import, schedule for ``target`` and build ``model``: ``(executable, vm, the pass)``."""
    schedule = ScheduleKernels(compat.make_target(target))
    mod = schedule(import_onnx(model))
    assert len(schedule.scheduled) == expect_scheduled, (schedule.scheduled, schedule.skipped)
    executable = compat.build(mod, compat.make_target(target))
    return executable, compat.VirtualMachine(executable, compat.tvm.cpu(0)), schedule


def run_vm(vm, *arrays: np.ndarray) -> np.ndarray:
    return vm["main"](*(compat.tvm.runtime.tensor(a) for a in arrays)).numpy()


# --- bit-exact against onnxruntime -----------------------------------------------------------------

CASES = {
    "IntLinear-K768": (IntLinear, 768, 96),
    "IntLinear16-K768": (IntLinear16, 768, 96),
    "IntLinearAcc-K768": (IntLinearAcc, 768, 96),
    "IntLinear-K197": (IntLinear, 197, 40),  # K % 4 != 0; N not a multiple of the 48-channel tile
    "IntLinear16-K1536": (IntLinear16, 1536, 48),
    "IntLinearAcc-K100": (IntLinearAcc, 100, 56),  # K % 16 != 0
}


@pytest.mark.parametrize("target", BOTH)
@pytest.mark.parametrize("case", list(CASES))
def test_symbolic_rows_equal_onnxruntime(case, target):
    """One module, x [batch, seq, K], run at M = 1, 7, 197 (and 2 x 5): every output equals onnxruntime's."""
    cls, k, n = CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    model = symbolic_rows(single_op_model(make_op(cls, rng, n, k), [np.zeros((1, 3, k), np.int8)]))
    _, vm, _ = compile_scheduled(model, target=target)
    for shape in [(1, 1), (1, 7), (1, 197), (2, 5)]:
        x = activations(rng, (*shape, k))
        want = ort_run(model, {"x": x})
        got = run_vm(vm, x)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=f"{case} at rows {shape}")


@pytest.mark.parametrize("target", BOTH)
def test_static_matrix_input_equals_onnxruntime(target):
    """x [197, 768] (rank 2, no reshape around the kernel), all -128 against all +-127 included."""
    rng = np.random.default_rng(7)
    op = make_op(IntLinear, rng, 144, 768)
    x = activations(rng, (197, 768))
    model = single_op_model(op, [x])
    _, vm, _ = compile_scheduled(model, target=target)
    np.testing.assert_array_equal(run_vm(vm, x), ort_run(model, {"x": x}))


@pytest.mark.parametrize("target", BOTH)
def test_accumulator_extremes_with_K1536(target):
    """acc = +-1536 * 128 * 127 (every product at its bound, one sign) and the alternating cancellations."""
    k = 1536
    x = np.stack([np.full(k, -128), np.full(k, 127), np.resize([-128, 127], k)]).astype(np.int8)[None]
    w = np.stack([np.full(k, 127), np.full(k, -127), np.resize([127, -127], k)] * 16).astype(np.int8)
    op = IntLinearAcc(w, np.zeros(48, np.int64))
    model = symbolic_rows(single_op_model(op, [x]))
    _, vm, _ = compile_scheduled(model, target=target)
    got = run_vm(vm, x)
    np.testing.assert_array_equal(got, ort_run(model, {"x": x}))
    assert got.min() == -k * 128 * 127 and got.max() == k * 128 * 127


# --- the generated code ----------------------------------------------------------------------------


def test_assembly_uses_the_avx2_int8_dot():
    rng = np.random.default_rng(3)
    model = symbolic_rows(single_op_model(make_op(IntLinear, rng, 48, 64), [np.zeros((1, 3, 64), np.int8)]))
    executable, _, schedule = compile_scheduled(model)
    assert schedule.scheduled == {"intq_intlinear": "gemm"}
    asm = executable.mod.imports[0].inspect_source("asm")
    for instruction in ("vpmaddubsw", "vpmaddwd", "vpsignb"):
        assert instruction in asm, instruction
    assert "zmm" not in asm  # AVX2 only


@needs_vnni
def test_vnni_assembly_and_minus_128_weights():
    """On VNNI: one vpdpbusd per 32 products, no vpmaddubsw; -128 weights (x86 AVX2 refuses them) are exact."""
    rng = np.random.default_rng(13)
    w = weights(rng, 40, 200)
    w[5:9] = -128  # whole rows at -128: sum_k w at its most negative
    w[9, ::3] = -128
    op = IntLinearAcc(w, rng.integers(-(2**20), 2**20, 40))
    model = symbolic_rows(single_op_model(op, [np.zeros((1, 3, 200), np.int8)]))
    executable, vm, schedule = compile_scheduled(model, target=VNNI)
    asm = executable.mod.imports[0].inspect_source("asm")
    assert "vpdpbusd" in asm and "vpmaddubsw" not in asm
    for rows in (1, 6, 33):
        x = activations(rng, (1, rows, 200))
        np.testing.assert_array_equal(run_vm(vm, x), ort_run(model, {"x": x}), err_msg=f"rows {rows}")


def test_dot_intrinsic_by_target_features():
    assert dot_intrinsic(compat.make_target(VNNI)) is X86_VNNI
    assert dot_intrinsic(compat.make_target(TARGET)) is X86_AVX2
    assert dot_intrinsic(compat.make_target({"kind": "llvm", "mcpu": "skylake-avx512"})) is X86_AVX2  # no VNNI


@needs_vnni
def test_vnni_falls_back_to_avx2_when_the_offset_sum_could_wrap():
    """K > MAX_OFFSET_K: sum_k (x + 128) w could leave int32, so the AVX2 dot (no offset) is used, still exact."""
    k = MAX_OFFSET_K + 4
    rng = np.random.default_rng(14)
    w = np.resize([127, -127, 5], (8, k)).astype(np.int8)
    op = IntLinearAcc(w, np.zeros(8, np.int64))
    model = single_op_model(op, [np.zeros((2, k), np.int8)])
    executable, vm, _ = compile_scheduled(model, target=VNNI)
    asm = executable.mod.imports[0].inspect_source("asm")
    assert "vpmaddubsw" in asm and "vpdpbusd" not in asm
    x = rng.integers(-128, 127, (2, k), endpoint=True).astype(np.int8)
    np.testing.assert_array_equal(run_vm(vm, x), ort_run(model, {"x": x}))


def residual_model(rng, k: int, n: int) -> onnx.ModelProto:
    """``y = IntAdd(r, IntLinear16(x))``: the residual connection that FuseResidualEpilogue makes one kernel."""
    lin = make_op(IntLinear16, rng, n, k)
    add = IntAdd(0.5, 0.75)
    params = {f"lin_{name}": value for name, value in lin.params().items()}
    params.update({f"add_{name}": value for name, value in add.params().items()})
    nodes = [
        helper.make_node("IntLinear16", ["x", *[f"lin_{p}" for p in lin.params()]], ["h"], domain="intq"),
        helper.make_node("IntAdd", ["r", "h", *[f"add_{p}" for p in add.params()]], ["y"], domain="intq"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.INT8, ["batch", "seq", k]),
        helper.make_tensor_value_info("r", TensorProto.INT16, ["batch", "seq", n]),
    ]
    inits = [numpy_helper.from_array(np.asarray(v), name) for name, v in params.items()]
    graph = helper.make_graph(
        nodes, "residual", inputs, [helper.make_tensor_value_info("y", TensorProto.INT16, None)], inits
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid("intq", 1)],
        functions=[IntLinear16.function_proto(), IntAdd.function_proto()],
    )


def test_compile_onnx_schedules_the_fused_residual_linear():
    """Through the pipeline: the IntLinear16+IntAdd kernel is scheduled, TVM's pipeline keeps vpmaddubsw."""
    rng = np.random.default_rng(11)
    model = residual_model(rng, 384, 96)
    compiled = compile_onnx(model, TARGET)
    asm = compiled.executable.mod.imports[0].inspect_source("asm")
    assert "vpmaddubsw" in asm
    vm = compat.VirtualMachine(compiled.executable, compat.tvm.cpu(0))
    for rows in (1, 9):
        x = activations(rng, (1, rows, 384))
        r = rng.integers(-32768, 32767, (1, rows, 96), endpoint=True).astype(np.int16)
        np.testing.assert_array_equal(run_vm(vm, x, r), ort_run(model, {"x": x, "r": r}))


# --- what the schedule leaves alone ----------------------------------------------------------------


def test_weight_with_minus_128_is_left_unscheduled_and_exact():
    rng = np.random.default_rng(5)
    w = weights(rng, 8, 16)
    w[2, 3] = -128
    op = IntLinearAcc(w, np.zeros(8, np.int64))
    model = single_op_model(op, [np.zeros((3, 16), np.int8)])
    _, vm, schedule = compile_scheduled(model, expect_scheduled=0)
    assert "-128" in schedule.skipped["intq_linear_acc"]
    x = activations(rng, (3, 16))
    np.testing.assert_array_equal(run_vm(vm, x), ort_run(model, {"x": x}))


@pytest.mark.parametrize(
    ("target", "reason"),
    [({"kind": "llvm", "mcpu": "x86-64"}, "no AVX2"), ({"kind": "c"}, None)],
)
def test_target_without_avx2_leaves_the_module_unchanged(target, reason):
    rng = np.random.default_rng(6)
    mod = import_onnx(single_op_model(make_op(IntLinear, rng, 8, 16), [np.zeros((3, 16), np.int8)]))
    schedule = ScheduleKernels(compat.make_target(target))
    out = schedule(mod)
    assert schedule.scheduled == {}
    assert (reason in schedule.skipped["intq_intlinear"]) if reason else schedule.skipped == {}
    assert [gv.name_hint for gv in out.get_global_vars()] == [gv.name_hint for gv in mod.get_global_vars()]


def test_matmul_kernel_is_not_a_linear():
    """IntMatMul reads b[k, n]: not the w[n, k] of a linear, so the GEMM schedule does not claim it."""
    a, b = np.zeros((4, 8), np.int8), np.zeros((8, 5), np.int8)
    mod = import_onnx(single_op_model(IntMatMul(1e-2), [a, b]))
    (func,) = [f for f in mod.functions.values() if isinstance(f, compat.tirx.PrimFunc)]
    assert "w[n, k]" in match_linear(func)


def test_packed_weight_layout():
    """``w_packed[jo, ko, j, k] = w[8 jo + j, 4 ko + k]``, zero beyond N and K, N padded to the tile."""
    w = np.arange(10 * 6).reshape(10, 6).astype(np.int8)
    packed = pack_weight(w, Tiles(rows=1, col_blocks=2))
    assert packed.shape == (2, 2, 8, 4)
    assert packed[1, 1, 1, 1] == w[9, 5] and packed[0, 1, 7, 0] == w[7, 4]
    assert (packed[1, :, 2:] == 0).all() and (packed[:, 1, :, 2:] == 0).all()
    assert SCHEDULE_NAME == "x86_avx2_gemm"


def test_registry_applies_a_primfunc_schedule(monkeypatch):
    """A SCHEDULES entry made with schedule_with: the kernel is scheduled in place, tagged, and still exact."""

    def parallel_rows(sch):
        sch.parallel(sch.get_loops(sch.get_sblock("requantize"))[0])

    monkeypatch.setitem(SCHEDULES, "Requantize", schedule_with(parallel_rows))
    x = np.random.default_rng(8).integers(-(2**20), 2**20, (3, 40)).astype(np.int32)
    model = single_op_model(Requantize(3e-3), [x])
    executable, vm, schedule = compile_scheduled(model)
    assert schedule.scheduled == {"intq_requantize": "test_gemm_schedule"}
    np.testing.assert_array_equal(run_vm(vm, x), ort_run(model, {"x": x}))
    mod = ScheduleKernels(compat.make_target(TARGET))(import_onnx(model))
    (func,) = [f for f in mod.functions.values() if isinstance(f, compat.tirx.PrimFunc)]
    assert func.attrs[SCHEDULE_ATTR] == "parallel_rows" and "T.parallel" in func.script()
