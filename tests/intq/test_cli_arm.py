"""``quantize MODEL.onnx --target arm``: an aarch64 library, checked under qemu before it is written.

The model is a two-MatMul MLP (the CLI's wiring is under test here;
tests/passes/test_arm.py runs a ViT and ResNet-8 under qemu).  The
artifact's ``model.arm.so`` is an aarch64 ELF file that, run under
qemu-aarch64 on a batch size calibration never saw, equals onnxruntime on
``model.int.onnx``; a disagreement found by the check, or a missing
toolchain, writes no OUT.  Needs ``.ci/setup_arm.sh`` (the tests fail, not
skip, without it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import intq
from intq.cli import main
from intq.passes import arm
from intq.runtime import ArtifactError

ARTIFACT_FILES = {"model.int.onnx", "model.arm.so", "manifest.json", "report.json", "report.md"}
EM_AARCH64 = 183


@pytest.fixture(scope="module")
def toolchain():
    try:
        arm.require_toolchain()
    except arm.ArmToolchainError as e:
        pytest.fail(f"{e}", pytrace=False)


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory) -> tuple[Path, Path]:
    """``y = (x @ w1) @ w2`` over ``x [batch, 24]``, and its calibration data."""
    folder = tmp_path_factory.mktemp("arm_cli")
    rng = np.random.default_rng(1)
    weights = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in (("w1", (24, 40)), ("w2", (40, 12)))
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 12])],
        initializer=weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder / "mlp.onnx")
    np.savez(folder / "calib.npz", x=rng.standard_normal((16, 24)).astype(np.float32))
    return folder / "mlp.onnx", folder / "calib.npz"


def _argv(model: Path, calib: Path, out: Path) -> list[str]:
    return [str(model), "--calib", str(calib), "--calibration", "minmax", "-o", str(out), "--target", "arm", "--quiet"]


@pytest.fixture(scope="module")
def arm_out(toolchain, mlp_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arm_out_parent") / "out"
    assert main(_argv(*mlp_files, out)) == 0
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_writes_an_aarch64_library_equal_to_onnxruntime(arm_out):
    assert {p.name for p in arm_out.iterdir()} == ARTIFACT_FILES
    manifest = json.loads((arm_out / "manifest.json").read_text())
    assert manifest["target"]["name"] == "arm" and manifest["target"]["library"] == "model.arm.so"
    assert manifest["target"]["tvm_target"]["mtriple"] == "aarch64-linux-gnu"
    assert manifest["target"]["check"]["ran"] and "qemu-aarch64" in manifest["target"]["check"]["ran_on"]
    library = arm_out / "model.arm.so"
    assert hashlib.sha256(library.read_bytes()).hexdigest() == manifest["files"]["model.arm.so"]
    head = library.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == EM_AARCH64

    x = np.random.default_rng(20).standard_normal((5, 24)).astype(np.float32) * 3  # batch 5, wider: not calibrated
    (got,) = arm.run_under_qemu(library, [x])
    session = ort.InferenceSession(str(arm_out / "model.int.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(got, session.run(None, {"x": x})[0])


def test_load_refuses_the_aarch64_library_on_this_machine(arm_out):
    with pytest.raises(ArtifactError, match="aarch64 library .*run_under_qemu"):
        intq.load(arm_out)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_disagreement_under_qemu_writes_nothing(toolchain, mlp_files, tmp_path, monkeypatch, capsys):
    def off_by_one(library, inputs, **kwargs):
        return [out + 1 for out in real(library, inputs, **kwargs)]

    real = arm.run_under_qemu
    monkeypatch.setattr(arm, "run_under_qemu", off_by_one)
    out = tmp_path / "out"
    assert main(_argv(*mlp_files, out)) == 1
    assert "disagrees with onnxruntime" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.partial*"))


def test_missing_toolchain_is_refused_before_any_work(mlp_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INTQ_AARCH64_HOME", str(tmp_path / "nothing here"))
    out = tmp_path / "out"
    assert main(_argv(*mlp_files, out)) == 2
    err = capsys.readouterr().err
    assert "--target arm" in err and ".ci/setup_arm.sh" in err and "aarch64 TVM runtime" in err
    assert not out.exists()
