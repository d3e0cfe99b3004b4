"""intq.IntAdd through TVM equals onnxruntime (and the torch emulation) bit for bit.

int8 / int16 operands in every pairing with symbolic batch and sequence dims
at two sizes; scalar and per-channel multipliers, baked in and fed as
buffers; numpy broadcasting (missing and size-1 dims on either side, against
a symbolic dim); int16 extremes, exact ties and saturating ratios through
one compiled module; the lowering's refusals.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from intq.passes import compat
from intq.passes.build import build, run
from intq.passes.onnx_import import import_onnx
from intq.passes.ops import IntqLoweringError
from intq.quantizer.ops.add import IntAdd
from intq.quantizer.ops.onnx_fn import single_op_model

pytestmark = pytest.mark.filterwarnings(
    "ignore:Field 'shape' of 'type' is required:UserWarning",
    "ignore:Renaming name:UserWarning",
    "ignore:Input .* has unknown dimension shapes:UserWarning",
)

I16 = np.iinfo(np.int16)


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, feeds)
    return y


def symbolic(model: onnx.ModelProto, dims: dict[str, dict[int, str]]) -> onnx.ModelProto:
    """``model`` with dim ``i`` of graph input ``name`` renamed to the symbol ``dims[name][i]``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in out.graph.input:
        for i, symbol in dims.get(value.name, {}).items():
            value.type.tensor_type.shape.dim[i].dim_param = symbol
    return out


def params_as_inputs(model: onnx.ModelProto, channels: int) -> onnx.ModelProto:
    """``model`` with ``m_a``, ``m_b`` as int64 ``[channels]`` and ``s`` as int64 ``[1]`` graph inputs (buffers)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        shape = [1] if init.name == "s" else [channels]
        out.graph.input.append(helper.make_tensor_value_info(init.name, onnx.TensorProto.INT64, shape))
    del out.graph.initializer[:]
    return out


def assert_tvm_equals_ort(model: onnx.ModelProto, feeds_list: list[dict[str, np.ndarray]], op=None) -> list:
    """Compile ``model`` once; every feed must give onnxruntime's output exactly (and ``op``'s, if given).

    Returns the outputs, one per feed.
    """
    mod = import_onnx(model)
    prim_funcs = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, compat.tirx.PrimFunc)]
    assert prim_funcs == ["intq_add"], prim_funcs
    runnable = build(mod)
    outputs = []
    for feeds in feeds_list:
        want = ort_run(model, feeds)
        (got,) = run(runnable, feeds)
        assert got.dtype == want.dtype == np.int16 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
        np.testing.assert_array_equal(got, want)
        if op is not None:
            np.testing.assert_array_equal(op(torch.from_numpy(feeds["a"]), torch.from_numpy(feeds["b"])).numpy(), want)
        outputs.append(got)
    return outputs


def ints(rng, dtype, shape) -> np.ndarray:
    """Random integers of ``dtype`` with a quarter of the entries at its extremes."""
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max, size=shape, endpoint=True)
    extreme = rng.random(shape) < 0.25
    x[extreme] = rng.choice([info.min, info.max], size=int(extreme.sum()))
    return x.astype(dtype)


# --- dtypes, multipliers, symbolic dims -------------------------------------------------------------

D = 12
PER_CHANNEL_A = np.linspace(0.02, 0.9, D)
PER_CHANNEL_B = np.r_[np.linspace(1e-3, 0.3, D - 2), -0.05, 1.5]


@pytest.mark.parametrize(("a_dtype", "b_dtype"), [(np.int8, np.int8), (np.int8, np.int16), (np.int16, np.int16)])
@pytest.mark.parametrize(
    ("ratio_a", "ratio_b"),
    [
        pytest.param(0.37, 0.011, id="scalars"),
        pytest.param(PER_CHANNEL_A, PER_CHANNEL_B, id="per_channel"),
        pytest.param(PER_CHANNEL_A, 0.25, id="vector_and_scalar"),
    ],
)
def test_random_symbolic_batch_and_sequence(a_dtype, b_dtype, ratio_a, ratio_b):
    op = IntAdd(ratio_a, ratio_b)
    example = [np.zeros((2, 3, D), a_dtype), np.zeros((2, 3, D), b_dtype)]
    dims = {0: "batch", 1: "seq"}
    model = symbolic(single_op_model(op, example), {"a": dims, "b": dims})
    rng = np.random.default_rng(0)
    feeds = [{"a": ints(rng, a_dtype, (n, s, D)), "b": ints(rng, b_dtype, (n, s, D))} for n, s in [(1, 1), (3, 19)]]
    assert_tvm_equals_ort(model, feeds, op)


# --- broadcasting -------------------------------------------------------------------------------------

# name: (example a shape, example b shape, symbolic dims, the (a, b) shapes run)
BROADCASTS = {
    "bias_like_b": ((2, 5, D), (D,), {}, [((2, 5, D), (D,))]),
    "size1_both_sides": ((4, 1, D), (1, 5, D), {}, [((4, 1, D), (1, 5, D))]),
    "column_and_row": ((3, 1), (1, D), {}, [((3, 1), (1, D))]),
    "symbolic_batch_against_one": (
        (2, 5, D),
        (1, 5, D),
        {"a": {0: "batch"}},
        [((1, 5, D), (1, 5, D)), ((4, 5, D), (1, 5, D))],
    ),
    "same_symbol_both": (
        (2, 5, D),
        (1, 5, D),
        {"a": {1: "seq"}, "b": {1: "seq"}},
        [((2, 5, D), (1, 5, D)), ((2, 9, D), (1, 9, D))],
    ),
    # a symbolic dim against a static one: it is that size, or 1 and broadcasts (the ViT's position embedding)
    "symbolic_against_static": (
        (2, 5, D),
        (1, 5, D),
        {"a": {0: "batch", 1: "tokens"}},
        [((2, 5, D), (1, 5, D)), ((3, 1, D), (1, 5, D))],
    ),
    # two unrelated symbols: either may be the 1 that broadcasts, known only at run time
    "two_symbols": (
        (3, 2, D),
        (3, 2, D),
        {"a": {0: "n"}, "b": {0: "k"}},
        [((1, 2, D), (4, 2, D)), ((4, 2, D), (1, 2, D)), ((4, 2, D), (4, 2, D)), ((1, 2, D), (1, 2, D))],
    ),
}


@pytest.mark.parametrize("case", list(BROADCASTS))
def test_broadcast(case):
    a_shape, b_shape, dims, runs = BROADCASTS[case]
    last = max(a_shape[-1], b_shape[-1])
    op = IntAdd(np.linspace(0.1, 0.7, last), 0.3)
    model = symbolic(single_op_model(op, [np.zeros(a_shape, np.int16), np.zeros(b_shape, np.int8)]), dims)
    rng = np.random.default_rng(1)
    feeds = [{"a": ints(rng, np.int16, a), "b": ints(rng, np.int8, b)} for a, b in runs]
    assert_tvm_equals_ort(model, feeds, op)


# --- adversarial integers -------------------------------------------------------------------------------

RATIO_PAIRS = [
    (1.0, 1.0),  # a + b: saturates at the int16 ends
    (0.5, 0.5),  # exact ties: (a + b) / 2 with half up
    (0.5, -0.5),  # (a - b) / 2
    (2.0**-15, 2.0**-16),  # nearly everything rounds to 0 or +-1
    (7.0, 1e-3),  # saturating a, b below a unit
    (1e-6, 2.0**-3),  # the smaller ratio keeps few significant bits under the shared shift
    (-3.0, 0.75),
    (2.0**22, 1.0),  # the largest shift-free ratios the margin admits
]


def test_ratio_sweep_with_params_as_buffers():
    """One module, per-channel ``m_a``, ``m_b`` and ``s`` fed per ratio pair, on every extreme pairing."""
    edges = np.array([I16.min, I16.min + 1, -2, -1, 0, 1, 2, I16.max - 1, I16.max])
    a = np.repeat(edges, edges.size).reshape(1, -1, 1).astype(np.int16)  # [1, 81, 1]: every pair of edges
    b = np.tile(edges, edges.size).reshape(1, -1, 1).astype(np.int16)
    a, b = np.broadcast_to(a, (1, a.shape[1], 2)).copy(), np.broadcast_to(b, (1, b.shape[1], 2)).copy()
    model = params_as_inputs(single_op_model(IntAdd(0.5, 0.5), [a, b]), channels=2)
    model = symbolic(model, {"a": {0: "n", 1: "rows"}, "b": {0: "n", 1: "rows"}})
    rng = np.random.default_rng(2)
    feeds = []
    for ratio_a, ratio_b in RATIO_PAIRS:
        # channel 1 takes the pair swapped, so the per-channel read is checked too
        op = IntAdd([ratio_a, ratio_b], [ratio_b, ratio_a])
        params = {"m_a": op.m_a.numpy(), "m_b": op.m_b.numpy(), "s": op.s.numpy().reshape(1)}
        feeds.append({"a": a, "b": b, **params})
        feeds.append({"a": ints(rng, np.int16, (3, 7, 2)), "b": ints(rng, np.int16, (3, 7, 2)), **params})
    outputs = np.concatenate([y.reshape(-1) for y in assert_tvm_equals_ort(model, feeds)])
    assert outputs.min() == I16.min and outputs.max() == I16.max  # the sweep saturates both ways


# --- refusals -----------------------------------------------------------------------------------------------


def _named(model: onnx.ModelProto, name: str = "residual_1") -> onnx.ModelProto:
    model.graph.node[0].name = name
    return model


def test_static_dims_that_do_not_broadcast_are_refused():
    model = single_op_model(IntAdd(0.5, 0.25), [np.zeros((2, 4), np.int8), np.zeros((3, 4), np.int8)])
    with pytest.raises(IntqLoweringError, match=r"IntAdd node 'residual_1'.*dims \[2, 3\] at axis -2 do not broadcast"):
        import_onnx(_named(model))


def test_per_channel_multiplier_of_the_wrong_length_is_refused():
    model = single_op_model(IntAdd(0.5, 0.25), [np.zeros((2, 4), np.int8), np.zeros((2, 4), np.int8)])
    init = next(t for t in model.graph.initializer if t.name == "m_a")
    init.CopyFrom(numpy_helper.from_array(np.ones(3, np.int64), "m_a"))
    with pytest.raises(IntqLoweringError, match=r"IntAdd node 'residual_1': param 'm_a' of shape \[3\]"):
        import_onnx(_named(model))


def test_int32_operand_is_refused():
    model = single_op_model(IntAdd(0.5, 0.25), [np.zeros((2, 4), np.int8), np.zeros((2, 4), np.int8)])
    model.graph.input[1].type.tensor_type.elem_type = onnx.TensorProto.INT32
    with pytest.raises(IntqLoweringError, match=r"IntAdd node 'residual_1': b must be int8 or int16, got int32"):
        import_onnx(_named(model))
