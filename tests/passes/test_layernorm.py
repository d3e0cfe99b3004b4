"""ILayerNorm lowered through TVM == onnxruntime bit for bit; the isqrt stages == ``math.isqrt``.

Each model is compiled once and run on several inputs (symbolic batch and
sequence dims at two sizes).  The inputs target the spec's edges: constant
rows (``y = 0``, ``var = E``, including ``E = 0`` and the cap ``E = 2**46``),
int16 extremes (the largest ``|sum|``, ``var`` and ``|y|``), mean ties
(``sum_x = +-C/2``), negative / zero / tiny gamma, per-channel output scales,
``C = 1`` and int8 input.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from intq.passes import compat
from intq.passes.build import build, run
from intq.passes.onnx_import import import_onnx
from intq.passes.ops import CONVERTERS, IntqLoweringError
from intq.passes.ops.isqrt import isqrt_te
from intq.quantizer.ops.layernorm import E_MAX, ILayerNorm
from intq.quantizer.ops.onnx_fn import single_op_model

pytestmark = pytest.mark.filterwarnings(
    "ignore:Field 'shape' of 'type' is required:UserWarning",
    "ignore:Renaming name:UserWarning",
    "ignore:Input .* has unknown dimension shapes:UserWarning",
)

I16_MIN, I16_MAX = -(1 << 15), (1 << 15) - 1


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def layernorm_model(op: ILayerNorm, x: np.ndarray, dims: tuple[str, ...] = ("batch", "seq")) -> onnx.ModelProto:
    """The single-node model of ``op``; the leading dims of ``x`` become the symbols ``dims``."""
    model = single_op_model(op, [x])
    shape = model.graph.input[0].type.tensor_type.shape.dim
    for i, name in enumerate(dims):
        shape[i].dim_param = name
    return model


def assert_tvm_equals_ort(model: onnx.ModelProto, inputs: list[np.ndarray]) -> None:
    """Compile ``model`` once; on every input its output equals onnxruntime's (values, dtype, shape)."""
    runnable = build(import_onnx(model))
    for x in inputs:
        (want,) = ort_run(model, {"x": x})
        (got,) = run(runnable, {"x": x})
        assert want.dtype == np.int8
        assert got.dtype == want.dtype and got.shape == want.shape == x.shape, (got.dtype, got.shape, want.shape)
        np.testing.assert_array_equal(got, want)


def vit_params(rng, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Trained-LayerNorm-like gamma / beta: some negative, near-zero and zero gammas."""
    gamma = rng.normal(1.0, 0.5, channels)
    gamma[rng.random(channels) < 0.1] *= -1
    gamma[rng.random(channels) < 0.05] *= 1e-4
    gamma[rng.random(channels) < 0.02] = 0.0
    return gamma, rng.normal(0.0, 0.5, channels)


def fill_int8(gamma, beta, nmax: float = 4.0) -> float:
    """S_out mapping ``max|gamma| * nmax + max|beta|`` onto 127."""
    return float(np.abs(gamma).max() * nmax + np.abs(beta).max()) / 127


def rows(rng, shape, dtype=np.int16) -> np.ndarray:
    """Rows with a spread of stds (2**0 .. 2**13 LSB) and offsets, clipped to ``dtype``."""
    info = np.iinfo(dtype)
    std = np.exp2(rng.uniform(0, 13 if dtype == np.int16 else 6, (*shape[:-1], 1)))
    center = rng.normal(0, info.max / 10, (*shape[:-1], 1))
    return np.clip(np.rint(rng.normal(0, 1, shape) * std + center), info.min, info.max).astype(dtype)


def adversarial_rows(channels: int, lo: int = I16_MIN, hi: int = I16_MAX) -> np.ndarray:
    """Extremes, constant rows and rows whose sum sits on a mean-rounding tie, shape ``[1, n, C]``."""
    c = np.arange(channels)
    out = [
        np.full(channels, lo),
        np.full(channels, hi),
        np.zeros(channels),
        np.full(channels, -1),
        np.where(c % 2 == 0, lo, hi),  # alternating: the largest var
        np.where(c < channels // 2, lo, hi),
        np.where(c == channels // 3, hi, lo),  # one-hot: the largest |y|
        np.where(c == channels - 1, lo, hi),
    ]
    for total in (channels // 2, -(channels // 2), channels // 2 - 1, -(channels // 2) + 1, channels // 2 + 1):
        row = np.zeros(channels)  # sum_x = total: at C//2 and -C//2 the rounded mean is a tie (even C)
        row[0] = total
        out.append(row)
    return np.clip(np.stack(out), lo, hi)[None]


# --- isqrt ---------------------------------------------------------------------------------------


def test_isqrt_stages_equal_math_isqrt_on_edge_values():
    n = compat.te.var("n", "int64")
    v = compat.te.placeholder((n,), "int64", name="v")
    func = compat.te.create_prim_func([v, isqrt_te(v)])
    kernel = compat.tvm.compile(func, target=compat.host_target())

    ks = [1, 2, 3, 4, 5, 255, 256, 4095, 4096, 65535, 65536, (1 << 23) + 1, (1 << 24) - 2, (1 << 24) - 1]
    values = {0, 1, 2, 3, (1 << 48) - 1, (1 << 46), (1 << 46) + (1 << 44), 1 << 47}
    for k in ks:
        values |= {k * k - 1, k * k, k * k + 1, k * k + k, k * k + 2 * k}
    rng = np.random.default_rng(0)
    for bits in range(1, 49):
        values |= {int(u) for u in rng.integers(1 << (bits - 1), 1 << bits, 40, dtype=np.int64)}
    arr = np.array(sorted(v_ for v_ in values if v_ < 1 << 48), np.int64)

    out = compat.tvm.runtime.tensor(np.zeros_like(arr))
    kernel(compat.tvm.runtime.tensor(arr), out)
    want = np.array([max(math.isqrt(int(a)), 1) for a in arr], np.int64)
    np.testing.assert_array_equal(out.numpy(), want)


# --- ILayerNorm ----------------------------------------------------------------------------------


def test_one_primfunc_per_node():
    op = ILayerNorm(np.ones(8), np.zeros(8), 1e-5, 0.01, 0.05)
    mod = import_onnx(layernorm_model(op, np.zeros((2, 3, 8), np.int16)))
    prim_funcs = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, compat.tirx.PrimFunc)]
    assert prim_funcs == ["intq_layernorm"]
    assert mod["main"].script().count("R.call_tir") == 1
    assert CONVERTERS["ILayerNorm"].op_type == "ILayerNorm"


def test_vit_shape_int16_dynamic_dims():
    """C = 192 with symbolic batch / sequence, run at [2, 197, 192] and [1, 5, 192], plus the edge rows."""
    rng = np.random.default_rng(1)
    gamma, beta = vit_params(rng, 192)
    op = ILayerNorm(gamma, beta, 1e-6, 0.01, fill_int8(gamma, beta))
    model = layernorm_model(op, np.zeros((2, 197, 192), np.int16))
    inputs = [rows(rng, (2, 197, 192)), rows(rng, (1, 5, 192)), adversarial_rows(192).astype(np.int16)]
    assert_tvm_equals_ort(model, inputs)


@pytest.mark.parametrize("channels", [384, 768])
def test_wide_rows_and_extremes(channels):
    """The alternating / one-hot extremes give the largest var (~2**44 at C = 768) and |y|; S_out saturates some."""
    rng = np.random.default_rng(channels)
    gamma, beta = vit_params(rng, channels)
    op = ILayerNorm(gamma, beta, 1e-5, 0.001, fill_int8(gamma, beta, nmax=2.0))
    model = layernorm_model(op, np.zeros((1, 4, channels), np.int16))
    inputs = [adversarial_rows(channels).astype(np.int16), rows(rng, (3, 7, channels))]
    assert_tvm_equals_ort(model, inputs)


def test_int8_input():
    rng = np.random.default_rng(2)
    gamma, beta = vit_params(rng, 384)
    op = ILayerNorm(gamma, beta, 1e-5, 0.05, fill_int8(gamma, beta))
    model = layernorm_model(op, np.zeros((2, 50, 384), np.int8))
    inputs = [rows(rng, (2, 50, 384), np.int8), rows(rng, (1, 3, 384), np.int8), adversarial_rows(384, -128, 127)]
    assert_tvm_equals_ort(model, [x.astype(np.int8) for x in inputs])


@pytest.mark.parametrize(
    ("eps", "scale_in", "expected_e"),
    [
        pytest.param(0.0, 0.01, 0, id="E=0"),  # var = 0: isqrt gives 1, factor = 2**36, y = 0
        pytest.param(1e-5, 0.01, round(64 * 1e-5 / 0.01**2), id="E_small"),
        pytest.param(1.0, 1e-7, E_MAX, id="E_capped"),  # var up to 2**44 + 2**46, near isqrt's limit
    ],
)
def test_constant_rows_and_variance_offset(eps, scale_in, expected_e):
    """Constant rows have var = E exactly; random rows check E's addition."""
    rng = np.random.default_rng(3)
    gamma, beta = vit_params(rng, 64)
    op = ILayerNorm(gamma, beta, eps, scale_in, 0.05)
    assert int(op.E.item()) == expected_e
    model = layernorm_model(op, np.zeros((1, 6, 64), np.int16))
    constant = np.array([np.full(64, v) for v in (I16_MIN, I16_MAX, 0, -1, 1, 12345)], np.int16)[None]
    assert_tvm_equals_ort(model, [constant, rows(rng, (2, 9, 64))])


def test_single_channel():
    """C = 1: y = 0 in every row, the output is round(beta / S_out) clamped."""
    x = np.array([[[I16_MIN], [I16_MAX], [0], [7]]], np.int16)
    for beta in (0.0, 0.3, -2.71, 100.0, -500.0):
        op = ILayerNorm(np.array([1.5]), np.array([beta]), 1e-5, 0.01, 0.1)
        assert_tvm_equals_ort(layernorm_model(op, x), [x, x[:, :2]])


def test_per_channel_output_scale_negative_and_zero_gamma():
    rng = np.random.default_rng(4)
    channels = 96
    gamma = np.concatenate([-np.abs(rng.normal(1, 0.3, 32)), np.zeros(32), rng.normal(0, 1e-6, 32)])
    beta = rng.normal(0, 2.0, channels)
    scale_out = np.exp2(rng.uniform(-8, -2, channels))  # one output scale per channel
    op = ILayerNorm(gamma, beta, 1e-6, 0.01, scale_out)
    assert (op.m.numpy()[:32] < 0).all() and (op.m.numpy()[32:64] == 0).all()
    model = layernorm_model(op, np.zeros((2, 17, channels), np.int16))
    inputs = [rows(rng, (2, 17, channels)), rows(rng, (1, 5, channels)), adversarial_rows(channels).astype(np.int16)]
    assert_tvm_equals_ort(model, inputs)


@pytest.mark.parametrize("e_shape", [(), (1,)])
def test_rank1_input_and_variance_offset_as_a_graph_input(e_shape):
    """``x`` of shape [C]; ``E`` fed at run time (a buffer, not an immediate), as a scalar or [1]."""
    rng = np.random.default_rng(5)
    gamma, beta = vit_params(rng, 32)
    op = ILayerNorm(gamma, beta, 1e-4, 0.01, fill_int8(gamma, beta))
    model = single_op_model(op, [np.zeros(32, np.int16)])
    graph = model.graph
    e_init = next(t for t in graph.initializer if t.name == "E")
    graph.initializer.remove(e_init)
    graph.input.append(helper.make_tensor_value_info("E", TensorProto.INT64, list(e_shape)))
    runnable = build(import_onnx(model))
    for x in (rows(rng, (32,)), np.full(32, I16_MIN, np.int16)):
        for e in (0, 3, 12345, E_MAX):
            feeds = {"x": x, "E": np.full(e_shape, e, np.int64)}
            (want,) = ort_run(model, feeds)
            (got,) = run(runnable, feeds)
            assert got.dtype == want.dtype == np.int8
            np.testing.assert_array_equal(got, want)


# --- refusals ------------------------------------------------------------------------------------


def _op(channels: int = 8) -> ILayerNorm:
    return ILayerNorm(np.ones(channels), np.zeros(channels), 1e-5, 0.01, 0.05)


def test_int32_input_is_refused_with_the_node_named():
    model = single_op_model(_op(), [np.zeros((2, 8), np.int32)])
    model.graph.node[0].name = "ln_int32"
    with pytest.raises(IntqLoweringError, match="ln_int32.*int8 or int16"):
        import_onnx(model)


def test_symbolic_channel_dim_is_refused():
    model = layernorm_model(_op(), np.zeros((2, 8), np.int16), dims=("batch", "channels"))
    with pytest.raises(IntqLoweringError, match="static last dim C"):
        import_onnx(model)


def test_variance_offset_outside_the_domain_is_refused():
    model = single_op_model(_op(), [np.zeros((2, 8), np.int16)])
    e_init = next(t for t in model.graph.initializer if t.name == "E")
    e_init.CopyFrom(numpy_helper.from_array(np.array(E_MAX + 1, np.int64), "E"))
    with pytest.raises(IntqLoweringError, match=r"outside \[0, 2\*\*46\]"):
        import_onnx(model)
