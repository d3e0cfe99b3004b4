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
from intq.quantizer.canonical import (
    FAvgPool,
    FClamp,
    FConv2d,
    FGelu,
    FLayerNorm,
    FLinear,
    FMatMul,
    FMul,
    FScale,
    FSoftmax,
    FTable,
)
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
    # the reductions stay; the elementwise pieces between them (d ** 2, sqrt(var + eps)) become tables
    assert remaining.count("ReduceMean") == 2 and FLayerNorm not in kinds


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
    # not GELU: the function of x it is becomes one lookup table instead
    assert counts["gelu"] == 0 and counts["elementwise"] == 1
    assert kinds == [FTable] and remaining == []


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
    counts, kinds, remaining = run_rules(model([n], {"c": np.array(-2.0, np.float32)}), f32(2, 5, 8))
    # a negative factor is not a scale: it stays a product with a constant (IntMul)
    assert counts["scale"] == 0 and counts["mul"] == 1 and kinds == [FMul] and remaining == []


def test_identity_and_dropout_are_dropped():
    nodes = [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Dropout", ["a"], ["y"])]
    counts, kinds, _ = run_rules(model(nodes, {}), f32(2, 5, 8))
    assert counts["drop_identity"] == 2 and kinds == []


def test_model_check_passes_on_inputs():
    nodes, inits = decomposed_layernorm()
    onnx.checker.check_model(model(nodes, inits))


# --- CNN rules (issue 5) -------------------------------------------------------------------------

IMG = [2, 3, 8, 8]


def conv_node(x="x", y="c", w="w", b="b", **attrs):
    return helper.make_node("Conv", [x, w, b], [y], **attrs)


def bn_params(c=4):
    return {
        "g": RNG.uniform(0.5, 1.5, c).astype(np.float32),
        "beta": f32(c),
        "mu": f32(c),
        "var": RNG.uniform(0.5, 2.0, c).astype(np.float32),
    }


def bn_node(x="c", y="y"):
    return helper.make_node("BatchNormalization", [x, "g", "beta", "mu", "var"], [y], epsilon=1e-3)


def conv_params(o=4, c=3, k=3):
    return {"w": f32(o, c, k, k), "b": f32(o)}


def test_batchnorm_folds_into_its_conv():
    m = model(
        [conv_node(pads=[1, 1, 1, 1]), bn_node()],
        conv_params() | bn_params(),
        inputs=(("x", IMG),),
        out_shape=[2, 4, 8, 8],
    )
    counts, kinds, remaining = run_rules(m, f32(*IMG))
    assert counts["conv"] == 1 and counts["batch_norm"] == 1
    assert kinds == [FConv2d] and remaining == []


def test_batchnorm_of_a_conv_with_two_users_is_left_alone():
    """Negative: the conv output also feeds an Add, so folding BN into the conv would change the Add."""
    nodes = [conv_node(pads=[1, 1, 1, 1]), bn_node(y="n"), helper.make_node("Add", ["n", "c"], ["y"])]
    m = model(nodes, conv_params() | bn_params(), inputs=(("x", IMG),), out_shape=[2, 4, 8, 8])
    counts, kinds, remaining = run_rules(m, f32(*IMG))
    assert counts["batch_norm"] == 0 and "BatchNormalization" in remaining


def test_batchnorm_without_a_conv_is_left_alone():
    m = model([bn_node(x="x")], bn_params(3), inputs=(("x", IMG),), out_shape=IMG)
    counts, _, remaining = run_rules(m, f32(*IMG))
    assert counts["batch_norm"] == 0 and remaining == ["BatchNormalization"]


@pytest.mark.parametrize(
    ("pads", "axes", "conv_pads", "folded", "out_hw"),
    [
        ([0, 0, 0, 0, 0, 0, 1, 1], None, [0, 0, 0, 0], (0, 0, 1, 1), [4, 4]),  # TF "same", stride 2: bottom/right
        ([0, 0, 2, 0, 0, 0, 1, 3], None, [1, 1, 1, 1], (3, 1, 2, 4), [6, 6]),  # adds to the conv's own pads
        ([1, 0, 0, 2], [2, 3], [0, 0, 0, 0], (1, 0, 0, 2), [4, 4]),  # the opset-18 axes input
    ],
)
def test_zero_pad_folds_into_the_following_conv(pads, axes, conv_pads, folded, out_hw):
    inputs = ["x", "pads"] + (["", "axes"] if axes else [])
    inits = conv_params() | {"pads": np.array(pads, np.int64)}
    if axes:
        inits["axes"] = np.array(axes, np.int64)
    nodes = [helper.make_node("Pad", inputs, ["p"]), conv_node(x="p", y="y", strides=[2, 2], pads=conv_pads)]
    m = model(nodes, inits, inputs=(("x", IMG),), out_shape=[2, 4, *out_hw])
    gm = read_onnx(m)
    counts = canonicalize(gm, (torch.from_numpy(f32(*IMG)),))
    convs = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert counts["fold_pad"] == 1 and len(convs) == 1 and convs[0].pads == folded
    run_rules(m, f32(*IMG))  # float parity with onnxruntime


@pytest.mark.parametrize(
    ("pads", "value", "then", "channels", "out"),
    [
        ([0, 0, 1, 1, 0, 0, 1, 1], 1.0, "Conv", 3, [2, 4, 8, 8]),  # pads with ones, not zeros
        ([0, 0, 0, 0, 0, 1, 0, 0], None, "Conv", 4, [2, 4, 6, 6]),  # pads a channel: not a convolution's padding
        ([0, 0, 1, 1, 0, 0, 1, 1], None, "MaxPool", 3, [2, 3, 9, 9]),  # MaxPool pads with -inf, not 0
    ],
)
def test_pad_that_is_not_a_conv_padding_stays(pads, value, then, channels, out):
    inputs = ["x", "pads"] + (["v"] if value is not None else [])
    inits = conv_params(c=channels) | {"pads": np.array(pads, np.int64)}
    if value is not None:
        inits["v"] = np.array(value, np.float32)
    second = (
        conv_node(x="p", y="y") if then == "Conv" else helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[2, 2])
    )
    m = model([helper.make_node("Pad", inputs, ["p"]), second], inits, inputs=(("x", IMG),), out_shape=out)
    counts, _, remaining = run_rules(m, f32(*IMG))
    assert counts["fold_pad"] == 0 and "Pad" in remaining


@pytest.mark.parametrize(
    ("nodes", "inits", "lo", "hi"),
    [
        ([helper.make_node("Relu", ["x"], ["y"])], {}, 0.0, math.inf),
        ([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], {"lo": 0.0, "hi": 6.0}, 0.0, 6.0),  # ReLU6
        ([helper.make_node("Clip", ["x", "", "hi"], ["y"])], {"hi": 0.5}, -math.inf, 0.5),
        (  # Relu then ReLU6: one clamp
            [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Clip", ["r", "lo", "hi"], ["y"])],
            {"lo": 0.0, "hi": 6.0},
            0.0,
            6.0,
        ),
    ],
)
def test_relu_and_clip_become_one_clamp(nodes, inits, lo, hi):
    inits = {k: np.array(v, np.float32) for k, v in inits.items()}
    m = model(nodes, inits, inputs=(("x", IMG),))
    gm = read_onnx(m)
    counts = canonicalize(gm, (torch.from_numpy(f32(*IMG) * 4),))
    mods = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert counts["clamp"] == len(nodes) and [type(x) for x in mods] == [FClamp]
    assert (mods[0].lo, mods[0].hi) == (lo, hi)
    run_rules(m, f32(*IMG) * 4)


def test_clip_with_a_computed_bound_stays():
    """Negative: the upper bound is an input, not a constant."""
    n = helper.make_node("Clip", ["x", "lo", "h"], ["y"])
    m = model([n], {"lo": np.array(0.0, np.float32)}, inputs=(("x", IMG), ("h", [])), out_shape=IMG)
    gm = read_onnx(m)
    counts = canonicalize(gm, (torch.from_numpy(f32(*IMG)), torch.tensor(1.0)))
    assert counts["clamp"] == 0


@pytest.mark.parametrize(
    ("node", "inits", "out_shape", "kernel", "remaining"),
    [
        (
            helper.make_node(
                "AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1
            ),
            {},
            [2, 3, 4, 4],
            (3, 3),
            [],
        ),
        (
            helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
            {},
            [2, 3, 4, 4],
            (2, 2),
            [],
        ),
        (helper.make_node("GlobalAveragePool", ["x"], ["y"]), {}, [2, 3, 1, 1], None, []),
        (helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1), {"axes": [2, 3]}, [2, 3, 1, 1], None, []),
        (
            helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0),
            {"axes": [-1, -2]},
            [2, 3],
            None,
            ["Squeeze"],
        ),
    ],
)
def test_average_pools_become_favgpool(node, inits, out_shape, kernel, remaining):
    inits = {k: np.array(v, np.int64) for k, v in inits.items()}
    m = model([node], inits, inputs=(("x", IMG),), out_shape=out_shape)
    gm = read_onnx(m)
    counts = canonicalize(gm, (torch.from_numpy(f32(*IMG)),))
    pools = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert counts["avg_pool"] == 1 and isinstance(pools[0], FAvgPool) and pools[0].kernel == kernel
    _, _, left = run_rules(m, f32(*IMG))
    assert left == remaining


def test_average_pool_not_counting_its_padding_is_refused_with_the_reason():
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)
    m = model([node], {}, inputs=(("x", IMG),), out_shape=IMG)
    gm = read_onnx(m)
    counts = canonicalize(gm, (torch.from_numpy(f32(*IMG)),))
    pool = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert counts["avg_pool"] == 0 and gm.get_submodule(pool.target).op_type == "AveragePool"
    assert "count_include_pad=0" in pool.meta["refused"]


def test_mean_over_channels_is_not_a_pool():
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1)
    m = model([node], {"axes": np.array([1], np.int64)}, inputs=(("x", IMG),), out_shape=[2, 1, 8, 8])
    counts, _, remaining = run_rules(m, f32(*IMG))
    assert counts["avg_pool"] == 0 and remaining == ["ReduceMean"]


def test_torch_export_of_a_cnn_leaves_only_canonical_ops_maxpool_and_reshape():
    """What ``torch.onnx.export(dynamo=True)`` emits for these layers is what the rules match."""
    from intq.quantizer.capture import capture

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
            self.bn = torch.nn.BatchNorm2d(8)
            self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            x = torch.nn.functional.pad(x, (0, 1, 0, 1))
            x = torch.relu(self.bn(self.conv(x)))
            x = torch.nn.functional.max_pool2d(torch.nn.functional.relu6(self.dw(x)), 2)
            x = torch.nn.functional.avg_pool2d(x, 2, 1)
            x = torch.nn.functional.adaptive_avg_pool2d(x, 1)
            return self.fc(torch.flatten(x, 1))

    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    gm = capture(net, (x,))
    canonicalize(gm, (x,))
    kinds = {type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"}
    onnx_left = {
        gm.get_submodule(n.target).op_type
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), OnnxOp)
    }
    assert kinds - {"OnnxOp"} == {"FConv2d", "FClamp", "FAvgPool", "FLinear"}
    assert onnx_left <= {"MaxPool", "Reshape", "Flatten"}, onnx_left
    with torch.no_grad():
        np.testing.assert_allclose(gm(x)[0].numpy(), net(x).numpy(), rtol=1e-4, atol=1e-5)
