"""intq.ShiftGELU through TVM equals onnxruntime (and the torch emulation) bit for bit.

Every int8 value and every int16 value, at scales that put ``D`` at its
limits (1 and ``2**20``) and the requantize shift ``s`` from small to large;
symbolic dims run at two sizes; ``D``, ``m``, ``s`` as immediates and as
buffers; the lowering's refusals.  The int8 table (``shiftgelu_table``)
against the formula kernel and onnxruntime for every int8 value over
a thousand random ``(D, m, s)``, and which inputs take the table.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from intq.passes import compat
from intq.passes.build import build, run
from intq.passes.onnx_import import import_onnx
from intq.passes.ops import IntqLoweringError
from intq.passes.ops.shiftgelu import MAX_PRODUCT, shiftgelu_table, table_applies
from intq.quantizer.ops.dyadic import dyadic
from intq.quantizer.ops.onnx_fn import single_op_model
from intq.quantizer.ops.shiftgelu import SIGMOID_GAIN, ShiftGELU

pytestmark = pytest.mark.filterwarnings(
    "ignore:Field 'shape' of 'type' is required:UserWarning",
    "ignore:Renaming name:UserWarning",
    "ignore:Input .* has unknown dimension shapes:UserWarning",
)

ALL_INT8 = np.arange(-128, 128, dtype=np.int8)
ALL_INT16 = np.arange(-(2**15), 2**15, dtype=np.int16)
D_MAX_SCALE = (1 + 1e-9) / (SIGMOID_GAIN * 2**20)  # D = 2**20 (the 1e-9 keeps float rounding inside the range)
D_MIN_SCALE = (1 - 1e-9) / SIGMOID_GAIN  # D = 1

# (scale_in, scale_out): typical, D at both limits, tiny and huge requantize ratios.
SCALES = {
    "typical": (0.05, 0.03),
    "small_out": (0.05, 0.02),
    "equal": (0.08, 0.08),
    "D_1": (D_MIN_SCALE, 0.05),
    "D_2": (D_MIN_SCALE / 2, 0.01),
    "D_2_20": (D_MAX_SCALE, D_MAX_SCALE / 3),
    # D = 129: sig lands exactly on a half at x = +-3, +-4; y = x * sig / 4 shows its rounding
    "sig_ties": (1 / (SIGMOID_GAIN * 129), 1 / (SIGMOID_GAIN * 129 * 32)),
    "saturating": (0.05, 1e-7),  # ratio ~ 3900: s ~ 12, nearly every output clamps
    "vanishing": (1e-3, 50.0),  # ratio ~ 1.6e-7: s ~ 46, every output rounds to 0 or -0
}


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, feeds)
    return y


def symbolic(model: onnx.ModelProto, dims: dict[int, str]) -> onnx.ModelProto:
    """``model`` with dim ``i`` of the graph input ``x`` renamed to the symbol ``dims[i]``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    shape = next(v for v in out.graph.input if v.name == "x").type.tensor_type.shape.dim
    for i, name in dims.items():
        shape[i].dim_param = name
    return out


def params_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every initializer turned into an int64 ``[1]`` graph input (a buffer in TVM).

    ``[1]`` rather than ``[]``: ``build.run`` feeds through ``np.ascontiguousarray``, which makes a 0-d
    array 1-d; ``[1]`` also takes the broadcasting read of a buffer param.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        out.graph.input.append(helper.make_tensor_value_info(init.name, onnx.TensorProto.INT64, [1]))
    del out.graph.initializer[:]
    return out


def assert_tvm_equals_ort(model: onnx.ModelProto, feeds_list: list[dict[str, np.ndarray]], op=None):
    """Compile ``model`` once; every feed must give onnxruntime's output exactly (and ``op``'s, if given)."""
    runnable = build(import_onnx(model))
    for feeds in feeds_list:
        want = ort_run(model, feeds)
        (got,) = run(runnable, feeds)
        assert got.dtype == want.dtype == np.int8 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
        np.testing.assert_array_equal(got, want)
        if op is not None:
            np.testing.assert_array_equal(op(torch.from_numpy(feeds["x"])).numpy(), want)
    return runnable


@pytest.mark.parametrize("scales", list(SCALES.values()), ids=list(SCALES))
def test_every_int8_value_symbolic_dims(scales):
    op = ShiftGELU(*scales)
    assert 1 <= int(op.D) <= 2**20 and 1 <= int(op.s) <= 62
    model = symbolic(single_op_model(op, [np.zeros((2, 4, 64), np.int8)]), {0: "batch", 1: "seq"})
    rng = np.random.default_rng(0)
    feeds = [
        {"x": ALL_INT8.reshape(1, 4, 64)},
        {"x": rng.integers(-128, 127, (3, 7, 64), endpoint=True).astype(np.int8)},
    ]
    assert_tvm_equals_ort(model, feeds, op)


@pytest.mark.parametrize("scales", [(2e-4, 1e-2), (1e-5, 3e-4), (D_MAX_SCALE, 0.5), (D_MIN_SCALE, 300.0)])
def test_every_int16_value(scales):
    """int16 input (the LayerNorm16 path): ``|x * sig * m| < 2**46`` still inside the requantize margin."""
    op = ShiftGELU(*scales)
    model = symbolic(single_op_model(op, [np.zeros((8, 2**13), np.int16)]), {0: "rows", 1: "cols"})
    feeds = [{"x": ALL_INT16.reshape(8, 2**13)}, {"x": ALL_INT16[::-1].reshape(2**14, 4)[:5].copy()}]
    assert_tvm_equals_ort(model, feeds, op)


def test_params_as_buffers():
    """``D``, ``m``, ``s`` fed at run time: one compiled kernel checked at every scale pair."""
    model = params_as_inputs(symbolic(single_op_model(ShiftGELU(0.05, 0.03), [ALL_INT8[None]]), {0: "rows"}))
    runnable = build(import_onnx(model))
    for scales in SCALES.values():
        feeds = {"x": np.stack([ALL_INT8, ALL_INT8[::-1]])}
        feeds |= {k: np.asarray(v, np.int64).reshape(1) for k, v in ShiftGELU(*scales).params().items()}
        (got,) = run(runnable, feeds)
        np.testing.assert_array_equal(got, ort_run(model, feeds))


def test_rank4_input():
    op = ShiftGELU(0.05, 0.03)
    x = ALL_INT8.reshape(2, 2, 8, 8)
    assert_tvm_equals_ort(symbolic(single_op_model(op, [x]), {0: "n"}), [{"x": x}, {"x": x[:1]}], op)


def kernels(model: onnx.ModelProto) -> dict[str, compat.tirx.PrimFunc]:
    mod = import_onnx(model)
    assert mod["main"].script().count("R.call_tir") == 1
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, compat.tirx.PrimFunc)}


def blocks(func: compat.tirx.PrimFunc) -> list[str]:
    return [line.split('"')[1] for line in func.script().splitlines() if line.strip().startswith("with T.sblock")]


def test_int8_with_constant_params_is_one_table_gather():
    op = ShiftGELU(0.05, 0.03)
    mod = import_onnx(single_op_model(op, [np.zeros((2, 8), np.int8)]))
    (call,) = [
        b.value for blk in mod["main"].body.blocks for b in blk.bindings if isinstance(b.value, compat.relax.Call)
    ]
    func = mod[call.args[0]]
    assert call.args[0].name_hint == "intq_shiftgelu" and blocks(func) == ["lookup"]
    assert len(func.params) == 3  # x, the table, y
    params = {k: int(v) for k, v in op.params().items()}
    assert func.attrs["intq.op"] == "ShiftGELU" and dict(func.attrs["intq.immediates"]) == params
    table = compat.constant_value(call.args[1].fields[1])
    assert table.dtype == np.int8 and table.shape == (256,)
    np.testing.assert_array_equal(table, op(torch.from_numpy(ALL_INT8)).numpy())
    np.testing.assert_array_equal(table, shiftgelu_table(**params))


@pytest.mark.parametrize(
    ("x_dtype", "as_inputs"), [(np.int16, False), (np.int8, True)], ids=["int16_x", "params_as_buffers"]
)
def test_int16_or_buffer_params_keep_the_formula(x_dtype, as_inputs):
    model = single_op_model(ShiftGELU(0.05, 0.03), [np.zeros((2, 8), x_dtype)])
    funcs = kernels(params_as_inputs(model) if as_inputs else model)
    assert list(funcs) == ["intq_shiftgelu"]
    assert blocks(funcs["intq_shiftgelu"]) == ["shiftgelu"]
    assert len(funcs["intq_shiftgelu"].params) == (5 if as_inputs else 2)  # D, m, s immediates unless buffers


LIMIT_40 = ((1 << 62) - (1 << 39) - 1) // MAX_PRODUCT  # the largest |m| the table takes at s = 40


def with_constant(model: onnx.ModelProto, name: str, value: int) -> onnx.ModelProto:
    init = next(t for t in model.graph.initializer if t.name == name)
    init.CopyFrom(onnx.numpy_helper.from_array(np.array(value, np.int64), name))
    return model


@pytest.mark.parametrize("m", [LIMIT_40 + 1, -LIMIT_40 - 1])
def test_m_outside_the_contract_keeps_the_formula(m):
    """``|m| * 128 * 127 + 2**(s-1) >= 2**62``: no table (the formula overflows int64 there)."""
    model = with_constant(with_constant(single_op_model(ShiftGELU(0.05, 0.03), [ALL_INT8[None]]), "m", m), "s", 40)
    assert not table_applies(12, m, 40) and table_applies(12, LIMIT_40, 40) and table_applies(12, -LIMIT_40, 40)
    assert blocks(kernels(model)["intq_shiftgelu"]) == ["shiftgelu"]
    with pytest.raises(ValueError, match="outside the requantize contract"):
        shiftgelu_table(12, m, 40)


@pytest.mark.parametrize("s", [0, 63])
def test_shift_out_of_range_is_refused(s):
    model = with_constant(single_op_model(ShiftGELU(0.05, 0.03), [np.zeros((2, 8), np.int8)]), "s", s)
    model.graph.node[0].name = "gelu_1"
    with pytest.raises(IntqLoweringError, match=rf"gelu_1.*s = {s} lies outside \[1, 62\]"):
        import_onnx(model)


def random_params(rng, count: int) -> list[tuple[int, int, int]]:
    """``(D, m, s)`` across the valid ranges.

    ``D``: its edges, then log-uniform in ``[1, 2**20]``.  Odd draws: ``(m, s) = dyadic(r)``, what the
    quantizer makes, ``r`` log-uniform in ``[1e-6, 10]`` (``y ~ x * sig * r``: from all zeros to all
    clamped).  Even draws: any ``s`` in ``[1, 62]``, ``m = round(r * 2**s)`` of either sign (a small ``s``
    gives a small ``m``, down to 0), every fourth one the contract's limit ``|m| * 128 * 127 + 2**(s-1) <
    2**62`` instead.
    """
    edges = [1, 2, 3, 4, 127, 128, 129, (1 << 20) - 1, 1 << 20]
    out = []
    for i in range(count):
        D = edges[i] if i < len(edges) else int(np.exp(rng.uniform(0, np.log(2**20))).round())
        r = float(np.exp(rng.uniform(np.log(1e-6), np.log(10.0))))
        if i % 2:
            m, s = (int(v) for v in dyadic(r))
        else:
            s = int(rng.integers(1, 62, endpoint=True))
            limit = ((1 << 62) - (1 << (s - 1)) - 1) // MAX_PRODUCT
            m = limit if i % 8 == 0 else min(round(r * 2.0**s), limit)
            m = -m if i % 6 == 2 else m
        assert 1 <= D <= 2**20 and table_applies(D, m, s), (D, m, s)
        out.append((D, m, s))
    return out


def test_table_equals_formula_kernel_and_onnxruntime():
    """For every int8 ``x`` and 1000 random ``(D, m, s)``: ``shiftgelu_table`` == the formula kernel (params as
    buffers, one compiled kernel) == onnxruntime running the ONNX function."""
    model = params_as_inputs(single_op_model(ShiftGELU(0.05, 0.03), [ALL_INT8[None]]))
    assert blocks(kernels(model)["intq_shiftgelu"]) == ["shiftgelu"]
    runnable = build(import_onnx(model))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    clamped, varied = set(), 0
    for D, m, s in random_params(np.random.default_rng(7), 1000):
        feeds = {"x": ALL_INT8[None], **{k: np.array([v], np.int64) for k, v in (("D", D), ("m", m), ("s", s))}}
        table = shiftgelu_table(D, m, s)
        (formula,) = run(runnable, feeds)
        (want,) = session.run(None, feeds)
        np.testing.assert_array_equal(formula[0], want[0], err_msg=f"TVM formula vs onnxruntime at {(D, m, s)}")
        np.testing.assert_array_equal(table, want[0], err_msg=f"table vs onnxruntime at {(D, m, s)}")
        clamped.update({int(table.min()), int(table.max())} & {-128, 127})
        varied += len(set(table.tolist())) >= 8
    assert clamped == {-128, 127}  # saturation both ways is among the draws
    assert varied >= 350, varied  # and many tables are more than a few values (all 0, all clamped)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.float32])
def test_wide_or_non_int_input_is_refused(dtype):
    model = single_op_model(ShiftGELU(0.05, 0.03), [np.zeros((2, 8), dtype)])
    model.graph.node[0].name = "gelu_1"
    with pytest.raises(IntqLoweringError, match="ShiftGELU node 'gelu_1': x must be int8 or int16"):
        import_onnx(model)


@pytest.mark.parametrize("D", [0, (1 << 20) + 1])
def test_divisor_out_of_range_is_refused(D):
    model = with_constant(single_op_model(ShiftGELU(0.05, 0.03), [np.zeros((2, 8), np.int8)]), "D", D)
    model.graph.node[0].name = "gelu_1"
    with pytest.raises(IntqLoweringError, match=rf"gelu_1.*D = {D} lies outside"):
        import_onnx(model)
