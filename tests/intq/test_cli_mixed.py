"""``quantize MODEL.onnx --bits 4/8 --budget ...``: the happy paths write the chosen widths (manifest, packed INT4
weights, report with sensitivity, costs and predicted vs measured latency); an infeasible budget exits 2 with the
smallest feasible one and writes nothing; ``--debug`` adds the LP file; misused flags are refused with a sentence.

The model is a small residual CNN (two convs read one activation, so they are tied)::

    conv0 -> relu -> convA -> relu -> convB --+-- add -> relu -> convC -> relu -> pool -> fc
                \\----------- convS 1x1 -----/
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from intq.cli import main

FAST = ["--timing-repeats", "3", "--hutchinson-samples", "6", "--quiet"]
LAYERS = ["conv0", "convA", "convB", "convS", "convC", "fc"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    rng = np.random.default_rng(11)
    folder = tmp_path_factory.mktemp("mixed")
    nodes, inits = [], {}

    def conv(name, x, y, cin, cout, k):
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name, pads=[k // 2] * 4))
        inits[f"{name}_w"] = rng.standard_normal((cout, cin, k, k)) * (1.5 / math.sqrt(cin * k * k))
        inits[f"{name}_b"] = rng.standard_normal(cout) * 0.1

    def op(kind, ins, out, **attrs):
        nodes.append(helper.make_node(kind, ins, [out], name=f"{kind.lower()}_{out}", **attrs))

    conv("conv0", "x", "c0", 3, 8, 3)
    op("Relu", ["c0"], "r0")
    conv("convA", "r0", "ca", 8, 8, 3)
    op("Relu", ["ca"], "ra")
    conv("convB", "ra", "cb", 8, 8, 3)
    conv("convS", "r0", "cs", 8, 8, 1)
    op("Add", ["cb", "cs"], "s")
    op("Relu", ["s"], "r1")
    conv("convC", "r1", "cc", 8, 8, 3)
    op("Relu", ["cc"], "rc")
    op("GlobalAveragePool", ["rc"], "p")
    op("Flatten", ["p"], "f", axis=1)
    nodes.append(helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1))
    inits["fc_w"] = rng.standard_normal((10, 8)) * 0.3
    inits["fc_b"] = rng.standard_normal(10) * 0.1
    graph = helper.make_graph(
        nodes,
        "residual_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = folder / "cnn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), model)
    calib = folder / "calib.npz"
    np.savez(calib, x=np.random.default_rng(5).standard_normal((8, 3, 8, 8)).astype(np.float32))
    return model, calib


def run(files, out, *extra) -> int:
    model, calib = files
    return main([str(model), "--calib", str(calib), "-o", str(out), "--batch-size", "4", *FAST, *map(str, extra)])


def int4_layers(out: Path, manifest: dict) -> set[str]:
    packed = {t.name for t in onnx.load(out / "model.int.onnx").graph.initializer if t.data_type == TensorProto.INT4}
    return {r["source"] for r in manifest["layers"] if f"{r['name']}.w.int4" in packed}


def layer_bits(manifest: dict) -> dict[str, int]:
    weighted = [
        r for r in manifest["layers"] if r["op"].startswith(("IntConv2d", "IntLinear")) and r["source"] in LAYERS
    ]
    return {r["source"]: r["bits"] for r in weighted}


def test_latency_and_size_budget_on_x86(files, tmp_path):
    out = tmp_path / "out"
    assert run(files, out, "--bits", "4/8", "--budget", "latency=1.5", "--budget", "size=0.8") == 0
    assert {p.name for p in out.iterdir()} == {"model.int.onnx", "model.x86.so", "manifest.json", "report.json",
                                               "report.md"}  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    bits = layer_bits(manifest)
    assert sorted(bits) == sorted(LAYERS) and bits["conv0"] == bits["fc"] == 8 and bits["convA"] == bits["convS"]
    assert manifest["config"]["layer_bits"] == bits
    assert int4_layers(out, manifest) == {n for n, b in bits.items() if b == 4} != set()
    mixed = report["mixed_precision"]
    assert mixed["budget"] == {"size": 0.8, "latency": 1.5}
    rows = {r["layer"]: r for r in mixed["layers"]}
    assert list(rows) == LAYERS
    size = sum(rows[n]["size_bytes"][str(b)] for n, b in bits.items()) / sum(
        r["size_bytes"]["8"] for r in rows.values()
    )
    lat = mixed["latency"]
    # the latency budget's cost: the chosen kernels, and the time outside them moved from its all-8 value towards
    # its all-4 value by the 4-bit layers' share of the layers' 8-bit time
    all8 = sum(r["latency_s"]["8"] for r in rows.values())
    share4 = sum(rows[n]["latency_s"]["8"] for n, b in bits.items() if b == 4) / all8
    latency = sum(rows[n]["latency_s"][str(b)] for n, b in bits.items()) + share4 * (
        lat["remainder_4_s"] - lat["remainder_s"]
    )
    assert size <= 0.8 and latency <= 1.5 * all8
    for r in rows.values():
        assert r["bits"] == bits[r["layer"]] and r["trace_per_param"] >= 0 and r["delta_w"]["4"] > r["delta_w"]["8"]
        assert r["size_bytes"]["4"] < r["size_bytes"]["8"] and r["bops"]["4"] * 4 == r["bops"]["8"]
        assert r["latency_s"]["4"] > 0 and r["latency_s"]["8"] > 0
        if r["bits"] == 4:
            assert r["input_range"] in ([-8, 7], [0, 15])
    assert lat["predicted_s"] > 0 and lat["measured_s"] > 0
    assert lat["predicted_s"] == pytest.approx(lat["remainder_s"] + latency, rel=1e-9)
    md = (out / "report.md").read_text()
    assert "## Mixed precision (HAWQV3 ILP)" in md and "predicted" in md and "measured" in md
    print(f"\npredicted {lat['predicted_s'] * 1e6:.1f} us, measured {lat['measured_s'] * 1e6:.1f} us")


def test_size_budget_without_a_target_and_debug_lp(files, tmp_path):
    out = tmp_path / "out"
    assert run(files, out, "--bits", "4/8", "--budget", "size=0.8,bops=0.9", "--target", "none", "--debug") == 0
    assert {p.name for p in out.iterdir()} == {"model.int.onnx", "manifest.json", "report.json", "report.md", "bits.lp"}
    lp = (out / "bits.lp").read_text()
    assert "budget_size" in lp and "budget_bops" in lp and "tie_convA_convS_4" in lp and "pin_conv0" in lp
    manifest = json.loads((out / "manifest.json").read_text())
    assert "bits.lp" in manifest["files"]
    bits = layer_bits(manifest)
    assert int4_layers(out, manifest) == {n for n, b in bits.items() if b == 4} != set()
    mixed = json.loads((out / "report.json").read_text())["mixed_precision"]
    assert mixed["latency"]["predicted_s"] is None and mixed["cost_fractions"]["size"] <= 0.8


def test_infeasible_budget_exits_2_and_writes_nothing(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(files, out, "--bits", "4/8", "--budget", "size=0.5", "--target", "none", "--debug") == 2
    err = capsys.readouterr().err
    # pinned conv0 (248 B) and fc (120 B) at 8, the rest at 4: 1392 of 2288 bytes
    assert "the smallest feasible budget is 0.6084 (asked 0.5)" in err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--bits", "4/8"], ["--bits 4/8", "--budget latency=0.9"]),
        (["--bits", "8", "--budget", "size=0.5"], ["--budget applies to mixed precision", "--bits 8"]),
        (["--bits", "4", "--budget", "size=0.5"], ["--bits 4 gives every layer a fixed width"]),
        (["--bits", "4/8", "--budget", "speed=0.5"], ["'speed=0.5'", "size, bops, latency"]),
        (["--bits", "4/8", "--budget", "size=-1"], ["size='-1'", "positive fraction"]),
        (["--bits", "4/8", "--budget", "size=0.5", "--budget", "size=0.6"], ["size twice"]),
        (["--bits", "4/8", "--budget", "latency=0.9", "--target", "none"], ["--target none compiles nothing"]),
        (["--bits", "8", "--debug"], ["--debug", "--bits 4/8"]),
    ],
)
def test_misused_flags_are_refused(files, tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    assert run(files, out, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantize: error: ") and all(w in err for w in words), err
    assert not out.exists()
