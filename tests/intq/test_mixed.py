"""Mixed 4/8-bit precision: the plan meets its budget by the cost table's own numbers, honours pins and ties,
and its 4-bit layers are 4-bit in the integer ONNX (packed INT4 weights) and read 4-bit activations;
``intq.pareto`` sweeps budgets with the uniform points; an infeasible budget names the smallest feasible one.

The model is a residual CNN small enough for every kernel to compile and time in seconds::

    x [n, 3, 8, 8] -> conv0 3x3 -> relu -> convA 3x3 -> relu -> convB 3x3 --+-- add -> relu -> convC 3x3 -> relu
                              \\----------------------- convS 1x1 ----------/
      -> global average pool -> flatten -> fc (8 -> 10)

``convA`` and ``convS`` read one activation (the ReLU of conv0): a tie group.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import intq
from intq.ilp.costs import model_layer_bits, predict_latency
from intq.ilp.solve import InfeasibleBudgetError
from intq.mixed import analyze, plan_from, plan_mixed_precision
from intq.quantizer.layer_widths import shared_input_groups
from intq.quantizer.ops.conv import IntConv2d
from intq.quantizer.ops.linear import IntLinear, IntLinearAcc

FAST = dict(repeats=3, min_repeat_ms=1.0, hutchinson_samples=6, progress=False)
LAYERS = ["conv0", "convA", "convB", "convS", "convC", "fc"]


def residual_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(11)

    def conv(name, x, y, cin, cout, k):
        return helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name, pads=[k // 2] * 4), {
            f"{name}_w": rng.standard_normal((cout, cin, k, k)) * (1.5 / math.sqrt(cin * k * k)),
            f"{name}_b": rng.standard_normal(cout) * 0.1,
        }

    parts = [
        conv("conv0", "x", "c0", 3, 8, 3),
        (helper.make_node("Relu", ["c0"], ["r0"], name="relu0"), {}),
        conv("convA", "r0", "ca", 8, 8, 3),
        (helper.make_node("Relu", ["ca"], ["ra"], name="reluA"), {}),
        conv("convB", "ra", "cb", 8, 8, 3),
        conv("convS", "r0", "cs", 8, 8, 1),
        (helper.make_node("Add", ["cb", "cs"], ["s"], name="add"), {}),
        (helper.make_node("Relu", ["s"], ["r1"], name="relu1"), {}),
        conv("convC", "r1", "cc", 8, 8, 3),
        (helper.make_node("Relu", ["cc"], ["rc"], name="reluC"), {}),
        (helper.make_node("GlobalAveragePool", ["rc"], ["p"], name="pool"), {}),
        (helper.make_node("Flatten", ["p"], ["f"], name="flat", axis=1), {}),
        (helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1), {}),
    ]
    inits = {"fc_w": rng.standard_normal((10, 8)) * 0.3, "fc_b": rng.standard_normal(10) * 0.1}
    for _, arrays in parts:
        inits.update(arrays)
    graph = helper.make_graph(
        [node for node, _ in parts],
        "residual_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def calib():
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(3)]


@pytest.fixture(scope="module")
def analysis(calib):
    return analyze(residual_cnn(), calib, target="x86", **FAST)


def _fraction(costs, bits, column) -> float:
    """A cost kind of ``bits`` over the all-8 cost, summed here from the cost table's entries."""
    got = math.fsum(getattr(costs[n][b], column) for n, b in bits.items())
    return got / math.fsum(getattr(costs[n][8], column) for n in bits)


def _latency_costs(costs) -> dict[str, dict[int, float]]:
    """Each layer's latency cost as the budget counts it, from the measured times: its kernel, plus at 4 bits its
    share (of the layers' 8-bit time) of how much longer the time outside the kernels is in the 4-bit model."""
    assert not any(per[4].synthetic for per in costs.values())  # the 4-bit model has every layer at 4
    lat = {n: {b: per[b].latency_s for b in (4, 8)} for n, per in costs.items()}
    total8 = math.fsum(per[8] for per in lat.values())
    r8 = costs.model_latency_s[8] - total8
    r4 = costs.model_latency_s[4] - math.fsum(per[4] for per in lat.values())
    return {n: {8: per[8], 4: per[4] + per[8] / total8 * (r4 - r8)} for n, per in lat.items()}


def _int4_layers(qmodel) -> set[str]:
    """The ONNX node names of the layers whose weights are packed INT4 initializers in the integer ONNX."""
    packed = {t.name for t in qmodel.to_onnx().graph.initializer if t.data_type == TensorProto.INT4}
    return {r.source for r in qmodel.layers if f"{r.name}.w.int4" in packed}


def _input_integers(qmodel, batch) -> dict[str, tuple[int, int]]:
    """(min, max) of the integers each weighted layer reads on ``batch``, by ONNX node name."""
    gm, seen = qmodel.graph_module, {}
    source = {r.name: r.source for r in qmodel.layers}
    hooks = []
    for name in gm.meta["layer_bits"]:
        mod = gm.get_submodule(name)
        assert isinstance(mod, (IntConv2d, IntLinear, IntLinearAcc)), name

        def hook(_mod, args, name=name):
            seen[source[name]] = (int(args[0].min()), int(args[0].max()))

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        qmodel(batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_ties_are_the_layers_sharing_an_input(analysis):
    assert shared_input_groups(analysis.qmodel_8bit.float_graph) == [("convA", "convS")]
    assert analysis.table.ties == (("convA", "convS"),)
    assert analysis.table.resolved_pins() == {"conv0": 8, "fc": 8}
    assert [r.name for r in analysis.table.layers] == LAYERS


def test_table_costs_are_the_cost_tables(analysis):
    for row in analysis.table.layers:
        per = analysis.costs[row.name]
        assert row.size_bytes == {b: per[b].size_bytes for b in (4, 8)}  # bias included, as ilp.costs counts
        assert row.bops == {b: per[b].bops for b in (4, 8)}
        assert row.latency == {b: per[b].latency_s for b in (4, 8)}
    # convA: 8x8x3x3 weights, 8 int32 biases
    assert analysis.table.row("convA").size_bytes == {4: 288 + 32, 8: 576 + 32}


def test_plan_meets_a_size_budget_with_pins_ties_and_real_4bit_layers(calib):
    # all-8 size: conv0 248 + convA 608 + convB 608 + convS 96 + convC 608 + fc 120 = 2288 bytes; 0.8 leaves
    # 1830, so at least two of the 288-byte savings (convA+convS, convB, convC) must be taken
    plan = plan_mixed_precision(residual_cnn(), calib, {"size": 0.8}, target=None, **FAST)
    bits = plan.layer_bits
    assert sorted(bits) == sorted(LAYERS)
    assert _fraction(plan.costs, bits, "size_bytes") <= 0.8
    assert plan.cost_fractions["size"] == pytest.approx(_fraction(plan.costs, bits, "size_bytes"), rel=1e-12)
    assert sum(b == 4 for b in bits.values()) >= 2
    assert bits["conv0"] == bits["fc"] == 8
    assert bits["convA"] == bits["convS"]
    assert plan.predicted_latency_s is None and plan.costs.remainder_s is None  # target=None: nothing timed
    # the widths are applied: records, packed INT4 initializers, and 4-bit input integers
    assert model_layer_bits(plan.qmodel) == bits
    assert _int4_layers(plan.qmodel) == {n for n, b in bits.items() if b == 4}
    ranges = _input_integers(plan.qmodel, calib[0])
    for name, b in bits.items():
        lo, hi = ranges[name]
        if b == 4 and name != "conv0":
            assert -8 <= lo and hi <= 15 and (lo >= 0 or hi <= 7), (name, lo, hi)
    assert max(hi for name, (_, hi) in ranges.items() if bits[name] == 8 and name != "conv0") > 15


def test_untied_layers_read_the_wider_activation(analysis, calib):
    """Why the tie: convA at 4 bits beside convS at 8 reads conv0's activation at 8 bits (W4A8, not W4A4)."""
    config = intq.QuantConfig(layer_bits={"convA": 4, "convS": 8})
    q = intq.quantize(analysis.source, calib, config, progress=False)
    lo, hi = _input_integers(q, calib[0])["convA"]
    assert hi > 15, (lo, hi)


def test_plan_meets_a_latency_budget_by_the_predicted_costs(analysis):
    floor = _floor(analysis)
    budget = min(1.0, floor + 0.5 * (1.0 - floor)) if floor < 1.0 else floor * 1.0001
    plan = plan_from(analysis, {"latency": budget}, progress=False)
    latency = _latency_costs(analysis.costs)
    spent = math.fsum(latency[n][b] for n, b in plan.layer_bits.items())
    assert spent <= budget * math.fsum(per[8] for per in latency.values()) * (1 + 1e-9)
    assert plan.predicted_latency_s == pytest.approx(predict_latency(analysis.costs, plan.layer_bits), rel=1e-12)
    assert plan.predicted_latency_s == pytest.approx(analysis.costs.remainder_s + spent, rel=1e-9)
    assert plan.layer_bits["convA"] == plan.layer_bits["convS"]
    assert model_layer_bits(plan.qmodel) == plan.layer_bits
    report = plan.report(measured_latency_s=plan.predicted_latency_s)
    assert [r["layer"] for r in report["layers"]] == LAYERS
    assert report["latency"]["error"] == pytest.approx(0.0)


def _floor(analysis) -> float:
    """The least latency fraction the pins and ties allow, summed here per free group."""
    costs = _latency_costs(analysis.costs)
    pinned = costs["conv0"][8] + costs["fc"][8]
    free = [("convA", "convS"), ("convB",), ("convC",)]
    least = pinned + math.fsum(min(math.fsum(costs[n][b] for n in g) for b in (4, 8)) for g in free)
    return least / math.fsum(costs[n][8] for n in LAYERS)


def test_infeasible_budget_names_the_smallest_feasible_one(analysis):
    smallest = (248 + 120 + 320 + 320 + 64 + 320) / 2288  # pinned layers at 8, every other layer at 4
    with pytest.raises(InfeasibleBudgetError, match=r"smallest feasible budget is 0\.6084") as info:
        plan_from(analysis, {"size": 0.5}, progress=False)
    assert info.value.minimum["size"] == pytest.approx(smallest, rel=1e-12)


def test_latency_budget_without_a_timed_target_is_refused(calib):
    with pytest.raises(ValueError, match="latency budget needs the kernels timed"):
        plan_mixed_precision(residual_cnn(), calib, {"latency": 0.9}, target=None, **FAST)


def test_pareto_sweeps_budgets_with_the_uniform_points(analysis, calib, monkeypatch):
    import intq.mixed

    monkeypatch.setattr(intq.mixed, "analyze", lambda *a, **k: analysis)  # reuse the module's measurements
    float_logits = [torch.as_tensor(onnx_float(analysis.source, b)) for b in calib]

    def agreement(qmodel) -> float:
        hits = [(qmodel(b).argmax(1) == f.argmax(1)).float().mean() for b, f in zip(calib, float_logits, strict=True)]
        return float(torch.stack(hits).mean())

    with pytest.warns(UserWarning, match=r"(?s)skipped size=0\.5: .*smallest feasible budget is 0\.6084"):
        points = intq.pareto(residual_cnn(), calib, agreement, budgets=(0.75, 0.5, 0.9), kind="size", **FAST)
    assert [p.uniform for p in points] == [8, 4, None, None]
    assert [p.budget for p in points] == [None, None, 0.9, 0.75]
    assert points[0].layer_bits == dict.fromkeys(LAYERS, 8)
    assert {n for n, b in points[1].layer_bits.items() if b == 4} == {"convA", "convB", "convS", "convC"}
    for p in points[2:]:
        assert p.cost_fractions["size"] <= p.budget
        assert p.layer_bits["conv0"] == p.layer_bits["fc"] == 8
    # the integer ONNX file's bytes (on a model this small, mostly the ONNX functions each width adds)
    assert points[0].size_bytes == len(analysis.qmodel_8bit.to_onnx().SerializeToString())
    for p in points:
        assert 0.0 <= p.accuracy <= 1.0
        assert p.measured_latency_s > 0 and p.predicted_latency_s > 0
    assert points[0].accuracy == agreement(analysis.qmodel_8bit)


def onnx_float(model: onnx.ModelProto, batch: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": batch.numpy()})[0]
