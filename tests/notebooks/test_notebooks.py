"""The notebooks under ``notebooks/`` run end to end in their small mode and write what they promise.

Each notebook is copied alone into a temporary folder and executed there by
nbclient (a fresh ``python3`` kernel, ``INTQ_NOTEBOOK_FULL`` unset, so its
parameter cell picks the small slices); the saved outputs of the full run are
cleared first, so everything checked comes from this run.  Checked: no cell
fails, every figure the notebook names is written as a PNG, and a few facts
in the JSON of results it writes: facts of the models and of the ops'
documented accuracy, not timings (never asserted in tests).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CELL_TIMEOUT_S = 900

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def run_notebook(name: str, tmp_path: Path, monkeypatch) -> tuple[Path, nbformat.NotebookNode]:
    """Execute ``notebooks/<name>.ipynb`` (small mode) in a copy under ``tmp_path``; return its folder."""
    monkeypatch.delenv("INTQ_NOTEBOOK_FULL", raising=False)
    monkeypatch.setenv("INTQ_REPO", str(REPO))  # where the notebooks import benchmarks/ from
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's temporary files (sensitivity cache) go with the test
    work = tmp_path / "notebooks"
    work.mkdir()
    shutil.copy(NOTEBOOKS / f"{name}.ipynb", work)
    nb = nbformat.read(work / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    parameters = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1, f"{name}: expected one cell tagged 'parameters', found {len(parameters)}"
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    client.execute()  # raises CellExecutionError naming the cell when one fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: error outputs {[(e.ename, e.evalue) for e in errors]}"
    return work, nb


def assert_pngs(work: Path, names: list[str]) -> None:
    for name in names:
        path = work / "figures" / name
        assert path.is_file(), (
            f"figure {name} was not written (figures/: {sorted(p.name for p in path.parent.iterdir())})"
        )
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, f"{name}: not a PNG with content ({len(data)} bytes)"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert min(image.size) >= 200, f"{name}: {image.size} pixels"


def results(work: Path, name: str) -> dict:
    return json.loads((work / "results" / f"{name}.json").read_text())


def test_accuracy_vs_latency(tmp_path, monkeypatch):
    work, _ = run_notebook("accuracy_vs_latency", tmp_path, monkeypatch)
    assert_pngs(work, ["accuracy_vs_latency_resnet8.png", "accuracy_vs_latency_minilm.png"])
    r = results(work, "accuracy_vs_latency")
    assert r["full"] is False
    for model, n_test, n_layers in (("resnet8", 300, 10), ("minilm", 200, 36)):
        m = r[model]
        assert m["n_test"] == n_test
        by_sweep = {}
        for p in m["points"]:
            by_sweep.setdefault(p["sweep"], []).append(p)
        (fp32,) = by_sweep["fp32"]
        uniform = {p["uniform"]: p for p in by_sweep["uniform"]}
        assert sorted(uniform) == [4, 8], m["points"]
        # the fp32 models are the trained ones (75.5% ResNet-8 test top-1, ~80% probe on SST-2 dev)
        assert fp32["accuracy"] > 0.65, (model, fp32["accuracy"])
        drop = fp32["accuracy"] - uniform[8]["accuracy"]
        assert abs(drop) < 0.04, f"{model}: INT8 {uniform[8]['accuracy']:.3f} vs fp32 {fp32['accuracy']:.3f}"
        # uniform INT4 is W4A4 with the first and last weighted layers (graph order) at 8 bits
        bits4 = list(uniform[4]["layer_bits"].values())
        assert len(bits4) == n_layers and bits4[0] == bits4[-1] == 8 and set(bits4[1:-1]) == {4}, bits4
        assert set(uniform[8]["layer_bits"].values()) == {8}
        assert uniform[4]["size_bytes"] < uniform[8]["size_bytes"] < fp32["size_bytes"]
        # INT8 changes few decisions of the fp32 model
        assert uniform[8]["agreement_with_fp32"] > 0.9, uniform[8]
        for p in m["points"]:
            for key in ("measured_latency_s", "retimed_latency_s"):
                assert math.isfinite(p[key]) and p[key] > 0, (key, p)
    (mini8,) = [p for p in r["minilm"]["points"] if p["uniform"] == 8]
    assert mini8["mean_cosine_to_fp32"] > 0.95  # INT8 sentence embeddings keep their direction
    # the ILP sweeps (ResNet-8 in the small run): the first and last layers pinned at 8, every point within budget
    ilp = [p for p in r["resnet8"]["points"] if p["sweep"] in ("latency", "size")]
    assert {p["sweep"] for p in ilp} == {"latency", "size"}, ilp
    for p in ilp:
        bits = list(p["layer_bits"].values())
        assert bits[0] == bits[-1] == 8, p
        assert p["cost_fractions"][p["sweep"]] <= p["budget"] + 1e-9, p
        assert p["predicted_latency_s"] > 0
    assert set(r["checks"]) == {"resnet8", "minilm"}


def test_where_time_goes(tmp_path, monkeypatch):
    work, _ = run_notebook("where_time_goes", tmp_path, monkeypatch)
    assert_pngs(work, ["where_time_goes_resnet8_layers.png", "where_time_goes_resnet8_by_op.png"])
    r = results(work, "where_time_goes")
    m = r["models"]["resnet8"]
    assert m["input_shape"] == [1, 3, 32, 32]
    layers = m["layers"]
    # ResNet-8: 9 convolutions and the dense head (the average pool is not a weighted layer)
    assert [x["kind"] for x in layers].count("conv 3x3") == 7 and [x["kind"] for x in layers].count("conv 1x1") == 2
    assert len(layers) == 10
    for x in layers:
        assert all(x["latency_s"][b] > 0 for b in ("8", "4")), x
        assert x["bops"]["4"] * 4 == x["bops"]["8"], x  # macs * b^2
        assert x["size_bytes"]["4"] < x["size_bytes"]["8"], x
    for b in ("8", "4"):
        t = m["totals"][b]
        assert t["model_s"] > 0
        assert math.isclose(t["layers_s"], sum(x["latency_s"][b] for x in layers), rel_tol=1e-9)
        groups = m["kernel_profile"][b]["groups"]
        assert any(k.startswith("intq_conv2d") for k in groups), groups


def gelu_sigmoid_error(scale: float) -> float:
    """The error bound ``delta`` of ShiftGELU's sigmoid at input scale ``scale`` (``quantizer/ops/shiftgelu.py``)."""
    d = round(1 / (1.702 * scale))
    return next(
        delta
        for at_least, delta in ((256, 0.020), (64, 0.024), (16, 0.036), (8, 0.061), (4, 0.095), (1, 0.162))
        if d >= at_least
    )


def test_integer_ops_error(tmp_path, monkeypatch):
    work, _ = run_notebook("integer_ops_error", tmp_path, monkeypatch)
    assert_pngs(work, ["integer_ops_shiftmax.png", "integer_ops_shiftgelu.png", "integer_ops_layernorm.png"])
    r = results(work, "integer_ops_error")
    softmax = [row for rows in r["shiftmax"]["by_scale"].values() for row in rows] + r["shiftmax"]["by_sigma_at_S0.03"]
    assert len(softmax) == 2 * 7 + 6
    for row in softmax:  # on average within one output step (1/128) of the float probabilities
        assert row["intq_mean"] < 1 / 128, row
        assert row["grid_max"] <= row["intq_max"] + 1e-12, row  # nothing beats rounding the exact result
    for row in r["shiftgelu"]["by_scale"]:  # mean within one output step; max within ShiftGELU's documented bound
        s = row["scale"]
        assert row["intq_mean"] < s, row
        assert row["intq_max"] <= s / 2 + 0.0204 + gelu_sigmoid_error(s) * 128 * s, row
    for row in r["layernorm"]["by_outlier_magnitude"]:
        if row["width"] == "int16":  # an int16 residual stream: within one output step everywhere
            assert row["intq_max"] <= row["scale_out"], row
