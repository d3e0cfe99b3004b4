"""The corpus of real exports (``intq.models.corpus``): every model, from the legacy and the dynamo exporter,
goes through the CLI; the result is integer-only, the torch emulation, onnxruntime and the TVM artifact agree
bit for bit on held-out inputs, and the integer model follows the float one on real data."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import intq
from intq.cli import _batches, main
from intq.config import QuantConfig
from intq.export.verify import verify_integer_only
from intq.models import corpus

pytestmark = pytest.mark.filterwarnings("ignore")

# float vs integer on the held-out inputs: (min cosine of the outputs, min top-1 agreement). The models with
# real weights are held to what a good INT8 model gives; the random-weight ones (trained_like statistics, but
# chaotic through depth: MobileNetV2's 17 blocks amplify any perturbation) only to catching a broken op, and
# `python benchmarks/real_exports.py` reports their measured agreement
AGREEMENT = {
    "vit-cifar": (0.97, 0.9),
    "bert-minilm": (0.90, None),
    "hf-bert-minilm": (0.90, None),
    "resnet18": (0.8, None),
    "mobilenetv2": (0.8, None),
    "efficientnet-like": (0.8, None),
    "mobilenetv3-like": (0.8, None),
    "timm-vit": (0.9, None),
}


def ort_run(model, feeds):
    session = ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: feeds[n] for n in names})


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def kept_rows(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return hidden[mask.astype(bool)]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus")


@pytest.mark.parametrize("exporter", corpus.EXPORTERS)
@pytest.mark.parametrize("name", corpus.NAMES)
def test_corpus_model_through_the_cli(name, exporter, corpus_dir):
    entry = corpus.build(name, exporter, corpus_dir)
    out = corpus_dir / f"{name}-{exporter}.out"
    assert main([str(entry.onnx_path), "--calib", str(entry.calib_path), "-o", str(out), "--quiet"]) == 0
    int_path = out / "model.int.onnx"
    int_model = onnx.load(int_path)
    verify_integer_only(int_model)

    # the torch emulation of the very model the CLI wrote
    with np.load(entry.calib_path) as z:
        arrays = {k: z[k] for k in z.files}
    inputs = [{"name": i.name} for i in onnx.load(entry.onnx_path).graph.input]
    qmodel = intq.quantize(str(entry.onnx_path), _batches(arrays, inputs, 16, 512), QuantConfig(), progress=False)
    assert qmodel.to_onnx().SerializeToString() == int_model.SerializeToString()

    feeds = entry.eval_feeds
    want = ort_run(int_path, feeds)[0]
    np.testing.assert_array_equal(intq.load(out)(**feeds), want)
    emulated = qmodel(*(torch.from_numpy(feeds[n]) for n in qmodel.input_names))
    np.testing.assert_array_equal(emulated.numpy(), want)

    ref = ort_run(entry.onnx_path, feeds)[0]
    min_cos, min_agree = AGREEMENT[name]
    if entry.mask_input is not None:
        mask = feeds[entry.mask_input]
        assert cosine(kept_rows(want, mask), kept_rows(ref, mask)) > min_cos
    else:
        assert cosine(want, ref) > min_cos
    if min_agree is not None:
        assert float((want.argmax(-1) == ref.argmax(-1)).mean()) >= min_agree


@pytest.mark.parametrize("exporter", corpus.EXPORTERS)
def test_a_padded_sentence_equals_the_sentence_alone(exporter, corpus_dir):
    """transformers' BertModel with attention_mask: padding changes no integer of a sentence's own tokens."""
    out = corpus_dir / f"hf-bert-minilm-{exporter}.out"
    if not out.is_dir():
        entry = corpus.build("hf-bert-minilm", exporter, corpus_dir)
        assert main([str(entry.onnx_path), "--calib", str(entry.calib_path), "-o", str(out), "--quiet"]) == 0
    run = intq.load(out)
    feeds = corpus.padded_sentences(["a gorgeous , witty , seductive movie .", "dull", "not bad at all , really"])
    padded = run(**feeds)
    np.testing.assert_array_equal(padded, ort_run(out / "model.int.onnx", feeds)[0])
    for row in range(3):
        length = int(feeds["attention_mask"][row].sum())
        alone = run(**{k: v[row : row + 1, :length] for k, v in feeds.items()})
        np.testing.assert_array_equal(alone[0], padded[row, :length])
