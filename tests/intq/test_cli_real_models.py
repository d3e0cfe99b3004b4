"""The CLI on ONNX exports of the real models: MiniLM-L6 (pretrained weights)
and a DeiT-tiny-shaped ViT.  onnxruntime and the compiled library both run
the result, and agree exactly."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import intq
from intq.cli import main
from intq.quantizer.capture import export_torch


def _cos(a, b) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_minilm_onnx_export_through_quantize(minilm, tmp_path):
    from intq.models.sst2 import load_calibration_sentences, load_sst2

    model, tokenizer = minilm
    float_path = tmp_path / "minilm.onnx"
    onnx.save(export_torch(model, (torch.randint(1000, 2000, (2, 16)),)), float_path)
    # an .npz holds one length: phrases of 12+ tokens, cut to [CLS] + 10 tokens + [SEP]
    ids = [e.ids for e in tokenizer.encode_batch(load_calibration_sentences(256))]
    cut = [x[:11] + [102] for x in ids if len(x) >= 12]
    assert len(cut) >= 64
    np.savez(tmp_path / "calib.npz", input_ids=np.array(cut[:128], dtype=np.int64))
    out = tmp_path / "out"
    assert main([str(float_path), "--calib", str(tmp_path / "calib.npz"), "-o", str(out), "--quiet"]) == 0

    sentence = load_sst2("dev")[0][0]
    feeds = {"input_ids": np.array([tokenizer.encode(sentence).ids], dtype=np.int64)}
    got = _run(out / "model.int.onnx", feeds)
    np.testing.assert_array_equal(intq.load(out)(feeds["input_ids"]), got)
    ref = _run(float_path, feeds)
    assert _cos(ref, got) > 0.9  # per-token hidden states
    assert _cos(ref.mean(axis=1), got.mean(axis=1)) > 0.97  # the sentence embedding (mean pooling)
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"][0]["cosine"] > 0.9


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_deit_tiny_onnx_export_through_quantize(deit_tiny, tmp_path):
    model, _ = deit_tiny
    float_path = tmp_path / "deit_tiny.onnx"
    onnx.save(export_torch(model, (torch.randn(1, 3, 224, 224),)), float_path)
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(5)).numpy()
    np.savez(tmp_path / "calib.npz", images=images, labels=np.arange(8))  # labels are ignored, with a note
    out = tmp_path / "out"
    argv = [str(float_path), "--calib", str(tmp_path / "calib.npz"), "--batch-size", "4", "-o", str(out), "--quiet"]
    assert main(argv) == 0

    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6)).numpy()
    got = _run(out / "model.int.onnx", {"images": x})
    np.testing.assert_array_equal(intq.load(out)(x), got)
    assert _cos(_run(float_path, {"images": x}), got) > 0.95
