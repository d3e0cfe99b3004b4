"""intq.ShiftGELU through TVM equals onnxruntime (and the torch emulation) bit for bit.

Every int8 value and every int16 value, at scales that put ``D`` at its
limits (1 and ``2**20``) and the requantize shift ``s`` from small to large;
symbolic dims run at two sizes; ``D``, ``m``, ``s`` as immediates and as
buffers; the lowering's refusals.
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


def test_one_elementwise_primfunc_with_the_params_baked_in():
    mod = import_onnx(single_op_model(ShiftGELU(0.05, 0.03), [np.zeros((2, 8), np.int8)]))
    funcs = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, compat.tirx.PrimFunc)}
    assert list(funcs) == ["intq_shiftgelu"]
    assert len(funcs["intq_shiftgelu"].params) == 2  # x and y: D, m, s are immediates
    blocks = [
        line for line in funcs["intq_shiftgelu"].script().splitlines() if line.strip().startswith("with T.sblock")
    ]
    assert len(blocks) == 1, blocks
    assert mod["main"].script().count("R.call_tir") == 1


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.float32])
def test_wide_or_non_int_input_is_refused(dtype):
    model = single_op_model(ShiftGELU(0.05, 0.03), [np.zeros((2, 8), dtype)])
    model.graph.node[0].name = "gelu_1"
    with pytest.raises(IntqLoweringError, match="ShiftGELU node 'gelu_1': x must be int8 or int16"):
        import_onnx(model)


@pytest.mark.parametrize("D", [0, (1 << 20) + 1])
def test_divisor_out_of_range_is_refused(D):
    model = single_op_model(ShiftGELU(0.05, 0.03), [np.zeros((2, 8), np.int8)])
    init = next(t for t in model.graph.initializer if t.name == "D")
    init.CopyFrom(onnx.numpy_helper.from_array(np.array(D, np.int64), "D"))
    model.graph.node[0].name = "gelu_1"
    with pytest.raises(IntqLoweringError, match=rf"gelu_1.*D = {D} lies outside"):
        import_onnx(model)
