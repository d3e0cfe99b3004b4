"""The main job on its embedded default: MiniLM-L6 on SST-2 dev, fp32 vs
integer-only INT8, with the same probe; the integer model is also written as
ONNX and checked bit-exact against onnxruntime.

Data: the 872 labelled SST-2 dev sentences (GLUE; copy shipped in
``models/data/sst2_dev.tsv``).  Preprocessing: the MiniLM WordPiece
tokenizer (lowercased, truncated at 128 tokens), no padding (sentences are
batched by token length), mean pooling over tokens.  Probe: the logistic
regression in ``models/data/minilm_sst2_probe.npz``, trained on fp32
embeddings of 8,000 SST-2 train phrases (``benchmarks/train_sst2_probe.py``).
Calibration: ``--calib`` SST-2 train phrases (``models/data/sst2_calib.tsv``,
disjoint from dev), batched by length.

Prints fp32 and INT8 accuracy, the drop, and the mean cosine between the
integer and fp32 sentence embeddings.  ``--limit N`` evaluates the first N
dev sentences only (CI uses a slice).

    python -m intq.demo [--limit N] [--calib 256] [-o out/minilm-int8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import intq
from intq.config import QuantConfig
from intq.models.minilm import encode, length_batches, load_minilm_l6
from intq.models.probe import probe_predict
from intq.models.sst2 import load_calibration_sentences, load_sst2


def calibration_batches(tokenizer, sentences, batch_size=16) -> list[torch.Tensor]:
    ids = [enc.ids for enc in tokenizer.encode_batch(sentences)]
    return [torch.tensor([ids[i] for i in group]) for group in length_batches([len(x) for x in ids], batch_size)]


def evaluate(
    limit: int | None = None, n_calib: int = 256, calibration: str = "percentile", progress: bool = True
) -> dict:
    torch.manual_seed(0)
    model, tokenizer = load_minilm_l6()
    sentences, labels = load_sst2("dev")
    if limit:
        sentences, labels = sentences[:limit], labels[:limit]
    calib = calibration_batches(tokenizer, load_calibration_sentences(n_calib))
    t0 = time.perf_counter()
    qmodel = intq.quantize(model, calib, QuantConfig(calibration=calibration), progress=progress)
    t_quant = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb_f = encode(model, tokenizer, sentences)
    t_float = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb_q = encode(None, tokenizer, sentences, forward=qmodel)
    t_int = time.perf_counter() - t0
    acc_f = float((probe_predict(emb_f) == labels).mean())
    acc_q = float((probe_predict(emb_q) == labels).mean())
    cos = (emb_f * emb_q).sum(1) / (np.linalg.norm(emb_f, axis=1) * np.linalg.norm(emb_q, axis=1))
    return {
        "n": len(sentences),
        "fp32_accuracy": acc_f,
        "int8_accuracy": acc_q,
        "drop_points": 100 * (acc_f - acc_q),
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "quantize_s": t_quant,
        "fp32_encode_s": t_float,
        "int8_emulation_encode_s": t_int,
        "qmodel": qmodel,
    }


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m intq.demo", description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--calib", type=int, default=256, help="number of calibration phrases")
    p.add_argument("--calibration", default="percentile", choices=["minmax", "percentile", "mse"])
    p.add_argument("-o", "--out", default="out/minilm-int8", help="where model.int.onnx is written")
    args = p.parse_args(argv)
    r = evaluate(args.limit, args.calib, args.calibration)
    exact = write_and_check(r["qmodel"], args.out)
    print(f"MiniLM-L6 on SST-2 dev ({r['n']} sentences), probe trained on fp32 embeddings of 8,000 train phrases")
    print(f"  calibration: {args.calib} SST-2 train phrases, {args.calibration}")
    print(f"  fp32 accuracy          {100 * r['fp32_accuracy']:.2f}%")
    print(f"  int8 (integer-only)    {100 * r['int8_accuracy']:.2f}%")
    print(f"  drop                   {r['drop_points']:.2f} points")
    print(f"  embedding cosine       mean {r['mean_cosine']:.4f}, min {r['min_cosine']:.4f}")
    print(f"  time: quantize {r['quantize_s']:.1f} s, fp32 encode {r['fp32_encode_s']:.1f} s, ", end="")
    print(f"int8 torch emulation encode {r['int8_emulation_encode_s']:.1f} s")
    print(f"  wrote {args.out}/model.int.onnx: integer-only (verified), onnxruntime == torch emulation: {exact}")


def write_and_check(qmodel, out: str) -> bool:
    """Write the integer ONNX (atomically) and compare onnxruntime with the torch emulation on a few inputs."""
    from pathlib import Path

    import onnx
    import onnxruntime as ort

    from intq.export.artifact import atomic_dir
    from intq.export.verify import verify_integer_only

    model = qmodel.to_onnx()
    verify_integer_only(model)
    with atomic_dir(Path(out), overwrite=True) as tmp:
        onnx.save(model, tmp / "model.int.onnx")
    sess = ort.InferenceSession(str(Path(out) / "model.int.onnx"), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    for batch, length in ((1, 9), (3, 24)):
        ids = torch.randint(1000, 30000, (batch, length), generator=gen)
        if not np.array_equal(sess.run(None, {qmodel.input_names[0]: ids.numpy()})[0], qmodel(ids).numpy()):
            return False
    return True


if __name__ == "__main__":
    main()
