"""The ``quantize`` command line, through ``intq.cli.main`` and once as ``python -m intq.cli``.

A successful run writes exactly ``model.int.onnx``, ``manifest.json``,
``report.json`` and ``report.md``; the manifest's hashes match the files and
the model runs in onnxruntime at batch sizes (and sequence lengths) that
calibration never saw. Every bad input is refused with exit status 2 and one
paragraph on stderr that names the offending file, node or input, and leaves
no OUT behind. A failure while OUT is being written leaves neither OUT nor a
``.partial`` folder.

Models are tiny (a one-block ViT on 32x32 images, a one-layer BERT with a
100-token vocabulary, hand-built two-node ONNX graphs) so that the file runs
in well under a minute on two cores.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import intq
from intq.cli import main
from intq.export import artifact
from intq.export.onnx_torch_ops import IMPLS
from intq.export.verify import verify_integer_only
from intq.models.bert import BertConfig, BertEncoder
from intq.models.vit import VisionTransformer, ViTConfig
from intq.quantizer.capture import export_torch

ARTIFACT_FILES = {"model.int.onnx", "model.x86.so", "manifest.json", "report.json", "report.md"}
VOCAB = 100


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # On these tiny models the intra-op thread handoff costs more than the arithmetic (5x on a busy 2-core box).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- models and data


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def vit_onnx(models_dir) -> Path:
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig.deit_tiny(img_size=32, patch=4, depth=1, num_classes=10))
    path = models_dir / "vit.onnx"
    onnx.save(export_torch(model, (torch.randn(2, 3, 32, 32),)), path)
    return path


@pytest.fixture(scope="module")
def bert_onnx(models_dir) -> Path:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden=32, layers=1, heads=2, intermediate=64, max_positions=64)
    path = models_dir / "bert.onnx"
    onnx.save(export_torch(BertEncoder(config), (torch.randint(0, VOCAB, (2, 8)),)), path)
    return path


def _tensor_info(name: str, width: int):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width])


def _graph_model(nodes, initializers=(), out_width: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [_tensor_info("x", 8)], [_tensor_info("y", out_width)], initializer=list(initializers)
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)  # the bad models below are bad for intq, not for ONNX
    return model


def _weights(name: str, rows: int, cols: int, seed: int):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return numpy_helper.from_array(w, name)


@pytest.fixture(scope="module")
def mlp_onnx(models_dir) -> Path:
    """``y = (x @ w1) @ w2``: the smallest model intq quantizes; for the output-folder tests."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="mm2"),
    ]
    path = models_dir / "mlp.onnx"
    onnx.save(_graph_model(nodes, [_weights("w1", 8, 8, 1), _weights("w2", 8, 4, 2)], out_width=4), path)
    return path


@pytest.fixture(scope="module")
def mlp_calib(models_dir) -> Path:
    path = models_dir / "mlp_calib.npz"
    np.savez(path, x=np.random.default_rng(3).standard_normal((8, 8)).astype(np.float32))
    return path


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- checks shared by the happy paths


def check_artifact(out: Path, float_model: Path) -> dict:
    """What every OUT must hold, whatever the model; returns the manifest."""
    assert {p.name for p in out.iterdir()} == ARTIFACT_FILES
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == ARTIFACT_FILES - {"manifest.json"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name

    float_proto = onnx.load(float_model)
    assert [o["name"] for o in manifest["outputs"]] == [o.name for o in float_proto.graph.output]
    assert [i["name"] for i in manifest["inputs"]] == [i.name for i in float_proto.graph.input]

    layers = manifest["layers"]
    assert layers, "the manifest lists no layers"
    for layer in layers:
        assert {"name", "op", "source", "bits"} <= set(layer), layer
        # weights and activations are int8; only residual adds write the 16-bit residual stream
        assert layer["bits"] == (16 if layer["op"] == "IntAdd" else 8), layer
    assert any(layer["op"] == "IntAdd" for layer in layers), "a transformer block has residual adds"

    assert manifest["config"]["bits"] == 8
    assert manifest["versions"]["intq"] == intq.__version__
    assert manifest["versions"]["onnx"] == onnx.__version__
    assert manifest["versions"]["onnxruntime"] == ort.__version__
    assert {"torch", "numpy"} <= set(manifest["versions"])

    int_model = onnx.load(out / "model.int.onnx")
    onnx.checker.check_model(int_model)
    assert [_dims(o) for o in int_model.graph.output] == [_dims(o) for o in float_proto.graph.output]
    verify_integer_only(int_model)

    report = json.loads((out / "report.json").read_text())
    assert [o["name"] for o in report["outputs"]] == [o["name"] for o in manifest["outputs"]]
    md = (out / "report.md").read_text()
    for o in report["outputs"]:
        assert isinstance(o["cosine"], float)
        assert o["name"] in md
    return manifest


# ---------------------------------------------------------------- happy paths


@pytest.fixture(scope="module")
def vit_calib(models_dir) -> np.ndarray:
    images = _images(16, seed=10)
    np.savez(models_dir / "vit_calib.npz", images=images)
    return images


@pytest.fixture(scope="module")
def vit_out(vit_onnx, vit_calib, models_dir) -> Path:
    out = models_dir / "vit_out"
    calib = models_dir / "vit_calib.npz"
    argv = [vit_onnx, "--bits", "8", "--calib", calib, "--calibration", "minmax", "-o", out, "--quiet"]
    assert main([str(a) for a in argv]) == 0
    return out


def test_vit_artifact(vit_out, vit_onnx):
    check_artifact(vit_out, vit_onnx)


def test_vit_manifest_input_scale_is_minmax_over_calibration(vit_out, vit_calib):
    (entry,) = json.loads((vit_out / "manifest.json").read_text())["inputs"]
    assert entry["dtype"] == "float"
    assert isinstance(entry["shape"][0], str) and entry["shape"][1:] == [3, 32, 32]
    q = entry["quantization"]
    assert (q["dtype"], q["zero_point"]) == ("int8", 0)
    # minmax calibration, symmetric int8: the largest calibration magnitude maps to 127
    expected = float(np.abs(vit_calib).max()) / 127
    assert math.isclose(q["scale"], expected, rel_tol=1e-6), (q["scale"], expected)


def test_vit_int_model_runs_at_another_batch_size_and_tracks_float(vit_out, vit_onnx):
    images = _images(3, seed=11)  # calibration used batches of 16
    (got,) = _session(vit_out / "model.int.onnx").run(None, {"images": images})
    (ref,) = _session(vit_onnx).run(None, {"images": images})
    assert got.shape == ref.shape == (3, 10)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    # int8 weights and activations on one block: a cosine of 0.9 leaves an order of magnitude of headroom
    assert _cosine(ref, got) > 0.9, _cosine(ref, got)

    (row,) = json.loads((vit_out / "report.json").read_text())["outputs"]
    assert 0.9 < row["cosine"] <= 1.0 + 1e-9, row
    assert row["max_abs_error"] >= row["mean_abs_error"] >= 0.0


def test_vit_compiled_library_loads_and_equals_onnxruntime(vit_out):
    """--target x86 (the default): intq.load runs the TVM library on float inputs, bit-exact with onnxruntime."""
    manifest = json.loads((vit_out / "manifest.json").read_text())
    assert manifest["target"]["name"] == "x86" and manifest["target"]["library"] == "model.x86.so"
    assert manifest["target"]["tvm_target"]["kind"] == "llvm"
    model = intq.load(vit_out)
    for batch, seed in ((1, 30), (5, 31)):
        images = _images(batch, seed=seed)
        (want,) = _session(vit_out / "model.int.onnx").run(None, {"images": images})
        got = model(images)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(model(images=images), want)


def test_load_refuses_a_folder_without_a_library(vit_onnx, vit_calib, models_dir, capsys):
    out = models_dir / "vit_onnx_only"
    argv = [vit_onnx, "--calib", models_dir / "vit_calib.npz", "--target", "none", "-o", out, "--quiet"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert "model.x86.so" not in {p.name for p in out.iterdir()}
    with pytest.raises(ValueError, match="no compiled library.*--target x86"):
        intq.load(out)
    with pytest.raises(ValueError, match="no manifest.json"):
        intq.load(models_dir)


def test_unknown_target_is_refused(vit_onnx, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [vit_onnx, "--calib", "random", "--target", "mips", "-o", out]
    refused(capsys, out, [str(a) for a in argv], "unknown target 'mips'", "x86")


def test_bert_through_the_console_entry(bert_onnx, models_dir):
    calib = _npz(models_dir / "ids.npz", input_ids=np.random.default_rng(20).integers(0, VOCAB, (8, 8)))
    out = models_dir / "bert_out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "intq.cli", str(bert_onnx), "--bits", "8", "--calib", str(calib), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "model.int.onnx" in proc.stdout

    manifest = check_artifact(out, bert_onnx)
    (entry,) = manifest["inputs"]
    assert entry["name"] == "input_ids" and entry["dtype"] == "int64"
    assert all(isinstance(d, str) for d in entry["shape"])  # batch and sequence stay dynamic
    assert "quantization" not in entry  # token ids are integers already

    ids = np.random.default_rng(21).integers(0, VOCAB, (3, 5))  # neither the calibration batch nor its length
    (got,) = _session(out / "model.int.onnx").run(None, {"input_ids": ids})
    (ref,) = _session(bert_onnx).run(None, {"input_ids": ids})
    assert got.shape == ref.shape == (3, 5, 32)
    assert _cosine(ref, got) > 0.9, _cosine(ref, got)


def test_calib_random_is_accepted(bert_onnx, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(bert_onnx), "--calib", "random", "-o", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == ARTIFACT_FILES
    assert json.loads((out / "report.json").read_text())["calibration"]["source"] == "random"


# ---------------------------------------------------------------- refused inputs


def refused(capsys, out: Path, argv, *words: str) -> str:
    """Run the CLI on bad input: status 2, one paragraph naming ``words``, no OUT, no leftovers."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    # before the message only argparse's usage or a progress bar may appear
    message = err[err.index("quantize: error: ") :]
    assert "\n\n" not in message.strip(), message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert not out.exists()
    assert not _leftovers(out)
    return message


def test_missing_model_file(tmp_path, capsys):
    missing = tmp_path / "nowhere.onnx"
    refused(capsys, tmp_path / "out", [missing, "--calib", "random", "-o", tmp_path / "out"], str(missing), "exist")


def test_corrupt_model_file(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(512))
    out = tmp_path / "out"
    refused(capsys, out, [corrupt, "--calib", "random", "-o", out], "corrupt.onnx", "ONNX", "corrupt")


def test_unreadable_ops_are_all_named(tmp_path, capsys):
    assert "Hardmax" not in IMPLS and "LpNormalization" not in IMPLS  # else this model tests nothing
    nodes = [
        helper.make_node("Hardmax", ["x"], ["h"], name="pick_max", axis=-1),
        helper.make_node("LpNormalization", ["h"], ["y"], name="l2_norm", axis=-1, p=2),
    ]
    model = tmp_path / "unsupported.onnx"
    onnx.save(_graph_model(nodes), model)
    out = tmp_path / "out"
    words = ("unsupported.onnx", "pick_max", "Hardmax", "l2_norm", "LpNormalization")
    refused(capsys, out, [model, "--calib", "random", "-o", out], *words)


def _between_matmuls(tmp_path, op: str, name: str) -> Path:
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node(op, ["a"], ["s"], name=name),
        helper.make_node("MatMul", ["s", "w2"], ["y"], name="mm2"),
    ]
    path = tmp_path / f"{op}.onnx"
    onnx.save(_graph_model(nodes, [_weights("w1", 8, 8, 1), _weights("w2", 8, 8, 2)]), path)
    return path


@pytest.fixture()
def cumulative_model(tmp_path) -> Path:
    """A row reduction between two MatMuls, ``ReduceMax`` over the features: readable (the reader runs it) but
    not quantizable (not elementwise, not a pooling)."""
    assert "ReduceMax" in IMPLS
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("ReduceMax", ["a", "last"], ["m"], name="wave", keepdims=1),
        helper.make_node("Sub", ["a", "m"], ["s"], name="centre"),
        helper.make_node("MatMul", ["s", "w2"], ["y"], name="mm2"),
    ]
    path = tmp_path / "reducemax.onnx"
    last = numpy_helper.from_array(np.array([-1], np.int64), "last")
    onnx.save(_graph_model(nodes, [_weights("w1", 8, 8, 1), _weights("w2", 8, 8, 2), last]), path)
    return path


def test_float_op_that_cannot_be_quantized(cumulative_model, tmp_path, capsys):
    out = tmp_path / "out"
    calib = _npz(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32))
    refused(capsys, out, [cumulative_model, "--calib", calib, "-o", out], "ReduceMax", "integer")


def test_float_op_that_cannot_be_quantized_names_the_onnx_node(cumulative_model, tmp_path, capsys):
    out = tmp_path / "out"
    calib = _npz(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32))
    refused(capsys, out, [cumulative_model, "--calib", calib, "-o", out], "'wave'")


def test_an_elementwise_function_between_matmuls_is_a_table(tmp_path):
    """``Sin`` between two MatMuls (refused before tables existed): one IntLookup, bit-exact in TVM."""
    model = _between_matmuls(tmp_path, "Sin", "wave")
    calib = _npz(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    out = tmp_path / "out"
    assert main([str(model), "--calib", str(calib), "-o", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [layer["op"] for layer in manifest["layers"] if layer["source"] == "wave"] == ["IntLookup"]
    assert manifest["target"]["check"]["result"] == "bit-exact with onnxruntime"


def test_no_calibration_data_points_to_calib_random(vit_onnx, tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, out, [vit_onnx, "-o", out], "--calib CALIB.npz", "--calib random")


def test_calibration_file_missing(vit_onnx, tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, out, [vit_onnx, "--calib", tmp_path / "none.npz", "-o", out], "none.npz", "exist")


def test_calibration_with_nan(vit_onnx, tmp_path, capsys):
    images = _images(4, seed=0)
    images[2, 1, 5, 7] = np.nan
    calib = _npz(tmp_path / "nan.npz", images=images)
    refused(capsys, tmp_path / "out", [vit_onnx, "--calib", calib, "-o", tmp_path / "out"], "'images'", "NaN")


def test_calibration_with_zero_samples(vit_onnx, tmp_path, capsys):
    calib = _npz(tmp_path / "empty.npz", images=np.zeros((0, 3, 32, 32), np.float32))
    refused(capsys, tmp_path / "out", [vit_onnx, "--calib", calib, "-o", tmp_path / "out"], "empty.npz", "zero samples")


def test_calibration_without_the_models_input(vit_onnx, tmp_path, capsys):
    calib = _npz(tmp_path / "renamed.npz", pixels=_images(4, seed=0))
    out = tmp_path / "out"
    refused(capsys, out, [vit_onnx, "--calib", calib, "-o", out], "renamed.npz", "'images'", "'pixels'")


@pytest.mark.parametrize("shape", [(4, 32, 32), (4, 3, 16, 16)], ids=["rank", "size"])
def test_calibration_array_of_the_wrong_shape(vit_onnx, tmp_path, capsys, shape):
    calib = _npz(tmp_path / "calib.npz", images=np.zeros(shape, np.float32))
    out = tmp_path / "out"
    refused(capsys, out, [vit_onnx, "--calib", calib, "-o", out], "'images'", str(shape), "32, 32]")


def test_token_ids_outside_the_vocabulary(bert_onnx, tmp_path, capsys):
    calib = _npz(tmp_path / "ids.npz", input_ids=np.full((4, 8), VOCAB + 5, np.int64))
    out = tmp_path / "out"
    refused(capsys, out, [bert_onnx, "--calib", calib, "-o", out], "Gather", "vocabulary")


@pytest.mark.parametrize("bits", ["3", "16"])
def test_unsupported_bits_are_refused(vit_onnx, tmp_path, capsys, bits):
    out = tmp_path / "out"
    refused(capsys, out, [vit_onnx, "--bits", bits, "--calib", "random", "-o", out], f"--bits {bits}", "--bits 4")


def test_four_bit_cnn(models_dir, tmp_path):
    """``--bits 4``: the middle conv gets packed 4-bit weights, the first conv and the head stay at 8 bits."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    ).eval()
    model = models_dir / "cnn.onnx"
    onnx.save(export_torch(net, (torch.randn(2, 3, 8, 8),)), model)
    calib = _npz(
        tmp_path / "calib.npz", input=np.random.default_rng(5).standard_normal((8, 3, 8, 8)).astype(np.float32)
    )
    out = tmp_path / "out"
    argv = [model, "--bits", "4", "--calib", calib, "--target", "none", "-o", out, "--quiet"]
    assert main([str(a) for a in argv]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["bits"] == 4
    weighted = [(layer["op"], layer["bits"]) for layer in manifest["layers"] if layer["op"].startswith("IntLinear")]
    convs = [layer["bits"] for layer in manifest["layers"] if layer["op"] == "IntConv2d"]
    assert weighted == [("IntLinearAcc", 8)] and convs == [8, 4, 8]  # first, middle, global pool (feeds the head)
    int_model = onnx.load(out / "model.int.onnx")
    assert [t.name for t in int_model.graph.initializer if t.data_type == TensorProto.INT4] == [
        next(layer["name"] for layer in manifest["layers"] if layer["bits"] == 4) + ".w.int4"
    ]
    verify_integer_only(int_model)
    _session(out / "model.int.onnx").run(None, {"input": _images(2, seed=6)[:, :, :8, :8]})


def test_zero_batch_size_is_a_usage_error(vit_onnx, tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, out, [vit_onnx, "--calib", "random", "--batch-size", "0", "-o", out], "--batch-size")


# ---------------------------------------------------------------- the output folder


def _existing_out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("from an earlier run")
    return out


def _leftovers(out: Path) -> list[str]:
    """``atomic_dir``'s hidden ``.OUT.*.partial`` / ``.OUT.*.old`` folders beside OUT."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_existing_out_needs_force(mlp_onnx, mlp_calib, tmp_path, capsys):
    out = _existing_out(tmp_path)
    code = main([str(mlp_onnx), "--calib", str(mlp_calib), "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and str(out) in err and "--force" in err, err
    assert (out / "keep.txt").read_text() == "from an earlier run"

    assert main([str(mlp_onnx), "--calib", str(mlp_calib), "-o", str(out), "--quiet", "--force"]) == 0
    assert {p.name for p in out.iterdir()} == ARTIFACT_FILES
    assert not _leftovers(out)


def _fail_on_call(monkeypatch, n: int) -> list[int]:
    """Make the ``n``-th ``artifact.write_json`` call fail as a full disk would; returns the call log."""
    calls = []
    real = artifact.write_json

    def write_json(path, data):
        calls.append(1)
        if len(calls) == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(artifact, "write_json", write_json)
    return calls


def test_failure_while_writing_leaves_nothing(mlp_onnx, mlp_calib, tmp_path, capsys, monkeypatch):
    calls = _fail_on_call(monkeypatch, 2)  # report.json is written, then manifest.json fails
    out = tmp_path / "out"
    code = main([str(mlp_onnx), "--calib", str(mlp_calib), "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert len(calls) == 2, "the failure was never injected"
    assert code == 1 and err.startswith("quantize: error: ") and "Traceback" not in err, err
    assert os.strerror(errno.ENOSPC) in err and str(out) in err, err
    assert not out.exists()
    assert not _leftovers(out)


def test_failure_while_writing_keeps_the_previous_out(mlp_onnx, mlp_calib, tmp_path, capsys, monkeypatch):
    out = _existing_out(tmp_path)
    _fail_on_call(monkeypatch, 2)
    assert main([str(mlp_onnx), "--calib", str(mlp_calib), "-o", str(out), "--quiet", "--force"]) != 0
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not _leftovers(out)


def test_failure_of_the_final_rename_keeps_the_previous_out(mlp_onnx, mlp_calib, tmp_path, capsys, monkeypatch):
    out = _existing_out(tmp_path)
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".partial"):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert main([str(mlp_onnx), "--calib", str(mlp_calib), "-o", str(out), "--quiet", "--force"]) != 0
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not _leftovers(out)


def test_float_arrays_for_integer_inputs_are_refused():
    """Token ids given as floats would be truncated silently; the API refuses them."""
    from onnx import TensorProto

    from intq.api import _tensor
    from intq.quantizer.calibrate import CalibrationError

    info = {"name": "input_ids", "elem_type": TensorProto.INT64, "shape": ["batch", "seq"]}
    with pytest.raises(CalibrationError, match="input_ids.*holds floats"):
        _tensor(np.full((2, 3), 0.7, dtype=np.float32), info)
    assert _tensor(np.ones((2, 3), dtype=np.int32), info).dtype == torch.int64
