"""intq.Shiftmax through TVM equals onnxruntime (and the torch emulation) bit for bit.

Random rows at ``D`` from 1 to ``2**20`` and ``L`` of 1, 197, 512; adversarial
rows (all equal, one huge logit, all negative, int32 extremes in one row, a
sweep of ``t`` across every shift_exp boundary); symbolic batch dims and a
symbolic ``L`` run at two sizes each; ``D`` as an immediate and as a buffer;
the lowering's refusals.
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
from intq.quantizer.ops.shiftmax import MaskedShiftmax, Shiftmax

pytestmark = pytest.mark.filterwarnings(
    "ignore:Field 'shape' of 'type' is required:UserWarning",
    "ignore:Renaming name:UserWarning",
    "ignore:Input .* has unknown dimension shapes:UserWarning",
)

I32 = np.iinfo(np.int32)
D_LIMITS = [1, 2, 16, 100, 1 << 20]  # D = round(1/scale); 1 and 2**20 are exp_divisor's limits


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


def op_for(D: int) -> Shiftmax:
    op = Shiftmax(1.0 / D)
    assert int(op.D) == D
    return op


def logits(rng, shape, D: int, real_range: float = 40.0, dtype=np.int32) -> np.ndarray:
    """Integer logits spanning ``+-real_range`` real units at scale ``1/D``, clipped to ``dtype``."""
    info = np.iinfo(dtype)
    span = min(int(real_range * D), int(info.max))
    return rng.integers(max(-span, info.min), span, size=shape, endpoint=True).astype(dtype)


def adversarial_rows(D: int, length: int) -> np.ndarray:
    """Rows of ``length`` int32 logits that stress the max, the exp's boundaries and the rounding."""
    rng = np.random.default_rng(D)
    rows = [
        np.zeros(length),  # all equal: every e = D * 2**15, sum = L * D * 2**15
        np.full(length, I32.max),
        np.full(length, I32.min),
        np.r_[I32.max, np.zeros(length - 1)],  # one huge logit: the rest floor at 2**-15
        np.r_[np.full(length - 1, I32.min), I32.max],  # t = -(2**32 - 1), the spec's extreme
        np.r_[I32.min, np.full(length - 1, I32.max)],
        rng.integers(I32.min, -1, length, endpoint=True),  # all negative
        rng.integers(I32.min, I32.max, length, endpoint=True),  # full int32 range
        -np.arange(length),  # t = 0, -1, -2, ...: every floor shift and q boundary at small D
        -np.arange(length) * max(D // 8, 1),  # the same sweep at a step that reaches t2 = -15 D at large D
        np.r_[0, np.full(length - 1, -D)],  # one element exactly one real unit below the rest
        np.r_[np.zeros(length // 2), np.full(length - length // 2, -15 * D)],
    ]
    return np.stack([np.asarray(r, np.int64)[:length] for r in rows]).astype(np.int32)


@pytest.mark.parametrize("length", [1, 197, 512])
@pytest.mark.parametrize("D", D_LIMITS)
def test_random_rows_symbolic_batch(D, length):
    rng = np.random.default_rng(D + length)
    op = op_for(D)
    model = symbolic(single_op_model(op, [np.zeros((2, 3, length), np.int32)]), {0: "batch", 1: "heads"})
    feeds = [{"x": logits(rng, shape, D)} for shape in [(1, 1, length), (2, 5, length)]]
    feeds.append({"x": rng.integers(I32.min, I32.max, (3, 2, length), endpoint=True).astype(np.int32)})
    assert_tvm_equals_ort(model, feeds, op)


@pytest.mark.parametrize("length", [1, 2, 197, 256, 512])
@pytest.mark.parametrize("D", [1, 7, 16, 1000, 1 << 20])
def test_adversarial_rows(D, length):
    x = adversarial_rows(D, length)
    op = op_for(D)
    model = symbolic(single_op_model(op, [x]), {0: "rows"})
    assert_tvm_equals_ort(model, [{"x": x}, {"x": x[:1]}], op)


def test_symbolic_row_length():
    rng = np.random.default_rng(1)
    op = op_for(64)
    model = symbolic(single_op_model(op, [np.zeros((2, 8), np.int32)]), {0: "batch", 1: "L"})
    feeds = [{"x": logits(rng, shape, 64)} for shape in [(3, 1), (2, 300), (1, 512)]]
    assert_tvm_equals_ort(model, feeds, op)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int64, np.uint8])
def test_other_input_dtypes(dtype):
    """Narrow ints meet the row bound for every value; int64 logits stay within it (span < 2**32)."""
    rng = np.random.default_rng(2)
    op = op_for(16)
    model = symbolic(single_op_model(op, [np.zeros((2, 5, 40), dtype)]), {0: "batch"})
    feeds = [{"x": logits(rng, (b, 5, 40), 16, real_range=1e9, dtype=dtype)} for b in (1, 4)]
    if dtype == np.int64:  # far from zero, each row spanning exactly 2**32 - 1
        base = np.array([-(2**40), 2**50, 7])[:, None, None]
        x = base + rng.integers(0, 2**32 - 1, (3, 5, 40), endpoint=True)
        x[..., 0], x[..., 1] = base[..., 0], base[..., 0] + 2**32 - 1
        feeds.append({"x": x})
    assert_tvm_equals_ort(model, feeds, op)


def test_rank1_input():
    op = op_for(100)
    x = adversarial_rows(100, 197)
    assert_tvm_equals_ort(single_op_model(op, [x[0]]), [{"x": row} for row in x], op)


def test_divisor_as_a_buffer():
    """``D`` fed at run time (a buffer argument, not an immediate): one compiled kernel, every D."""
    model = params_as_inputs(symbolic(single_op_model(op_for(3), [np.zeros((2, 64), np.int32)]), {0: "rows"}))
    runnable = None
    rng = np.random.default_rng(3)
    for D in [1, 2, 3, 15, 16, 17, 127, 1000, (1 << 20) - 1, 1 << 20]:
        xs = [adversarial_rows(D, 64), logits(rng, (5, 64), D)]
        feeds = [{"x": x, "D": np.array([D], np.int64)} for x in xs]
        if runnable is None:
            runnable = assert_tvm_equals_ort(model, feeds)
            continue
        for f in feeds:
            np.testing.assert_array_equal(run(runnable, f)[0], ort_run(model, f))


def test_one_primfunc_with_the_divisor_baked_in():
    mod = import_onnx(single_op_model(op_for(100), [np.zeros((2, 8), np.int32)]))
    funcs = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, compat.tirx.PrimFunc)}
    assert list(funcs) == ["intq_shiftmax"]
    assert len(funcs["intq_shiftmax"].params) == 2  # x and y: D = 100 is an immediate
    assert mod["main"].script().count("R.call_tir") == 1


def _with_divisor(model: onnx.ModelProto, D: int) -> onnx.ModelProto:
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.array(D, np.int64), "D"))
    model.graph.node[0].name = "softmax_3"
    return model


@pytest.mark.parametrize("D", [0, -5, (1 << 20) + 1])
def test_divisor_out_of_range_is_refused(D):
    model = _with_divisor(single_op_model(op_for(4), [np.zeros((2, 8), np.int32)]), D)
    with pytest.raises(IntqLoweringError, match=rf"Shiftmax node 'softmax_3': D = {D} lies outside"):
        import_onnx(model)


def test_row_sum_overflow_is_refused():
    model = _with_divisor(single_op_model(op_for(4), [np.zeros((2, 8), np.int32)]), 1 << 20)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1 << 27  # L * D * 2**15 = 2**62
    with pytest.raises(IntqLoweringError, match=r"softmax_3.*reaches 2\*\*62"):
        import_onnx(model)


@pytest.mark.parametrize(("dtype", "shape"), [(np.float32, (2, 8)), (np.uint64, (2, 8)), (np.int32, ())])
def test_bad_input_is_refused(dtype, shape):
    model = single_op_model(op_for(4), [np.zeros(shape, dtype)])
    model.graph.node[0].name = "softmax_3"
    with pytest.raises(IntqLoweringError, match="softmax_3.*x must"):
        import_onnx(model)


# ---------------------------------------------------------------- MaskedShiftmax


def masked_model(scale: float, x: np.ndarray, keep: np.ndarray, dims: dict[str, dict[int, str]]) -> onnx.ModelProto:
    """One ``MaskedShiftmax`` node; ``dims[input][axis]`` names a symbolic dim of that graph input."""
    model = single_op_model(MaskedShiftmax(scale), [x, keep])
    for vi in model.graph.input:
        shape = vi.type.tensor_type.shape.dim
        for axis, name in dims.get(vi.name, {}).items():
            shape[axis].dim_param = name
    return model


@pytest.mark.parametrize("keep_dtype", [np.int64, np.bool_])
def test_masked_symbolic_batch_and_length_exact(keep_dtype):
    """x [b, 3, L, L], keep [b, 1, 1, L] sharing the symbols, as the attention mask of an encoder."""
    rng = np.random.default_rng(8)
    scale = 1 / 70
    x0 = rng.integers(-4000, 4000, (2, 3, 5, 5)).astype(np.int32)
    model = masked_model(
        scale, x0, np.ones((2, 1, 1, 5), keep_dtype), {"x": {0: "b", 2: "L", 3: "L"}, "keep": {0: "b", 3: "L"}}
    )
    runnable = build(import_onnx(model))
    op = MaskedShiftmax(scale)
    for b, L in ((2, 5), (3, 9), (1, 1)):
        x = rng.integers(I32.min, I32.max, (b, 3, L, L)).astype(np.int32) // 1024
        keep = rng.integers(0, 2, (b, 1, 1, L)).astype(keep_dtype)
        keep[-1] = 0  # a row with no kept key: all 0
        feeds = {"x": x, "keep": keep}
        want = ort_run(model, feeds)
        (got,) = run(runnable, feeds)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(op(torch.from_numpy(x), torch.from_numpy(keep)).numpy(), want)
        assert (want[-1] == 0).all()


def test_masked_static_shapes_exact():
    rng = np.random.default_rng(9)
    x = rng.integers(-(2**20), 2**20, (1, 12, 7, 7)).astype(np.int32)
    keep = np.array([1, 1, 1, 0, 1, 0, 0], np.int64).reshape(1, 1, 1, 7)
    assert_tvm_equals_ort(masked_model(1 / 200, x, keep, {}), [{"x": x, "keep": keep}])


def test_masked_refuses_a_keep_that_grows_x():
    x = np.zeros((1, 2, 4, 4), np.int32)
    keep = np.ones((3, 1, 1, 4), np.int64)
    with pytest.raises(IntqLoweringError, match="grow x"):
        import_onnx(masked_model(1 / 50, x, keep, {}))
