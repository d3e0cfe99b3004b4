"""intq.IntConv2d_* through TVM equals onnxruntime (and the torch emulation) bit for bit.

Every configuration a vision model exports: 3x3 stride 1 pad 1, 3x3 stride
2 with TF-style asymmetric pads (0, 0, 1, 1) at odd and even symbolic sizes,
a 16x16 stride 16 patch embedding, depthwise (groups = C), grouped and
dilated, pointwise; symbolic batch at two sizes; per-channel ratios from
vanishing to saturating, also fed as buffers to one compiled module; the
int32 accumulator at its limit; the routing of ``IntConv2d_<config>`` op
types and the refusals.
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
from intq.passes.onnx_import import import_onnx, unsupported_nodes
from intq.passes.ops import IntqLoweringError
from intq.quantizer.ops.conv import IntConv2d
from intq.quantizer.ops.onnx_fn import single_op_model

pytestmark = pytest.mark.filterwarnings(
    "ignore:Field 'shape' of 'type' is required:UserWarning",
    "ignore:Renaming name:UserWarning",
    "ignore:Input .* has unknown dimension shapes:UserWarning",
)


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
    for i, symbol in dims.items():
        shape[i].dim_param = symbol
    return out


def params_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its ``m``, ``s`` initializers turned into graph inputs of their shape (buffers)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in [t for t in out.graph.initializer if t.name in ("m", "s")]:
        out.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        out.graph.initializer.remove(init)
    return out


def assert_tvm_equals_ort(model: onnx.ModelProto, feeds_list: list[dict[str, np.ndarray]], op=None) -> list:
    """Compile ``model`` once; every feed must give onnxruntime's output exactly (and ``op``'s, if given).

    Returns the outputs, one per feed.
    """
    mod = import_onnx(model)
    prim_funcs = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, compat.tirx.PrimFunc)]
    assert prim_funcs == ["intq_conv2d"], prim_funcs
    runnable = build(mod)
    outputs = []
    for feeds in feeds_list:
        want = ort_run(model, feeds)
        (got,) = run(runnable, feeds)
        assert got.dtype == want.dtype == np.int8 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
        np.testing.assert_array_equal(got, want)
        if op is not None:
            np.testing.assert_array_equal(op(torch.from_numpy(feeds["x"])).numpy(), want)
        outputs.append(got)
    return outputs


def int8s(rng, shape) -> np.ndarray:
    """Random int8 with a quarter of the entries at the extremes -128 / 127."""
    x = rng.integers(-128, 127, size=shape, endpoint=True)
    extreme = rng.random(shape) < 0.25
    x[extreme] = rng.choice([-128, 127], size=int(extreme.sum()))
    return x.astype(np.int8)


def conv_op(rng, w_shape, ratio_range=(1e-5, 3e-2), **config) -> IntConv2d:
    """Random weights and bias; per-channel ratios spread geometrically, so some channels saturate."""
    out_channels = w_shape[0]
    ratios = np.geomspace(*ratio_range, out_channels) * np.where(np.arange(out_channels) % 3 == 2, -1, 1)
    bias = rng.integers(-(2**16), 2**16, out_channels)
    return IntConv2d(int8s(rng, w_shape), bias, ratios, **config)


# --- configurations, symbolic dims -------------------------------------------------------------------

# name: (w shape, config, example x shape, symbolic dims of x, the x shapes run)
CONFIGS = {
    "3x3_stride1_pad1": ((6, 8, 3, 3), {"padding": 1}, (2, 8, 9, 10), {0: "batch"}, [(1, 8, 9, 10), (3, 8, 9, 10)]),
    "3x3_stride2_tf_pads": (
        (5, 4, 3, 3),
        {"stride": 2, "padding": (0, 0, 1, 1)},
        (1, 4, 11, 9),
        {0: "batch", 2: "height", 3: "width"},
        [(1, 4, 11, 9), (2, 4, 12, 10)],  # odd and even sizes: the bottom / right pad is used or not
    ),
    "patch16": ((8, 3, 16, 16), {"stride": 16}, (1, 3, 32, 48), {0: "batch"}, [(1, 3, 32, 48), (2, 3, 32, 48)]),
    "depthwise": ((6, 1, 3, 3), {"padding": 1, "groups": 6}, (2, 6, 8, 8), {0: "batch"}, [(1, 6, 8, 8), (2, 6, 8, 8)]),
    "grouped_dilated": (
        (12, 2, 3, 3),
        {"stride": (1, 2), "padding": (2, 1, 0, 3), "dilation": (2, 3), "groups": 4},
        (1, 8, 12, 12),
        {0: "batch"},
        [(1, 8, 12, 12), (2, 8, 12, 12)],
    ),
    "pointwise": ((7, 16, 1, 1), {}, (2, 16, 5, 5), {0: "batch"}, [(2, 16, 5, 5), (4, 16, 5, 5)]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_configurations_random(case):
    w_shape, config, example, dims, runs = CONFIGS[case]
    rng = np.random.default_rng(len(case))
    op = conv_op(rng, w_shape, **config)
    model = symbolic(single_op_model(op, [np.zeros(example, np.int8)]), dims)
    outputs = assert_tvm_equals_ort(model, [{"x": int8s(rng, shape)} for shape in runs], op)
    assert {-128, 127} <= set(np.unique(np.concatenate([y.reshape(-1) for y in outputs])))


# --- adversarial integers ----------------------------------------------------------------------------

RATIO_SETS = [
    np.full(4, 1e-12),  # every output rounds to 0
    2.0 ** -np.array([5, 9, 13, 17]),  # powers of two: exact ties
    np.array([1.0, -1.0, 37.0, -(2.0**20)]),  # saturating
    np.array([3.1e-5, -7.7e-4, 2.0**-10, 1e-3]),
]


def test_ratio_sweep_with_params_as_buffers():
    """One module, per-channel ``m``, ``s`` fed per ratio set, on extreme and random inputs."""
    rng = np.random.default_rng(7)
    w = np.stack([np.full((3, 3, 3), -128), np.full((3, 3, 3), 127), int8s(rng, (3, 3, 3)), np.ones((3, 3, 3))])
    w = w.astype(np.int8)
    op = IntConv2d(w, np.array([0, -5, 2**20, -(2**20)]), RATIO_SETS[0], padding=1)
    model = symbolic(params_as_inputs(single_op_model(op, [np.zeros((1, 3, 6, 6), np.int8)])), {0: "batch"})
    extremes = np.stack([np.full((3, 6, 6), -128), np.full((3, 6, 6), 127), np.tile([-128, 127], 54).reshape(3, 6, 6)])
    feeds = []
    for ratios in RATIO_SETS:
        swept = IntConv2d(w, op.b.numpy(), ratios, padding=1)
        params = {"m": swept.m.numpy(), "s": swept.s.numpy()}
        feeds.append({"x": extremes.astype(np.int8), **params})
        feeds.append({"x": int8s(rng, (2, 3, 6, 6)), **params})
    outputs = np.concatenate([y.reshape(-1) for y in assert_tvm_equals_ort(model, feeds)])
    assert outputs.min() == -128 and outputs.max() == 127


def test_accumulator_at_the_int32_limit():
    """C=511, 16x16, all -128: acc = 511 * 256 * 2**14, plus the largest bias the bound admits = 2**31 - 1."""
    k = 511 * 16 * 16
    headroom = (2**31 - 1) - k * 128 * 128
    w = np.stack([np.full((511, 16, 16), -128), np.full((511, 16, 16), 127)]).astype(np.int8)
    op = IntConv2d(w, np.array([headroom, -headroom]), np.array([2.0**-24, 1e-9]), stride=16)
    x = np.stack([np.full((511, 16, 32), -128), np.full((511, 16, 32), 127)]).astype(np.int8)
    x[1, :, :, 16:] = -128
    want_acc = np.einsum("nchw,ochw->no", x[..., :16].astype(np.int64), w.astype(np.int64)) + [headroom, -headroom]
    assert want_acc.max() == 2**31 - 1
    assert_tvm_equals_ort(single_op_model(op, [x]), [{"x": x}], op)


# --- routing by op type, refusals ----------------------------------------------------------------------


def _model(op_type: str | None = None, x_shape=(1, 4, 8, 8), node_name: str = "patch_embed") -> onnx.ModelProto:
    op = IntConv2d(np.ones((2, 4, 3, 3), np.int8), np.zeros(2, np.int32), 1e-2)
    model = single_op_model(op, [np.zeros(x_shape, np.int8)])
    model.graph.node[0].name = node_name
    if op_type is not None:
        model.graph.node[0].op_type = op_type
    return model


def test_every_configured_op_type_reaches_the_converter_and_no_other():
    assert unsupported_nodes(_model("IntConv2d_s3x1_p0x2x1x0_d1x2_g1")) == {}
    assert unsupported_nodes(_model("IntLinear_s1x1_p0x0x0x0_d1x1_g1")) == {
        "intq.IntLinear_s1x1_p0x0x0x0_d1x1_g1": ["patch_embed"]
    }
    assert unsupported_nodes(_model("IntConv3d_s1x1_p0x0x0x0_d1x1_g1")) != {}


@pytest.mark.parametrize(
    ("op_type", "reason"),
    [
        ("IntConv2d", "does not encode a convolution"),
        ("IntConv2d_s2x2", "does not encode a convolution"),
        ("IntConv2d_s2x2_p1x1_d1x1_g1", "does not encode a convolution"),
        ("IntConv2d_s0x1_p0x0x0x0_d1x1_g1", "must be >= 1"),
        ("IntConv2d_s1x1_p0x0x0x0_d1x1_g2", "static C = 8"),
    ],
)
def test_names_that_do_not_parse_or_fit_are_refused_naming_the_node(op_type, reason):
    with pytest.raises(IntqLoweringError, match=rf"intq\.{op_type} node 'patch_embed'.*{reason}"):
        import_onnx(_model(op_type))


def test_input_channels_that_do_not_match_the_weight_are_refused():
    with pytest.raises(IntqLoweringError, match=r"node 'patch_embed': x must be NCHW with a static C = 4"):
        import_onnx(_model(x_shape=(1, 3, 8, 8)))


def test_kernel_larger_than_the_padded_input_is_refused():
    with pytest.raises(IntqLoweringError, match=r"node 'patch_embed': the padded input .* is smaller"):
        import_onnx(_model(x_shape=(1, 4, 2, 8)))
