"""The x86 plan of ``IntMatMul`` / ``IntMatMulAcc`` (``batch_matmul.x86_matmul``) keeps every bit, on each dot.

Each kernel is built as the pipeline builds it (a single-op ONNX model,
``import_onnx``), written with one of the dot instructions of
``x86_matmul_intrin`` (``avx2_i16`` for an AVX2-only CPU, ``x86-64-v3``;
``avx512vnni_u8`` and ``avx512vnni_i16`` for ``znver4``, run where the host
has AVX-512 VNNI), compiled, and run at several values of its symbolic dims
through one compiled module.  The output must equal onnxruntime's and a
numpy int64 reference exactly.  The integers are adversarial: random with a
quarter at -128 / 127 in both operands (``-128`` is what the linears'
``vpsignb`` trick cannot take in ``b``; ``a + 128`` is the unsigned byte at
its top), and, at the converter's longest reduction ``K = MAX_K``, whole rows
and columns of -128 and 127, where ``sum (a + 128) b`` leaves int32 and only
the wrapping of ``vpdpbusd`` brings the biased plan back to the exact sum.
``K`` runs through lengths that are not multiples of the dot's group (63,
197, 29, 1) and ``N`` through ragged last blocks (masked stores).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from intq.passes import compat
from intq.passes.onnx_import import import_onnx
from intq.passes.ops.matmul import MAX_K
from intq.passes.schedules import SCHEDULE_ATTR, ScheduleKernels
from intq.passes.schedules.batch_matmul import match_matmul, schedule_matmul, x86_matmul
from intq.passes.schedules.x86_matmul_intrin import AVX2_I16, VNNI_I16, VNNI_U8, matmul_dot
from intq.quantizer.ops.linear import IntLinearAcc
from intq.quantizer.ops.matmul import IntMatMul, IntMatMulAcc
from intq.quantizer.ops.onnx_fn import single_op_model

AVX2 = {"kind": "llvm", "mcpu": "x86-64-v3"}  # AVX2, no AVX-512
VNNI = {"kind": "llvm", "mcpu": "znver4"}  # AVX-512 F/BW/VL and VNNI
HOST = compat.host_target()
needs_vnni = pytest.mark.skipif(
    not compat.tvm.target.codegen.llvm_cpu_has_features(["avx512vnni", "avx512bw", "avx512vl"], HOST),
    reason="this CPU has no AVX-512 VNNI to run the kernels",
)
DOTS = [
    pytest.param(AVX2_I16, AVX2, id="avx2_i16"),
    pytest.param(VNNI_U8, VNNI, marks=needs_vnni, id="vnni_u8"),
    pytest.param(VNNI_I16, VNNI, marks=needs_vnni, id="vnni_i16"),
]

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:Field 'shape' of 'type' is required:UserWarning",
        "ignore:Renaming name:UserWarning",
        "ignore:Input .* has unknown dimension shapes:UserWarning",
    ),
    pytest.mark.skipif(
        not compat.tvm.target.codegen.llvm_cpu_has_features(["avx2"], HOST),
        reason="the kernels need an AVX2 x86 CPU to run",
    ),
]


def symbolic(model: onnx.ModelProto, dims: dict[str, dict[int, str]]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in out.graph.input:
        for axis, name in dims.get(value.name, {}).items():
            value.type.tensor_type.shape.dim[axis].dim_param = name
    return out


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def reference(a: np.ndarray, b: np.ndarray, op) -> np.ndarray:
    """numpy int64: ``a @ b`` (batch dims broadcast), and for IntMatMul its requantize."""
    acc = np.matmul(a.astype(np.int64), b.astype(np.int64))
    if isinstance(op, IntMatMulAcc):
        return acc.astype(np.int32)
    m, s = int(op.m), int(op.s)
    return np.clip((acc * m + (1 << (s - 1))) >> s, -128, 127).astype(np.int8)


def int8s(rng, shape) -> np.ndarray:
    """Random int8 with a quarter of the entries at the extremes -128 / 127."""
    x = rng.integers(-128, 127, size=shape, endpoint=True)
    extreme = rng.random(shape) < 0.25
    x[extreme] = rng.choice([-128, 127], size=int(extreme.sum()))
    return x.astype(np.int8)


def compiled(model: onnx.ModelProto, dot, target):
    """The model's kernel written with ``dot``, in its module, compiled for ``target``: ``(vm, kernel TIR)``."""
    mod = import_onnx(model)
    (gv,) = [gv for gv in mod.get_global_vars() if isinstance(mod[gv], compat.tirx.PrimFunc)]
    kernel = x86_matmul(mod[gv], dot)
    assert isinstance(kernel, compat.tirx.PrimFunc), kernel
    mod.update_func(gv, kernel)
    executable = compat.build(mod, compat.make_target(target))
    return compat.VirtualMachine(executable, compat.tvm.cpu(0)), kernel


def assert_exact(vm, model, op, feeds_list) -> list[np.ndarray]:
    outputs = []
    for feeds in feeds_list:
        got = vm["main"](*(compat.tvm.runtime.tensor(feeds[name]) for name in ("a", "b"))).numpy()
        want = ort_run(model, feeds)
        assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
        shapes = {name: value.shape for name, value in feeds.items()}
        np.testing.assert_array_equal(got, want, err_msg=f"against onnxruntime, {shapes}")
        np.testing.assert_array_equal(got, reference(feeds["a"], feeds["b"], op), err_msg=f"against numpy, {shapes}")
        outputs.append(got)
    return outputs


SEQ_QK = {"a": {0: "b", 2: "s"}, "b": {0: "b", 3: "s"}}  # Q @ K^T: M and N are the sequence
SEQ_PV = {"a": {0: "b", 2: "s", 3: "s"}, "b": {0: "b", 2: "s"}}  # P @ V: M and K are the sequence


def qk(heads: int, d: int, runs) -> tuple:
    """``Q @ K^T`` ``[b, heads, s, d] x [b, heads, d, s]`` with ``b``, ``s`` symbolic, run at each ``(b, s)``."""
    shapes = [((b, heads, s, d), (b, heads, d, s)) for b, s in runs]
    return (1, heads, 5, d), (1, heads, d, 5), SEQ_QK, shapes


def pv(heads: int, d: int, runs) -> tuple:
    """``P @ V`` ``[b, heads, s, s] x [b, heads, s, d]``: ``K`` is the symbolic sequence."""
    shapes = [((b, heads, s, s), (b, heads, s, d)) for b, s in runs]
    return (1, heads, 5, 5), (1, heads, 5, d), SEQ_PV, shapes


def static(a: tuple, b: tuple) -> tuple:
    return a, b, {}, [(a, b)]


CASES = {
    # name: (example a, example b, symbolic dims, the (a, b) shapes run)
    "qk_head64_symbolic": qk(3, 64, [(1, 1), (2, 29), (1, 197)]),
    "qk_head32_symbolic": qk(4, 32, [(1, 17), (2, 48)]),
    "pv_head64_symbolic_k": pv(3, 64, [(1, 1), (1, 29), (2, 63), (1, 197)]),
    "pv_head24_symbolic_k": pv(2, 24, [(3, 2), (1, 63)]),
    "k63_static": static((1, 2, 7, 63), (1, 2, 63, 33)),
    "k197_static_deit_pv": static((1, 3, 197, 197), (1, 3, 197, 64)),
    "broadcast_batch": static((2, 1, 5, 9), (1, 3, 9, 20)),
    "symbolic_batch_against_one": (
        (2, 1, 4, 6),
        (1, 3, 6, 5),
        {"a": {0: "n"}},
        [((n, 1, 4, 6), (1, 3, 6, 5)) for n in (1, 3)],
    ),
    "matrix": static((7, 9), (9, 4)),
}


@pytest.mark.parametrize(("dot", "target"), DOTS)
@pytest.mark.parametrize("acc", [False, True], ids=["IntMatMul", "IntMatMulAcc"])
@pytest.mark.parametrize("case", list(CASES))
def test_plan_equals_onnxruntime_and_numpy(case, acc, dot, target):
    a_example, b_example, dims, runs = CASES[case]
    k = max(a[-1] for a, _ in runs)
    op = IntMatMulAcc() if acc else IntMatMul(60 / (np.sqrt(k) * 85**2))  # |y| ~ 60 in one sigma: both clamps engage
    model = symbolic(single_op_model(op, [np.zeros(a_example, np.int8), np.zeros(b_example, np.int8)]), dims)
    vm, _ = compiled(model, dot, target)
    rng = np.random.default_rng(7)
    outputs = assert_exact(vm, model, op, [{"a": int8s(rng, a), "b": int8s(rng, b)} for a, b in runs])
    if not acc:
        values = np.concatenate([y.reshape(-1) for y in outputs])
        assert values.min() == -128 and values.max() == 127 and len(np.unique(values)) > min(100, values.size // 2)


@pytest.mark.parametrize(("dot", "target"), DOTS)
def test_extremes_at_the_longest_reduction(dot, target):
    """``K = MAX_K``: acc reaches ``K * 2**14`` (-128 * -128) and ``-K * 128 * 127``; ``(a + 128) b`` wraps."""
    k = MAX_K
    rows = [np.full(k, -128), np.full(k, 127), np.resize([-128, 127], k), np.zeros(k)]
    cols = [np.full(k, -128), np.full(k, 127), np.resize([127, -128], k), np.full(k, -128), np.ones(k)]
    a = np.stack(rows).astype(np.int8)[None]  # [1, 4, K]
    b = np.stack(cols, 1).astype(np.int8)[None]  # [1, K, 5]
    model = single_op_model(IntMatMulAcc(), [a, b])
    vm, _ = compiled(model, dot, target)
    (acc,) = assert_exact(vm, model, IntMatMulAcc(), [{"a": a, "b": b}])
    assert acc.max() == k * 2**14 and acc.min() == -k * 128 * 127
    sum_biased = (a[0].astype(np.int64) + 128) @ b[0].astype(np.int64)
    assert sum_biased.min() < -(2**31)  # the biased plan's partial sums leave int32 here


def test_requantize_params_as_buffers_and_ragged_columns():
    """IntMatMul with ``m``, ``s`` fed per run (the epilogue reads them), ``N`` symbolic with a ragged last block."""
    shape_a, shape_b = (1, 2, 5, 40), (1, 2, 40, 5)
    model = symbolic(single_op_model(IntMatMul(1e-3), [np.zeros(shape_a, np.int8), np.zeros(shape_b, np.int8)]), SEQ_QK)
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, onnx.TensorProto.INT64, [1]))
    del model.graph.initializer[:]
    mod = import_onnx(model)
    (gv,) = [gv for gv in mod.get_global_vars() if isinstance(mod[gv], compat.tirx.PrimFunc)]
    mod.update_func(gv, x86_matmul(mod[gv], AVX2_I16))
    vm = compat.VirtualMachine(compat.build(mod, compat.make_target(AVX2)), compat.tvm.cpu(0))
    rng = np.random.default_rng(11)
    for ratio, seq in ((2.0**-14, 13), (-7.7e-4, 21), (0.5, 3)):
        op = IntMatMul(ratio)
        a, b = int8s(rng, (1, 2, seq, 40)), int8s(rng, (1, 2, 40, seq))
        params = {name: np.asarray(getattr(op, name)).reshape(1).astype(np.int64) for name in ("m", "s")}
        got = vm["main"](*(compat.tvm.runtime.tensor(x) for x in (a, b, params["m"], params["s"]))).numpy()
        np.testing.assert_array_equal(got, ort_run(model, {"a": a, "b": b, **params}))
        np.testing.assert_array_equal(got, reference(a, b, op))


# --- which plan, which instructions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "intrinsic"),
    [(AVX2, "llvm.x86.avx2.pmadd.wd"), (VNNI, "llvm.x86.avx512.vpdpbusd.512")],
    ids=["avx2", "vnni"],
)
def test_schedule_kernels_takes_the_plan_of_the_target(target, intrinsic):
    example = [np.zeros((1, 3, 5, 64), np.int8), np.zeros((1, 3, 64, 5), np.int8)]
    model = symbolic(single_op_model(IntMatMulAcc(), example), SEQ_QK)
    schedule = ScheduleKernels(compat.make_target(target))
    mod = schedule(import_onnx(model))
    (name,) = schedule.scheduled
    func = mod[name]
    assert func.attrs[SCHEDULE_ATTR] == "schedule_matmul" and intrinsic in func.script()
    asm = compat.build(mod, compat.make_target(target)).mod.imports[0].inspect_source("asm")
    instruction = "vpdpbusd" if target is VNNI else "vpmaddwd"
    assert instruction in asm and "vpmaddubsw" not in asm  # never the saturating pair sum


@pytest.mark.parametrize(
    "target",
    [{"kind": "llvm", "mcpu": "x86-64"}, {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}],
    ids=["x86-64-sse2", "aarch64"],
)
def test_other_cpus_keep_the_generic_plans(target):
    """No AVX2 (nor VNNI): ``matmul_dot`` says why, and the kernel gets ``schedule_batch_matmul``'s plans."""
    tgt = compat.make_target(target)
    assert isinstance(matmul_dot(tgt), str)
    model = single_op_model(IntMatMul(1e-3), [np.zeros((2, 5, 32), np.int8), np.zeros((2, 32, 16), np.int8)])
    mod = import_onnx(model)
    (gv,) = [gv for gv in mod.get_global_vars() if isinstance(mod[gv], compat.tirx.PrimFunc)]
    script = schedule_matmul(mod[gv], tgt).script()
    assert "llvm.x86" not in script and "T.parallel(" in script and "T.vectorized(" in script


def test_matmul_dot_by_target_features():
    assert matmul_dot(compat.make_target(VNNI)) is VNNI_U8
    assert matmul_dot(compat.make_target(AVX2)) is AVX2_I16
    assert matmul_dot(compat.make_target({"kind": "llvm", "mcpu": "skylake-avx512"})) is AVX2_I16  # no VNNI


def test_a_linear_kernel_is_not_a_matmul():
    rng = np.random.default_rng(0)
    op = IntLinearAcc(rng.integers(-127, 127, (8, 16)), np.zeros(8, np.int64))
    mod = import_onnx(single_op_model(op, [np.zeros((3, 16), np.int8)]))
    (gv,) = [gv for gv in mod.get_global_vars() if isinstance(mod[gv], compat.tirx.PrimFunc)]
    reason = match_matmul(mod[gv])
    assert isinstance(reason, str) and "b[..., k, j]" in reason


def test_a_tile_beyond_the_registers_is_refused():
    mod = import_onnx(single_op_model(IntMatMulAcc(), [np.zeros((4, 8), np.int8), np.zeros((8, 64), np.int8)]))
    (gv,) = [gv for gv in mod.get_global_vars() if isinstance(mod[gv], compat.tirx.PrimFunc)]
    with pytest.raises(ValueError, match=r"a 6 x 3 tile of accumulators.* need 23 of the 16 vector registers"):
        x86_matmul(mod[gv], AVX2_I16, tile=(6, 3))
