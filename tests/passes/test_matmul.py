"""intq.IntMatMul / IntMatMulAcc through TVM equal onnxruntime (and the torch emulation) bit for bit.

Attention's two products with symbolic batch and sequence dims (``K``
symbolic in ``P @ V``) at two sizes each; numpy batch broadcasting (missing
and size-1 batch dims on either side); int8 extremes, a sweep of ratios from
vanishing to saturating with ``m``, ``s`` fed as inputs to one compiled
module; the int32 accumulator at its limit; the lowering's refusals.
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
from intq.passes.ops.matmul import MAX_K
from intq.quantizer.ops import linear
from intq.quantizer.ops.matmul import IntMatMul, IntMatMulAcc
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


def symbolic(model: onnx.ModelProto, dims: dict[str, dict[int, str]]) -> onnx.ModelProto:
    """``model`` with dim ``i`` of graph input ``name`` renamed to the symbol ``dims[name][i]``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in out.graph.input:
        for i, symbol in dims.get(value.name, {}).items():
            value.type.tensor_type.shape.dim[i].dim_param = symbol
    return out


def params_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its scalar ``m``, ``s`` initializers turned into int64 ``[1]`` graph inputs (buffers)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        out.graph.input.append(helper.make_tensor_value_info(init.name, onnx.TensorProto.INT64, [1]))
    del out.graph.initializer[:]
    return out


def assert_tvm_equals_ort(model: onnx.ModelProto, feeds_list: list[dict[str, np.ndarray]], op=None) -> list:
    """Compile ``model`` once; every feed must give onnxruntime's output exactly (and ``op``'s, if given).

    Returns the outputs, one per feed.
    """
    mod = import_onnx(model)
    prim_funcs = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, compat.tirx.PrimFunc)]
    assert len(prim_funcs) == 1 and prim_funcs[0].startswith("intq_matmul"), prim_funcs
    runnable = build(mod)
    outputs = []
    for feeds in feeds_list:
        want = ort_run(model, feeds)
        (got,) = run(runnable, feeds)
        assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
        np.testing.assert_array_equal(got, want)
        if op is not None:
            np.testing.assert_array_equal(op(torch.from_numpy(feeds["a"]), torch.from_numpy(feeds["b"])).numpy(), want)
        outputs.append(got)
    return outputs


def int8s(rng, shape) -> np.ndarray:
    """Random int8 with a quarter of the entries at the extremes -128 / 127."""
    x = rng.integers(-128, 127, size=shape, endpoint=True)
    extreme = rng.random(shape) < 0.25
    x[extreme] = rng.choice([-128, 127], size=int(extreme.sum()))
    return x.astype(np.int8)


def make_op(cls, ratio: float = 3e-4):
    return IntMatMulAcc() if cls is IntMatMulAcc else cls(ratio)


# --- attention's products, symbolic dims ----------------------------------------------------------


@pytest.mark.parametrize("cls", [IntMatMul, IntMatMulAcc])
def test_q_at_k_transposed_symbolic_batch_and_sequence(cls):
    op = make_op(cls)
    a, b = np.zeros((2, 3, 5, 16), np.int8), np.zeros((2, 3, 16, 5), np.int8)
    model = symbolic(single_op_model(op, [a, b]), {"a": {0: "batch", 2: "seq"}, "b": {0: "batch", 3: "seq"}})
    rng = np.random.default_rng(0)
    feeds = [{"a": int8s(rng, (n, 3, s, 16)), "b": int8s(rng, (n, 3, 16, s))} for n, s in [(1, 1), (2, 17)]]
    assert_tvm_equals_ort(model, feeds, op)


@pytest.mark.parametrize("cls", [IntMatMul, IntMatMulAcc])
def test_p_at_v_reduces_over_the_symbolic_sequence(cls):
    op = make_op(cls, 2e-3)
    a, b = np.zeros((2, 3, 5, 5), np.int8), np.zeros((2, 3, 5, 8), np.int8)
    model = symbolic(single_op_model(op, [a, b]), {"a": {0: "batch", 2: "seq", 3: "seq"}, "b": {0: "batch", 2: "seq"}})
    rng = np.random.default_rng(1)
    feeds = [{"a": int8s(rng, (n, 3, s, s)), "b": int8s(rng, (n, 3, s, 8))} for n, s in [(1, 3), (3, 33)]]
    assert_tvm_equals_ort(model, feeds, op)


# --- batch broadcasting --------------------------------------------------------------------------

BROADCASTS = {
    "size1_both_sides": ((2, 1, 4, 5), (1, 3, 5, 6)),
    "missing_batch_on_b": ((2, 3, 4, 5), (5, 6)),
    "missing_batch_on_a": ((4, 5), (2, 3, 5, 6)),
    "rank3_against_rank4": ((3, 4, 5), (2, 1, 5, 6)),
    "matrix": ((7, 9), (9, 4)),
    "vector_like_rows": ((3, 1, 9), (3, 9, 1)),
}


@pytest.mark.parametrize("case", list(BROADCASTS))
def test_batch_broadcast(case):
    a_shape, b_shape = BROADCASTS[case]
    rng = np.random.default_rng(2)
    feeds = {"a": int8s(rng, a_shape), "b": int8s(rng, b_shape)}
    op = IntMatMul(1e-3)
    assert_tvm_equals_ort(single_op_model(op, [feeds["a"], feeds["b"]]), [feeds], op)


def test_symbolic_batch_against_a_broadcast_one():
    """``a`` [batch, 1, M, K] with a symbolic batch, ``b`` [1, heads, K, N]: run at batch 1 and 4."""
    op = IntMatMulAcc()
    model = symbolic(
        single_op_model(op, [np.zeros((2, 1, 4, 6), np.int8), np.zeros((1, 3, 6, 5), np.int8)]), {"a": {0: "batch"}}
    )
    rng = np.random.default_rng(3)
    feeds = [{"a": int8s(rng, (n, 1, 4, 6)), "b": int8s(rng, (1, 3, 6, 5))} for n in (1, 4)]
    assert_tvm_equals_ort(model, feeds, op)


def test_batch_dims_resolved_at_run_time():
    """Two unrelated batch symbols (either may be the 1 that broadcasts) and a symbolic K against a static one."""
    op = IntMatMul(2e-3)
    example = [np.zeros((2, 4, 6), np.int8), np.zeros((2, 6, 3), np.int8)]
    model = symbolic(single_op_model(op, example), {"a": {0: "n", 2: "k"}, "b": {0: "m"}})
    rng = np.random.default_rng(5)
    runs = [(1, 4), (4, 1), (3, 3), (1, 1)]
    feeds = [{"a": int8s(rng, (n, 4, 6)), "b": int8s(rng, (m, 6, 3))} for n, m in runs]
    assert_tvm_equals_ort(model, feeds, op)


# --- adversarial integers ---------------------------------------------------------------------------

RATIOS = [1e-12, 2.0**-20, 2.0**-14, 3.1e-5, -7.7e-4, 2.0**-7, 0.5, 1.0, -1.0, 37.0, 2.0**20]


def test_ratio_sweep_with_params_as_buffers():
    """One module, ``m``, ``s`` fed per ratio: vanishing, exact ties (powers of two), negative, saturating."""
    k = 64
    rows = [np.full(k, -128), np.full(k, 127), np.tile([127, -128], k // 2), np.arange(k) - 32, np.zeros(k)]
    a = np.stack(rows).astype(np.int8)[None]  # [1, 5, K]
    b = np.stack([np.full(k, -128), np.full(k, 127), np.tile([-128, 127], k // 2), np.ones(k), -np.ones(k)], 1)
    b = b.astype(np.int8)[None]  # [1, K, 5]
    model = symbolic(params_as_inputs(single_op_model(IntMatMul(1e-3), [a, b])), {"a": {0: "n"}, "b": {0: "n"}})
    rng = np.random.default_rng(4)
    feeds = []
    for ratio in RATIOS:
        op = IntMatMul(ratio)
        params = {name: np.asarray(getattr(op, name)).reshape(1) for name in ("m", "s")}
        feeds.append({"a": a, "b": b, **params})
        feeds.append({"a": int8s(rng, (2, 5, k)), "b": int8s(rng, (2, k, 5)), **params})
    outputs = np.concatenate([y.reshape(-1) for y in assert_tvm_equals_ort(model, feeds)])
    assert outputs.min() == -128 and outputs.max() == 127  # the sweep saturates both ways


@pytest.mark.parametrize("cls", [IntMatMul, IntMatMulAcc])
def test_accumulator_at_the_int32_limit(cls):
    """K = MAX_K with all -128 operands: acc = K * 2**14 = 2**31 - 16384, the largest the bound admits."""
    assert linear.MAX_K == MAX_K
    k = MAX_K
    a = np.stack([np.full(k, -128), np.full(k, 127), np.tile([-128, 127], k)[:k]]).astype(np.int8)[None]
    b = np.stack([np.full(k, -128), np.full(k, 127), np.tile([127, -128], k)[:k]], 1).astype(np.int8)[None]
    acc = a[0].astype(np.int64) @ b[0].astype(np.int64)
    assert acc.max() == k * 2**14 and acc.min() < -(2**30)
    op = make_op(cls, 2.0**-24)
    assert_tvm_equals_ort(single_op_model(op, [a, b]), [{"a": a, "b": b}], op)


# --- refusals ---------------------------------------------------------------------------------------


def _named(model: onnx.ModelProto, name: str = "attn_scores") -> onnx.ModelProto:
    model.graph.node[0].name = name
    return model


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "dims", "reason"),
    [
        ((2, 4, 5), (2, 6, 3), {}, "do not multiply"),
        ((2, 4, 5), (3, 5, 3), {}, r"dims \[2, 3\] at axis -1 do not broadcast"),
        ((5,), (5, 3), {}, "at least 2-D"),
        ((1, MAX_K + 1), (MAX_K + 1, 1), {}, "overflow the int32 accumulator"),
    ],
)
def test_refusals_name_the_node(a_shape, b_shape, dims, reason):
    model = _named(
        symbolic(single_op_model(IntMatMul(1e-3), [np.zeros(a_shape, np.int8), np.zeros(b_shape, np.int8)]), dims)
    )
    with pytest.raises(IntqLoweringError, match=rf"IntMatMul node 'attn_scores'.*{reason}"):
        import_onnx(model)


def test_int16_operand_is_refused():
    model = _named(single_op_model(IntMatMulAcc(), [np.zeros((4, 5), np.int16), np.zeros((5, 3), np.int8)]))
    with pytest.raises(IntqLoweringError, match=r"IntMatMulAcc node 'attn_scores': a must be int8, got int16"):
        import_onnx(model)
