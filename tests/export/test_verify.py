"""The integer-only verifier: passes on real exports, names planted float ops."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import intq
from intq.export.verify import IntegerOnlyError, float_ops_in_integer_region, verify_integer_only
from intq.models.vit import VisionTransformer, ViTConfig


@pytest.fixture(scope="module")
def int_model() -> onnx.ModelProto:
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig.deit_tiny(img_size=32, patch=4, depth=1, num_classes=10)).eval()
    return intq.quantize(model, [torch.randn(2, 3, 32, 32)], progress=False).to_onnx()


def test_real_export_is_integer_only(int_model):
    verify_integer_only(int_model)
    assert float_ops_in_integer_region(int_model) == []


def _plant_after(model: onnx.ModelProto, op_type: str) -> onnx.ModelProto:
    """Insert Cast->float, Mul 1.0, Cast->int8 after the first node of ``op_type``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = list(m.graph.node)
    k = next(i for i, n in enumerate(nodes) if n.op_type == op_type)
    victim = nodes[k].output[0]
    planted = [
        helper.make_node("Cast", [victim], ["planted_f"], name="planted_cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["planted_f", "planted_one"], ["planted_m"], name="planted_mul"),
        helper.make_node("Cast", ["planted_m"], ["planted_i"], name="planted_back", to=TensorProto.INT8),
    ]
    for n in nodes[k + 1 :]:
        for j, name in enumerate(n.input):
            if name == victim:
                n.input[j] = "planted_i"
    m.graph.initializer.append(helper.make_tensor("planted_one", TensorProto.FLOAT, [], [1.0]))
    del m.graph.node[:]
    m.graph.node.extend(nodes[: k + 1] + planted + nodes[k + 1 :])
    return m


def test_planted_float_op_is_named(int_model):
    bad = _plant_after(int_model, "ILayerNorm")
    with pytest.raises(IntegerOnlyError) as err:
        verify_integer_only(bad)
    msg = str(err.value)
    assert "planted_cast" in msg and "planted_mul" in msg and "FLOAT" in msg
    assert "planted_back" not in msg  # it produces int8 again


def test_float_op_inside_an_intq_function_is_caught(int_model):
    m = onnx.ModelProto()
    m.CopyFrom(int_model)
    fn = next(f for f in m.functions if f.name == "Shiftmax")
    first = fn.node[0]
    cast = helper.make_node("Cast", [first.input[0]], ["sneaky_f"], name="sneaky", to=TensorProto.FLOAT)
    back = helper.make_node("Cast", ["sneaky_f"], ["sneaky_i"], name="sneaky_back", to=TensorProto.INT32)
    first.input[0] = "sneaky_i"
    nodes = [cast, back] + list(fn.node)
    del fn.node[:]
    fn.node.extend(nodes)
    bad = float_ops_in_integer_region(m)
    assert any(op == "Cast" and "FLOAT" in v for _, op, v in bad), bad


def test_float_ops_before_the_quantizer_are_allowed():
    """Preprocessing on the float input lies outside the integer region."""
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["x2"], name="pre_scale"),
        helper.make_node("QuantizeLinear", ["x2", "s", "z"], ["q"], name="quant"),
        helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dequant"),
        helper.make_node("Relu", ["y"], ["out"], name="post_relu"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4])],
        initializer=[
            helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
            helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
            helper.make_tensor("z", TensorProto.INT8, [], [0]),
        ],
    )
    verify_integer_only(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))


@pytest.mark.parametrize("elem_type", [TensorProto.INT4, TensorProto.UINT4])
def test_four_bit_inputs_start_the_integer_region(elem_type):
    """INT4 / UINT4 values are integers: a float op on one (after a Cast to int8) is reported."""
    nodes = [
        helper.make_node("Cast", ["x"], ["x8"], name="widen", to=TensorProto.INT8),
        helper.make_node("Cast", ["x8"], ["xf"], name="to_float", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", elem_type, [4])],
        [helper.make_tensor_value_info("xf", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert float_ops_in_integer_region(model) == [("to_float", "Cast", "xf: FLOAT")]
