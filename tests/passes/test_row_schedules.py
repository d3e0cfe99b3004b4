"""The CPU schedules of the row-wise kernels and of the batched matmul keep every bit (``passes/schedules``).

Each kernel is built as the pipeline builds it (a single-op ONNX model,
``import_onnx``, its PrimFunc), scheduled, put back into the module,
compiled for AVX2 and run at two values of its symbolic dims, chosen so that
the row count is not a multiple of a task and the last dim not a multiple of
a vector; the output must equal onnxruntime's exactly on extremes, constant
rows and saturating parameters.  The scheduled TIR must hold a parallel loop.
ShiftGELU's table kernel also under its registered schedule for an
AVX-512 VBMI target: the ``vpermi2b`` gather where the last axis allows it
(checked in the TIR and the assembly on any host), run where the host has
VBMI.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from intq.passes import compat
from intq.passes.build import build, run
from intq.passes.onnx_import import import_onnx
from intq.passes.schedules.batch_matmul import schedule_batch_matmul
from intq.passes.schedules.rows import (
    schedule_add,
    schedule_layernorm,
    schedule_requantize,
    schedule_shiftgelu,
    schedule_shiftgelu_kernel,
    schedule_shiftmax,
)
from intq.quantizer.ops.add import IntAdd
from intq.quantizer.ops.layernorm import ILayerNorm
from intq.quantizer.ops.matmul import IntMatMul, IntMatMulAcc
from intq.quantizer.ops.onnx_fn import single_op_model
from intq.quantizer.ops.requantize import Requantize
from intq.quantizer.ops.shiftgelu import ShiftGELU
from intq.quantizer.ops.shiftmax import Shiftmax

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:Field 'shape' of 'type' is required:UserWarning",
        "ignore:Renaming name:UserWarning",
        "ignore:Input .* has unknown dimension shapes:UserWarning",
    ),
    pytest.mark.skipif(
        platform.machine() not in ("x86_64", "AMD64")
        or "avx2" not in (Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""),
        reason="the schedules target AVX2 x86; this host cannot run that code",
    ),
]

AVX2 = {"kind": "llvm", "mcpu": "x86-64-v3"}
VBMI = {"kind": "llvm", "mcpu": "znver4"}  # AVX-512 with VBMI (vpermi2b)
D_2_20_SCALE = (1 + 1e-9) / (1.702 * 2**20)  # ShiftGELU's D = 2**20
HOST_HAS_VBMI = "avx512vbmi" in (Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "")
I8, I16, I32 = np.iinfo(np.int8), np.iinfo(np.int16), np.iinfo(np.int32)


def symbolic(model: onnx.ModelProto, dims: dict[str, dict[int, str]]) -> onnx.ModelProto:
    """``model`` with dim ``i`` of graph input ``name`` renamed to the symbol ``dims[name][i]``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in out.graph.input:
        for axis, symbol in dims.get(value.name, {}).items():
            value.type.tensor_type.shape.dim[axis].dim_param = symbol
    return out


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, feeds)
    return y


def scheduled(model: onnx.ModelProto, schedule: Callable[[compat.s_tir.Schedule], None]):
    """The imported module with its one kernel scheduled by ``schedule``, and that kernel's TIR."""
    mod = import_onnx(model)
    (gv,) = [gv for gv in mod.get_global_vars() if isinstance(mod[gv], compat.tirx.PrimFunc)]
    sch = compat.s_tir.Schedule(mod[gv])
    schedule(sch)
    mod.update_func(gv, sch.mod["main"])
    return mod, sch.mod["main"]


def parallel_loops(func: compat.tirx.PrimFunc) -> list[str]:
    return re.findall(r"for (\w+) in T\.parallel\(", func.script())


def assert_scheduled_equals_ort(model, schedule, feeds_list: list[dict[str, np.ndarray]], parallel: bool = True):
    """Schedule and compile ``model`` once; every feed gives onnxruntime's output exactly."""
    mod, func = scheduled(model, schedule)
    if parallel:
        assert parallel_loops(func), f"no parallel loop in the scheduled kernel:\n{func.script()}"
    runnable = build(mod, AVX2)
    outputs = []
    for feeds in feeds_list:
        want = ort_run(model, feeds)
        (got,) = run(runnable, feeds)
        assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
        np.testing.assert_array_equal(got, want)
        outputs.append(got)
    return outputs


def rows_of(table: np.ndarray, shape: tuple[int, ...], rng, info) -> np.ndarray:
    """An array of ``shape`` whose rows cycle through ``table``'s rows, every third one random over ``info``."""
    n_rows = int(np.prod(shape[:-1]))
    rows = [table[r % len(table)] for r in range(n_rows)]
    for r in range(2, n_rows, 3):
        rows[r] = rng.integers(info.min, info.max, shape[-1], endpoint=True)
    return np.stack(rows).reshape(shape).astype(info.dtype)


def edge_rows(length: int, info, step: int = 1) -> np.ndarray:
    """Rows at the dtype's extremes: constant, one-hot, alternating, halves, a ramp."""
    i = np.arange(length)
    lo, hi = int(info.min), int(info.max)
    table = [
        np.full(length, lo),
        np.full(length, hi),
        np.zeros(length),
        np.where(i == length // 3, hi, lo),
        np.where(i == length - 1, lo, hi),
        np.where(i % 2 == 0, lo, hi),
        np.where(i < length // 2, lo, hi),
        np.clip(-i * step, lo, hi),
    ]
    return np.stack(table).astype(np.int64)


# --- Shiftmax --------------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [1, 100, 1 << 20])
def test_shiftmax_symbolic_rows_and_length(D):
    model = symbolic(
        single_op_model(Shiftmax(1.0 / D), [np.zeros((2, 3, 4, 5), np.int32)]), {"x": {0: "b", 2: "q", 3: "k"}}
    )
    rng = np.random.default_rng(D)
    feeds = [
        {"x": rows_of(edge_rows(length, I32, step=max(D // 8, 1)), shape, rng, I32)}
        for shape, length in [((1, 3, 1, 1), 1), ((2, 3, 13, 197), 197)]
    ]
    assert_scheduled_equals_ort(model, schedule_shiftmax, feeds)


@pytest.mark.parametrize("length", [64, 37])
def test_shiftmax_static_length_takes_the_vectorized_path(length):
    """A static L: ``exp`` and the output are TVM-vectorized (37: the first 32, then a serial tail of 5)."""
    model = symbolic(single_op_model(Shiftmax(0.05), [np.zeros((2, 4, length), np.int8)]), {"x": {0: "b", 1: "q"}})
    assert "T.vectorized(" in scheduled(model, schedule_shiftmax)[1].script()
    rng = np.random.default_rng(0)
    feeds = [{"x": rows_of(edge_rows(length, I8), shape, rng, I8)} for shape in [(1, 1, length), (3, 11, length)]]
    assert_scheduled_equals_ort(model, schedule_shiftmax, feeds)


def test_shiftmax_single_row_is_left_serial_and_exact():
    model = single_op_model(Shiftmax(0.01), [np.zeros(37, np.int16)])
    x = np.linspace(I16.min, I16.max, 37).astype(np.int16)
    assert_scheduled_equals_ort(model, schedule_shiftmax, [{"x": x}], parallel=False)


# --- ILayerNorm ------------------------------------------------------------------------------------


def layernorm_op(channels: int, scale_out: float) -> ILayerNorm:
    rng = np.random.default_rng(channels)
    gamma, beta = rng.normal(1.0, 0.5, channels), rng.normal(0.0, 0.5, channels)
    gamma[::7] *= -1
    gamma[3::11] = 0.0
    return ILayerNorm(gamma, beta, 1e-5, 0.01, scale_out)


@pytest.mark.parametrize("channels", [200, 13])  # 200: 12 vectors of 16 and a tail of 8
@pytest.mark.parametrize("scale_out", [0.05, 1e-3], ids=["fits", "saturating"])
def test_layernorm_symbolic_rows(channels, scale_out):
    model = symbolic(
        single_op_model(layernorm_op(channels, scale_out), [np.zeros((2, 3, channels), np.int16)]),
        {"x": {0: "b", 1: "s"}},
    )
    rng = np.random.default_rng(channels)
    feeds = [
        {"x": rows_of(edge_rows(channels, I16), shape, rng, I16)} for shape in [(1, 1, channels), (2, 19, channels)]
    ]
    outputs = assert_scheduled_equals_ort(model, schedule_layernorm, feeds)
    if scale_out < 0.01:
        assert outputs[1].min() == I8.min and outputs[1].max() == I8.max


# --- elementwise -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("scale_in", "scale_out"), [(0.05, 0.03), (0.05, 1e-7)], ids=["typical", "saturating"])
def test_shiftgelu_every_int8_value(scale_in, scale_out):
    model = symbolic(
        single_op_model(ShiftGELU(scale_in, scale_out), [np.zeros((2, 3, 256), np.int8)]), {"x": {0: "b", 1: "s"}}
    )
    every = np.arange(I8.min, I8.max + 1, dtype=np.int8)
    rng = np.random.default_rng(0)
    feeds = [{"x": every.reshape(1, 1, 256)}, {"x": rows_of(np.stack([every, every[::-1]]), (3, 7, 256), rng, I8)}]
    assert_scheduled_equals_ort(model, schedule_shiftgelu, feeds)


def test_shiftgelu_formula_kernel_params_as_buffers():
    """The formula kernel (what D, m, s fed at run time leave) under the same schedule."""
    model = symbolic(single_op_model(ShiftGELU(0.05, 0.03), [np.zeros((2, 3, 256), np.int8)]), {"x": {0: "b"}})
    params = {t.name: int(onnx.numpy_helper.to_array(t)) for t in model.graph.initializer}
    for name in params:
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, [1]))
    del model.graph.initializer[:]
    mod, func = scheduled(model, schedule_shiftgelu)
    assert "lookup" not in func.script() and parallel_loops(func)
    every = np.arange(I8.min, I8.max + 1, dtype=np.int8)
    x = rows_of(np.stack([every, every[::-1]]), (2, 3, 256), np.random.default_rng(3), I8)
    feeds = {"x": x, **{k: np.array([v], np.int64) for k, v in params.items()}}
    (got,) = run(build(mod, AVX2), feeds)
    np.testing.assert_array_equal(got, ort_run(model, feeds))


def vbmi_scheduled(model: onnx.ModelProto, target: dict):
    """The imported module with its ShiftGELU kernel scheduled by ``schedule_shiftgelu_kernel`` for ``target``."""
    mod = import_onnx(model)
    (gv,) = [gv for gv in mod.get_global_vars() if isinstance(mod[gv], compat.tirx.PrimFunc)]
    func = schedule_shiftgelu_kernel(mod[gv], compat.make_target(target))
    mod.update_func(gv, func)
    return mod, func


def shiftgelu_model(channels: int) -> onnx.ModelProto:
    return symbolic(single_op_model(ShiftGELU(0.05, 0.03), [np.zeros((1, 197, channels), np.int8)]), {"x": {0: "b"}})


@pytest.mark.parametrize(
    ("channels", "target", "gathers"),
    [(768, VBMI, 12), (192, VBMI, 3), (200, VBMI, 0), (768, AVX2, 0)],
    ids=["768_vbmi", "192_vbmi", "200_not_a_multiple_of_64", "768_avx2"],
)
def test_shiftgelu_table_takes_vpermi2b_where_it_can(channels, target, gathers):
    """The table kernel gathers by ``vpermi2b`` on a VBMI target when the last axis is a multiple of 64
    (twice per 64 bytes); else it stays a loop of byte loads.  Compiles without running (any host)."""
    _, func = vbmi_scheduled(shiftgelu_model(channels), target)
    assert parallel_loops(func)
    assert func.script().count("llvm.x86.avx512.vpermi2var.qi.512") == (2 if gathers else 0)
    mod = compat.tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    asm = compat.build(mod, compat.make_target(target)).mod.inspect_source("asm")
    found = len(re.findall(r"\bvperm[it]2b\b", asm))  # LLVM may unroll the 64-byte steps
    assert found >= 2 if gathers else found == 0, found


@pytest.mark.skipif(not HOST_HAS_VBMI, reason="this host has no AVX-512 VBMI to run vpermi2b on")
@pytest.mark.parametrize(
    ("scale_in", "scale_out"), [(0.05, 0.03), (D_2_20_SCALE, 1e-9)], ids=["typical", "D_2_20_saturating"]
)
def test_shiftgelu_table_vpermi2b_every_int8_value(scale_in, scale_out):
    model = symbolic(
        single_op_model(ShiftGELU(scale_in, scale_out), [np.zeros((2, 3, 256), np.int8)]), {"x": {0: "b", 1: "s"}}
    )
    mod, func = vbmi_scheduled(model, VBMI)
    assert "vpermi2var" in func.script()
    every = np.arange(I8.min, I8.max + 1, dtype=np.int8)
    runnable = build(mod, VBMI)
    for x in (
        every.reshape(1, 1, 256),
        rows_of(np.stack([every, every[::-1]]), (3, 7, 256), np.random.default_rng(4), I8),
    ):
        (got,) = run(runnable, {"x": x})
        np.testing.assert_array_equal(got, ort_run(model, {"x": x}))


@pytest.mark.parametrize(("ratio_a", "ratio_b"), [(1.0, 1.0), (np.linspace(-3.0, 0.7, 48), 0.5)])
def test_add_symbolic_rows(ratio_a, ratio_b):
    example = [np.zeros((2, 3, 48), np.int8), np.zeros((2, 3, 48), np.int16)]
    dims = {0: "b", 1: "s"}
    model = symbolic(single_op_model(IntAdd(ratio_a, ratio_b), example), {"a": dims, "b": dims})
    rng = np.random.default_rng(1)
    feeds = [
        {"a": rows_of(edge_rows(48, I8), shape, rng, I8), "b": rows_of(edge_rows(48, I16)[::-1], shape, rng, I16)}
        for shape in [(1, 1, 48), (3, 5, 48)]
    ]
    outputs = assert_scheduled_equals_ort(model, schedule_add, feeds)
    if np.isscalar(ratio_a):
        assert outputs[1].min() == I16.min and outputs[1].max() == I16.max  # a + b saturates both ways


@pytest.mark.parametrize("ratio", [np.linspace(1e-5, 2e-3, 40), 10.0], ids=["per_channel", "saturating"])
def test_requantize_symbolic_rows(ratio):
    model = symbolic(single_op_model(Requantize(ratio), [np.zeros((2, 3, 40), np.int32)]), {"x": {0: "b", 1: "s"}})
    rng = np.random.default_rng(2)
    feeds = [{"x": rows_of(edge_rows(40, I32), shape, rng, I32)} for shape in [(1, 1, 40), (2, 9, 40)]]
    assert_scheduled_equals_ort(model, schedule_requantize, feeds)


# --- batched matmul --------------------------------------------------------------------------------


def int8s(rng, shape) -> np.ndarray:
    """Random int8 with a quarter of the entries at -128 / 127, and the first row of each matrix all -128."""
    x = rng.integers(I8.min, I8.max, size=shape, endpoint=True)
    extreme = rng.random(shape) < 0.25
    x[extreme] = rng.choice([I8.min, I8.max], size=int(extreme.sum()))
    x[..., 0, :] = I8.min
    return x.astype(np.int8)


MATMULS = {
    # name: (plan, example a, example b, symbolic dims, the (a, b) shapes run)
    "q_at_k_transposed_head64": (  # N symbolic, K = 64
        "rows",
        (2, 3, 5, 64),
        (2, 3, 64, 5),
        {"a": {0: "b", 2: "s"}, "b": {0: "b", 3: "s"}},
        [((1, 3, 1, 64), (1, 3, 64, 1)), ((2, 3, 29, 64), (2, 3, 64, 29))],
    ),
    "q_at_k_transposed_head32": (  # N symbolic, K = 32
        "stream",
        (2, 3, 5, 32),
        (2, 3, 32, 5),
        {"a": {0: "b", 2: "s"}, "b": {0: "b", 3: "s"}},
        [((1, 3, 1, 32), (1, 3, 32, 1)), ((2, 3, 29, 32), (2, 3, 32, 29))],
    ),
    "p_at_v_head64": (  # N = 64: tiles of 32 lanes
        "tile",
        (2, 3, 5, 5),
        (2, 3, 5, 64),
        {"a": {0: "b", 2: "s", 3: "s"}, "b": {0: "b", 2: "s"}},
        [((1, 3, 1, 1), (1, 3, 1, 64)), ((2, 3, 29, 29), (2, 3, 29, 64))],
    ),
    "p_at_v_head24": (  # N = 24: tiles of 8 lanes
        "tile",
        (2, 5, 5),
        (2, 5, 24),
        {"a": {0: "b", 1: "s", 2: "s"}, "b": {0: "b", 1: "s"}},
        [((1, 1, 1), (1, 1, 24)), ((3, 17, 17), (3, 17, 24))],
    ),
}


#: How each plan shows in the scheduled TIR (batch_matmul's docstring): TVM-vectorized tiles, an unrolled k.
PLAN_MARKS = {"tile": ("T.vectorized(",), "stream": ("T.unroll(",), "rows": ()}


@pytest.mark.parametrize("case", list(MATMULS))
@pytest.mark.parametrize("cls", [IntMatMul, IntMatMulAcc])
def test_batch_matmul_symbolic_dims(cls, case):
    plan, a_shape, b_shape, dims, runs = MATMULS[case]
    op = IntMatMulAcc() if cls is IntMatMulAcc else IntMatMul(3e-4)
    model = symbolic(single_op_model(op, [np.zeros(a_shape, np.int8), np.zeros(b_shape, np.int8)]), dims)
    script = scheduled(model, schedule_batch_matmul)[1].script()
    for other, marks in PLAN_MARKS.items():
        assert all((mark in script) == (other == plan) for mark in marks), (plan, other, script)
    rng = np.random.default_rng(3)
    feeds = [{"a": int8s(rng, a), "b": int8s(rng, b)} for a, b in runs]
    assert_scheduled_equals_ort(model, schedule_batch_matmul, feeds)


def test_batch_matmul_accumulator_at_the_int32_limit_static_shapes():
    """``K = MAX_K`` of -128 * -128: the largest sum int32 holds; static dims (LLVM unrolls ``N``)."""
    k = (2**31 - 1) // (128 * 128)
    a = np.full((2, 1, 3, k), I8.min, np.int8)
    b = np.full((2, 1, k, 5), I8.min, np.int8)
    b[1, 0, :, 1] = I8.max
    (acc,) = assert_scheduled_equals_ort(
        single_op_model(IntMatMulAcc(), [a, b]), schedule_batch_matmul, [{"a": a, "b": b}]
    )
    assert acc.max() == k * 128 * 128 and acc.min() == -k * 128 * 127
