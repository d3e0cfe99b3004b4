"""Canonicalization rules on hand-built ONNX graphs: how often each rule
applied, which ops remain, and that the rewritten float graph computes what
onnxruntime computes on the original."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from intq.export.onnx_reader import OnnxOp, read_onnx
from intq.quantizer.canonical import FGelu, FLayerNorm, FLinear, FMatMul, FScale, FSoftmax
from intq.quantizer.canonicalize import canonicalize

RNG = np.random.default_rng(0)


def model(nodes, inits, inputs=(("x", [2, 5, 8]),), outputs=("y",), opset=18, out_shape=None):
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, out_shape or inputs[0][1]) for n in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), name=k) for k, v in inits.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def run_rules(m, x):
    gm = read_onnx(m)
    counts = canonicalize(gm, (torch.from_numpy(x),))
    kinds = [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    remaining = [
        gm.get_submodule(n.target).op_type
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), OnnxOp)
    ]
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    got = gm(torch.from_numpy(x))[0].detach().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    return counts, kinds, remaining


def decomposed_layernorm(x="x", out="y", eps=1e-5, gamma=True):
    nodes = [
        helper.make_node("ReduceMean", [x, "axes"], ["mu"], keepdims=1),
        helper.make_node("Sub", [x, "mu"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]),
        helper.make_node("ReduceMean", ["d2", "axes"], ["var"], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["n" if gamma else out]),
    ]
    inits = {"axes": np.array([-1], np.int64), "two": np.array(2.0, np.float32), "eps": np.array(eps, np.float32)}
    if gamma:
        nodes += [helper.make_node("Mul", ["n", "g"], ["ng"]), helper.make_node("Add", ["ng", "b"], [out])]
        inits |= {"g": f32(8), "b": f32(8)}
    return nodes, inits


def test_written_out_layernorm_becomes_one_layernorm():
    nodes, inits = decomposed_layernorm()
    counts, kinds, remaining = run_rules(model(nodes, inits), f32(2, 5, 8))
    assert counts["layer_norm"] == 1
    assert kinds == [FLayerNorm] and remaining == []


def test_layernormalization_op_becomes_layernorm():
    n = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-6)
    counts, kinds, _ = run_rules(model([n], {"g": f32(8), "b": f32(8)}), f32(2, 5, 8))
    assert counts["layer_norm"] == 1 and kinds == [FLayerNorm]


def test_layernorm_over_another_axis_is_left_alone():
    """Negative: the guard (normalize over the last axis) fails, the graph is unchanged."""
    nodes, inits = decomposed_layernorm(gamma=False)
    inits["axes"] = np.array([1], np.int64)
    counts, kinds, remaining = run_rules(model(nodes, inits), f32(2, 5, 8))
    assert counts["layer_norm"] == 0
    assert "Sqrt" in remaining and FLayerNorm not in kinds


@pytest.mark.parametrize("order", ["x_times_add_then_half", "half_x_times_add", "x_times_half_add"])
def test_erf_gelu_in_each_association_order(order):
    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["xs"]),
        helper.make_node("Erf", ["xs"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
    ]
    if order == "x_times_add_then_half":
        nodes += [helper.make_node("Mul", ["x", "e1"], ["p"]), helper.make_node("Mul", ["p", "half"], ["y"])]
    elif order == "half_x_times_add":
        nodes += [helper.make_node("Mul", ["x", "half"], ["h"]), helper.make_node("Mul", ["h", "e1"], ["y"])]
    else:
        nodes += [helper.make_node("Mul", ["e1", "half"], ["h"]), helper.make_node("Mul", ["x", "h"], ["y"])]
    inits = {
        "sqrt2": np.array(math.sqrt(2), np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
    }
    counts, kinds, remaining = run_rules(model(nodes, inits), f32(2, 5, 8))
    assert counts["gelu"] == 1 and kinds == [FGelu] and remaining == []


def test_erf_with_a_wrong_constant_is_not_gelu():
    nodes = [
        helper.make_node("Div", ["x", "c"], ["xs"]),
        helper.make_node("Erf", ["xs"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["x", "e1"], ["p"]),
        helper.make_node("Mul", ["p", "half"], ["y"]),
    ]
    inits = {"c": np.array(3.0, np.float32), "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32)}
    counts, kinds, remaining = run_rules(model(nodes, inits), f32(2, 5, 8))
    assert counts["gelu"] == 0 and "Erf" in remaining


def test_matmul_plus_bias_becomes_linear_and_gemm_too():
    w, b = f32(8, 4), f32(4)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    counts, kinds, _ = run_rules(model(nodes, {"w": w, "b": b}, out_shape=[2, 5, 4]), f32(2, 5, 8))
    assert counts["linear"] == 1 and kinds == [FLinear]

    gemm = helper.make_node("Gemm", ["x", "wt", "b"], ["y"], transB=1, alpha=0.5, beta=2.0)
    m = model([gemm], {"wt": f32(4, 8), "b": f32(4)}, inputs=(("x", [3, 8]),), out_shape=[3, 4])
    counts, kinds, _ = run_rules(m, f32(3, 8))
    assert counts["linear"] == 1 and kinds == [FLinear]


def test_pre_transposed_weight_is_folded_then_linear():
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
    counts, kinds, _ = run_rules(model(nodes, {"w": f32(4, 8)}, out_shape=[2, 5, 4]), f32(2, 5, 8))
    assert counts["fold_constants"] == 1 and counts["linear"] == 1 and kinds == [FLinear]


def test_attention_core_scaled_matmul_softmax():
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "xt"], ["s"]),
        helper.make_node("Div", ["s", "c"], ["sc"]),
        helper.make_node("Softmax", ["sc"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "x"], ["y"]),
    ]
    counts, kinds, remaining = run_rules(model(nodes, {"c": np.array(2.0, np.float32)}), f32(2, 5, 8))
    assert counts["matmul"] == 2 and counts["scale"] == 1 and counts["softmax"] == 1
    assert kinds.count(FMatMul) == 2 and FScale in kinds and FSoftmax in kinds
    assert remaining == ["Transpose"]


def test_softmax_over_a_middle_axis_is_left_alone():
    n = helper.make_node("Softmax", ["x"], ["y"], axis=1)
    counts, kinds, remaining = run_rules(model([n], {}), f32(2, 5, 8))
    assert counts["softmax"] == 0 and remaining == ["Softmax"]


def test_negative_scale_is_not_a_scale():
    n = helper.make_node("Mul", ["x", "c"], ["y"])
    counts, _, remaining = run_rules(model([n], {"c": np.array(-2.0, np.float32)}), f32(2, 5, 8))
    assert counts["scale"] == 0 and remaining == ["Mul"]


def test_identity_and_dropout_are_dropped():
    nodes = [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Dropout", ["a"], ["y"])]
    counts, kinds, _ = run_rules(model(nodes, {}), f32(2, 5, 8))
    assert counts["drop_identity"] == 2 and kinds == []


def test_model_check_passes_on_inputs():
    nodes, inits = decomposed_layernorm()
    onnx.checker.check_model(model(nodes, inits))
