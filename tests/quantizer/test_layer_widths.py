"""Which layers share an input width, checked against the integer ranges the converter really gives their inputs.

The graph is transformer-shaped, on [n, 4, 8]::

    x -> LayerNorm -> q (8 -> 8) --+-- add -> GELU -> fc (8 -> 8) -> out (8 -> 3)
                  \\-> k (8 -> 8) --/

``q`` and ``k`` read one LayerNorm output: tied.  ``fc`` reads a GELU output, which is int8 at every width.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import intq
from intq.quantizer.layer_widths import fixed_int8_inputs, input_ranges, range_bits, shared_input_groups


def block() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "be"], ["ln"], name="norm", axis=-1),
        helper.make_node("MatMul", ["ln", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["ln", "wk"], ["k"], name="k"),
        helper.make_node("Add", ["q", "k"], ["s"], name="sum"),
        helper.make_node("Gelu", ["s"], ["h"], name="gelu"),
        helper.make_node("MatMul", ["h", "wf"], ["f"], name="fc"),
        helper.make_node("MatMul", ["f", "wo"], ["y"], name="out"),
    ]
    inits = {
        "g": 1 + 0.1 * rng.standard_normal(8),
        "be": 0.1 * rng.standard_normal(8),
        **{w: 0.4 * rng.standard_normal((8, 8)) for w in ("wq", "wk", "wf")},
        "wo": 0.4 * rng.standard_normal((8, 3)),
    }
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 3])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.fixture(scope="module")
def calib():
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(3, 4, 8, generator=gen) * 2 for _ in range(2)]


def quantize(calib, **layer_bits):
    return intq.quantize(block(), calib, intq.QuantConfig(layer_bits=layer_bits), progress=False)


def test_groups_and_fixed_inputs(calib):
    gm = quantize(calib).float_graph
    assert shared_input_groups(gm) == [("q", "k")]
    assert fixed_int8_inputs(gm) == ["fc"]


@pytest.mark.parametrize(
    "bits, expected",
    [
        # the tie honoured: both 4-bit layers read a 4-bit (requantized, per-tensor) LayerNorm output
        (dict(q=4, k=4, fc=4), dict(q=4, k=4, fc=8, out=8)),
        # broken: the LayerNorm output is requantized at its widest reader's width, so q reads 8 bits
        (dict(q=4, k=8, fc=8), dict(q=8, k=8, fc=8, out=8)),
        # fc's GELU input is int8 at any width (W4A8); out reads fc's output at out's width
        (dict(fc=4, out=4), dict(q=8, k=8, fc=8, out=4)),
    ],
)
def test_input_ranges_follow_the_converter(calib, bits, expected):
    qmodel = quantize(calib, **bits)
    ranges = input_ranges(qmodel)
    assert {n: range_bits(*r) for n, r in ranges.items()} == expected
    # the ranges are the integers that really arrive: run the integer graph and look
    seen = {}
    gm = qmodel.graph_module
    source = {r.name: r.source for r in qmodel.layers}
    hooks = [
        gm.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen.__setitem__(source[name], (int(args[0].min()), int(args[0].max())))
        )
        for name in gm.meta["layer_bits"]
    ]
    try:
        qmodel(calib[0])
    finally:
        for h in hooks:
            h.remove()
    for name, (lo, hi) in seen.items():
        assert ranges[name][0] <= lo and hi <= ranges[name][1], (name, ranges[name], (lo, hi))
    assert max(hi for name, (_, hi) in seen.items() if expected[name] == 8) > 7


def test_range_bits():
    cases = {(-8, 7): 4, (0, 15): 4, (0, 6): 4, (-128, 127): 8, (0, 127): 8, (-8, 15): 8, (-9, 7): 8}
    assert {r: range_bits(*r) for r in cases} == cases
