"""intq ONNX -> TVM Relax -> compiled library, bit for bit equal to onnxruntime.

Covers the import mechanism (intq nodes through our converters, model-local
functions not inlined, foreign domains and missing lowerings refused with
the node named), the Requantize / IntLinear* lowerings on random and
adversarial integers with symbolic batch / sequence dims, the standard
shape and Q/DQ ops of the frontend, and subgraphs of a real quantized ViT.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from intq.passes import compat
from intq.passes.build import build, run
from intq.passes.onnx_import import OnnxImportError, import_onnx, unsupported_nodes
from intq.passes.ops import CONVERTERS, IntqLoweringError
from intq.quantizer.ops.linear import MAX_K, IntLinear, IntLinear16, IntLinearAcc
from intq.quantizer.ops.onnx_fn import single_op_model
from intq.quantizer.ops.requantize import Requantize

pytestmark = pytest.mark.filterwarnings(
    # onnx.checker (run inside from_onnx) wants a shape on every graph output; ours carry only a dtype.
    "ignore:Field 'shape' of 'type' is required:UserWarning",
    "ignore:Renaming name:UserWarning",
    "ignore:Input .* has unknown dimension shapes:UserWarning",
)

I32 = np.iinfo(np.int32)


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def symbolic(model: onnx.ModelProto, dims: dict[int, str]) -> onnx.ModelProto:
    """``model`` with graph-input dim ``i`` renamed to the symbol ``dims[i]`` (negative ``i`` from the end)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in out.graph.input:
        shape = value.type.tensor_type.shape.dim
        for i, name in dims.items():
            shape[i].dim_param = name
    return out


def assert_tvm_equals_ort(model: onnx.ModelProto, feeds_list: list[dict[str, np.ndarray]]):
    """Compile ``model`` once and check every feed dict (shapes may differ) against onnxruntime."""
    runnable = build(import_onnx(model))
    for feeds in feeds_list:
        want = ort_run(model, feeds)
        got = run(runnable, feeds)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.dtype, w.shape)
            np.testing.assert_array_equal(g, w)
    return runnable


def ints(rng, dtype, shape, lo=None, hi=None) -> np.ndarray:
    info = np.iinfo(dtype)
    lo = info.min if lo is None else lo
    hi = info.max if hi is None else hi
    return rng.integers(lo, hi, size=shape, endpoint=True, dtype=np.int64).astype(dtype)


# --- the import mechanism ------------------------------------------------------------------------


def test_intq_nodes_become_our_primfuncs_not_inlined_functions():
    x = np.zeros((2, 8), np.int32)
    mod = import_onnx(single_op_model(Requantize(0.01), [x]))
    prim_funcs = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, compat.tirx.PrimFunc)]
    assert prim_funcs == ["intq_requantize"]
    text = mod["main"].script()
    assert "R.call_tir" in text and "right_shift" not in text and "bitwise" not in text


def test_convert_map_is_restored_after_import():
    before = set(compat.frontend_convert_map())
    import_onnx(single_op_model(Requantize(0.01), [np.zeros((1, 4), np.int32)]))
    with pytest.raises(RuntimeError), compat.extended_convert_map({"intq::Probe": CONVERTERS["Requantize"]}):
        assert "intq::Probe" in compat.frontend_convert_map()
        raise RuntimeError
    assert set(compat.frontend_convert_map()) == before


def test_converters_may_not_shadow_standard_ops():
    with pytest.raises(ValueError, match="shadow"), compat.extended_convert_map({"Add": CONVERTERS["Requantize"]}):
        pass


def _one_node_model(op_type: str, domain: str, opsets: list[tuple[str, int]]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.INT8, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT8, ["batch", 4])
    node = helper.make_node(op_type, ["x"], ["y"], domain=domain, name="probe")
    graph = helper.make_graph([node], "probe_graph", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def test_intq_node_named_like_a_standard_op_is_refused_not_converted_as_standard():
    model = _one_node_model("Identity", "intq", [("", 21), ("intq", 1)])
    assert unsupported_nodes(model) == {"intq.Identity": ["probe"]}
    with pytest.raises(OnnxImportError, match=r"intq\.Identity \(1x: probe\)"):
        import_onnx(model)


def test_foreign_domain_is_refused():
    model = _one_node_model("Identity", "com.microsoft", [("", 21), ("com.microsoft", 1)])
    with pytest.raises(OnnxImportError, match=r"com\.microsoft\.Identity"):
        import_onnx(model)


def test_unknown_intq_version_is_refused():
    model = single_op_model(Requantize(0.01), [np.zeros((1, 4), np.int32)])
    model.opset_import[1].version = 2
    with pytest.raises(OnnxImportError, match="version 2"):
        import_onnx(model)


def test_lowering_error_names_the_node():
    op = Requantize(np.full(4, 0.01))
    model = single_op_model(op, [np.zeros((2, 3), np.int32)])  # m has 4 channels, x's last dim is 3
    model.graph.node[0].name = "bad_requant"
    with pytest.raises(IntqLoweringError, match="bad_requant.*does not broadcast"):
        import_onnx(model)


def test_build_takes_a_json_target_and_run_checks_feed_names():
    model = symbolic(single_op_model(Requantize(0.01), [np.zeros((1, 4), np.int32)]), {0: "batch"})
    runnable = build(import_onnx(model), {"kind": "llvm"})
    assert runnable.input_names == ("x",)
    x = np.arange(-8, 8, dtype=np.int32).reshape(4, 4) * 1000
    np.testing.assert_array_equal(run(runnable, {"x": x})[0], ort_run(model, {"x": x})[0])
    with pytest.raises(ValueError, match="missing"):
        run(runnable, {"images": x})


# --- Requantize -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
@pytest.mark.parametrize(
    "ratio",
    [
        pytest.param(3.1e-4, id="scalar"),  # m, s baked into the kernel as immediates
        pytest.param(np.array([1e-9, 2.5e-6, 0.37, -0.02, 1.0, 7.5, 1e-3, -4e-5]), id="per_channel"),  # buffers
    ],
)
def test_requantize_random_dynamic_dims(dtype, ratio):
    rng = np.random.default_rng(0)
    model = symbolic(single_op_model(Requantize(ratio), [np.zeros((2, 3, 8), dtype)]), {0: "batch", 1: "seq"})
    feeds = [{"x": ints(rng, dtype, shape)} for shape in [(1, 1, 8), (2, 5, 8), (3, 17, 8)]]
    assert_tvm_equals_ort(model, feeds)


def test_requantize_adversarial():
    """int32 extremes, exact ties (ratio 2**-k: x*m + 2**(s-1) lands on a multiple of 2**s), saturation, s = 62."""
    x = np.array(
        [I32.min, I32.min + 1, -(2**30), -3, -2, -1, 0, 1, 2, 3, 2**30, I32.max - 1, I32.max] + list(range(-40, 41)),
        np.int32,
    )
    model_for = lambda r: single_op_model(Requantize(r), [x[None, :]])  # noqa: E731
    for ratio in [0.5, 0.25, 2.0**-10, 2.0**-31, 1e-12, 1e-18, 3.0, -0.5, -(2.0**-3), 1e4]:
        op = Requantize(ratio)
        assert 1 <= int(op.s) <= 62
        assert_tvm_equals_ort(model_for(ratio), [{"x": x[None, :]}])


# --- IntLinear / IntLinear16 / IntLinearAcc -------------------------------------------------------


def _linear(cls, rng, n: int, k: int, ratio_scale: float):
    w = ints(rng, np.int8, (n, k))
    b = ints(rng, np.int32, (n,), -(2**20), 2**20)
    if cls is IntLinearAcc:
        return cls(w, b)
    return cls(w, b, rng.uniform(0.2, 1.0, n) * ratio_scale)


@pytest.mark.parametrize(
    ("cls", "ratio_scale"), [(IntLinear, 2e-4), (IntLinear, 1e-2), (IntLinear16, 2e-3), (IntLinearAcc, 0)]
)
def test_linear_random_dynamic_dims(cls, ratio_scale):
    """Ratios around 2e-4 land mostly inside int8; 1e-2 saturates most outputs."""
    rng = np.random.default_rng(1)
    op = _linear(cls, rng, n=24, k=96, ratio_scale=ratio_scale)
    model = symbolic(single_op_model(op, [np.zeros((2, 5, 96), np.int8)]), {0: "batch", 1: "seq"})
    feeds = [{"x": ints(rng, np.int8, shape)} for shape in [(1, 1, 96), (2, 7, 96), (4, 65, 96)]]
    assert_tvm_equals_ort(model, feeds)


def test_linear_scalar_ratio_and_rank2_input():
    rng = np.random.default_rng(2)
    op = IntLinear(ints(rng, np.int8, (16, 40)), ints(rng, np.int32, (16,), -1000, 1000), 3e-4)
    model = symbolic(single_op_model(op, [np.zeros((3, 40), np.int8)]), {0: "batch"})
    assert_tvm_equals_ort(model, [{"x": ints(rng, np.int8, (b, 40))} for b in (1, 9)])


@pytest.mark.parametrize("cls", [IntLinear, IntLinear16, IntLinearAcc])
def test_linear_accumulator_at_the_int32_limit(cls):
    """K = MAX_K and all-extreme operands: |acc + b| reaches 2**31 - 1 exactly, the int32 edge."""
    k = MAX_K
    headroom = (2**31 - 1) - k * 128 * 128  # the largest bias the constructor's bound still admits
    w = np.stack([np.full(k, -128), np.full(k, 127), np.full(k, -128), np.tile([127, -128], k)[:k]]).astype(np.int8)
    b = np.array([headroom, -headroom, -headroom, 0], np.int32)
    op = cls(w, b) if cls is IntLinearAcc else cls(w, b, np.array([2.0**-24, 1e-9, 0.5, 1e-6]))
    x = np.stack([np.full(k, -128), np.full(k, 127), np.tile([-128, 127], k)[:k]]).astype(np.int8)
    want_acc = x.astype(np.int64) @ w.astype(np.int64).T + b
    assert want_acc.max() == 2**31 - 1 and want_acc.min() < -(2**30)
    model = symbolic(single_op_model(op, [x]), {0: "batch"})
    assert_tvm_equals_ort(model, [{"x": x}])


# --- standard ops through TVM's frontend, on int8 with symbolic dims ------------------------------


def _graph_model(nodes, inputs, inits, out_type=TensorProto.INT8) -> onnx.ModelProto:
    out = helper.make_tensor_value_info("y", out_type, None)
    graph = helper.make_graph(nodes, "std", inputs, [out], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _const(name, value, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


X_INT8 = helper.make_tensor_value_info("x", TensorProto.INT8, ["batch", "seq", 12])
STANDARD_CASES = {
    "reshape": ([helper.make_node("Reshape", ["x", "s"], ["y"])], [_const("s", [0, -1, 3, 4])]),
    "transpose": ([helper.make_node("Transpose", ["x"], ["y"], perm=[2, 0, 1])], []),
    "gather_scalar": ([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], [_const("i", 0)]),
    "gather_negative": ([helper.make_node("Gather", ["x", "i"], ["y"], axis=2)], [_const("i", [-1, 0, 5])]),
    "concat": ([helper.make_node("Concat", ["x", "x"], ["y"], axis=1)], []),
    "slice": (
        [helper.make_node("Slice", ["x", "a", "b", "c"], ["y"])],
        [_const(n, [v]) for n, v in zip("abc", [1, 2**62, 1], strict=True)],
    ),
    "unsqueeze_squeeze": (
        [helper.make_node("Unsqueeze", ["x", "a"], ["u"]), helper.make_node("Squeeze", ["u", "a"], ["y"])],
        [_const("a", [1])],
    ),
    "cls_token": (  # the ViT pattern: Shape -> Concat -> Expand a constant -> Concat along the sequence
        [
            helper.make_node("Shape", ["x"], ["n"], start=0, end=1),
            helper.make_node("Concat", ["n", "one", "one"], ["t"], axis=0),
            helper.make_node("Expand", ["cls", "t"], ["e"]),
            helper.make_node("Concat", ["e", "x"], ["y"], axis=1),
        ],
        [_const("one", [1]), _const("cls", np.arange(-6, 6).reshape(1, 1, 12), np.int8)],
    ),
}


@pytest.mark.parametrize("case", list(STANDARD_CASES))
def test_standard_shape_ops_on_int8(case):
    nodes, inits = STANDARD_CASES[case]
    rng = np.random.default_rng(3)
    feeds = [{"x": ints(rng, np.int8, shape)} for shape in [(1, 1, 12), (3, 6, 12)]]
    assert_tvm_equals_ort(_graph_model(nodes, [X_INT8], inits), feeds)


@pytest.mark.parametrize(
    ("dtype", "axis", "scale"),
    [
        (np.int8, None, 0.0123),
        (np.int16, -1, np.linspace(1e-4, 3e-3, 12)),
        (np.int32, -1, np.linspace(1e-6, 3e-5, 12)),
        (np.int32, 2, np.linspace(1e-6, 3e-5, 12)),
    ],
)
def test_dequantize_linear(dtype, axis, scale):
    attrs = {} if axis is None else {"axis": axis}
    x = helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), ["batch", "seq", 12])
    node = helper.make_node("DequantizeLinear", ["x", "scale"], ["y"], **attrs)
    rng = np.random.default_rng(4)
    feeds = [{"x": ints(rng, dtype, shape)} for shape in [(1, 2, 12), (2, 5, 12)]]
    model = _graph_model([node], [x], [_const("scale", scale, np.float32)], TensorProto.FLOAT)
    assert_tvm_equals_ort(model, feeds)


@pytest.mark.parametrize(("dtype", "axis"), [(np.int8, None), (np.int16, -1), (np.int16, 1)])
def test_quantize_linear_rounds_half_to_even_and_saturates(dtype, axis):
    """x holds exact ties (k + 0.5) * scale with scale a power of two, and values far outside the range."""
    scale = 2.0**-3 if axis is None else 2.0 ** -np.arange(1, 13)
    attrs = {} if axis is None else {"axis": axis}
    if axis == 1:  # per-axis along a static middle dim: x is [batch, 12, 4]
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 12, 4])
        scale_b = np.asarray(scale)[None, :, None]
        shape = (3, 12, 4)
    else:
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 12])
        scale_b = np.asarray(scale)
        shape = (3, 5, 12)
    rng = np.random.default_rng(5)
    limit = int(np.iinfo(dtype).max * 1.25)
    k = rng.integers(-limit, limit, shape)
    x = ((k + 0.5) * scale_b).astype(np.float32)
    x.flat[:4] = [1e30, -1e30, 0.0, -0.0]
    zero = np.zeros(np.shape(scale), dtype)
    node = helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["y"], **attrs)
    inits = [_const("scale", scale, np.float32), _const("zp", zero, dtype)]
    model = _graph_model([node], [x_info], inits, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    assert_tvm_equals_ort(model, [{"x": x}])


# --- a real quantized ViT ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_onnx() -> onnx.ModelProto:
    import intq
    from intq.models.vit import VisionTransformer, ViTConfig

    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig.deit_tiny(img_size=32, patch=4, depth=1, num_classes=10)).eval()
    return intq.quantize(model, [torch.randn(2, 3, 32, 32)], progress=False).to_onnx()


def test_every_node_of_the_vit_lowers(vit_onnx):
    assert unsupported_nodes(vit_onnx) == {}


def test_vit_end_to_end(vit_onnx):
    rng = np.random.default_rng(6)
    feeds = [{"images": rng.standard_normal((b, 3, 32, 32)).astype(np.float32)} for b in (1, 3)]
    assert_tvm_equals_ort(vit_onnx, feeds)
