"""CIFAR-10 accuracy of the integer-only models: fp32, W8A8 PTQ, W4A4 PTQ, W4A4 after QAT, with sizes on disk.

    python benchmarks/cifar10_accuracy.py [--models resnet8 vit_cifar] [--limit N] [--qat-images 20000]
                                          [--qat-epochs 1] [--qat-lr 1e-4] [--calib-images 512] [--json OUT.json]

Data: the CIFAR-10 test split (the shared JPEG copy, 10,000 images, class-balanced
order; ``--limit`` keeps a prefix, 10% per class).  Calibration: the first
``--calib-images`` images of the *train* split; QAT: the first ``--qat-images``
train images (disjoint from nothing that is scored: the test split is never
trained or calibrated on), shuffled per epoch with a fixed seed.

Preprocessing is each model's own: ResNet-8 takes raw RGB 0..255 (the MLPerf
Tiny reference), the ViT ``(x/255 - mean)/std``.  No augmentation at evaluation.

Integer rows are scored by onnxruntime running the integer-only ONNX file
(``model.int.onnx``), which equals the torch integer emulation and the TVM
artifact bit for bit (tests/passes/test_cnn_end_to_end.py, tests/quantizer/test_convert_cnn.py).
W4A4 is ``QuantConfig(bits=4)``: 4-bit weights and activations with the first and
last weighted layers at 8 bits (HAWQV3's convention).  Size on disk: the fp32 ONNX
export vs the integer ONNX file (4-bit weights packed two per byte).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import intq
from intq.config import QuantConfig
from intq.models import cifar10
from intq.models.resnet8 import load_resnet8
from intq.models.vit import load_cifar_vit

MODELS = {
    "resnet8": (load_resnet8, False, "raw RGB 0..255"),
    "vit_cifar": (load_cifar_vit, True, "(x/255 - mean)/std"),
}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def top1_onnx(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray, normalize: bool) -> float:
    sess = _session(model)
    name = sess.get_inputs()[0].name
    hits = 0
    for i in range(0, len(images), 500):
        x = cifar10.to_nchw(images[i : i + 500], normalize).numpy()
        hits += int((sess.run(None, {name: x})[0].argmax(1) == labels[i : i + 500]).sum())
    return hits / len(labels)


def fp32_onnx(model: torch.nn.Module) -> onnx.ModelProto:
    from intq.quantizer.capture import export_torch

    return export_torch(model, (torch.zeros(1, 3, 32, 32),))


def size_of(model: onnx.ModelProto) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(model, path)
        return path.stat().st_size


def qat_batches(images: np.ndarray, labels: np.ndarray, normalize: bool, batch: int, seed: int):
    """Shuffled (inputs, labels) batches with random crop (4-pixel padding) + flip, re-drawn per pass."""

    class _Epochs:
        def __init__(self):
            self.epoch = 0

        def __len__(self):
            return len(labels) // batch

        def __iter__(self):
            rng = np.random.default_rng(seed + self.epoch)
            self.epoch += 1
            order = rng.permutation(len(labels))
            for i in range(0, len(order) - batch + 1, batch):
                idx = order[i : i + batch]
                x = cifar10.to_nchw(images[idx], normalize)
                x = torch.nn.functional.pad(x, (4, 4, 4, 4))
                dy, dx = rng.integers(0, 9, size=2)
                x = x[:, :, dy : dy + 32, dx : dx + 32]
                if rng.random() < 0.5:
                    x = x.flip(3)
                yield x.contiguous(), torch.as_tensor(labels[idx])

    return _Epochs()


def run_model(name: str, args, test_x, test_y, train_x, train_y) -> list[dict]:
    load, normalize, described = MODELS[name]
    model = load().eval()
    calib = [cifar10.to_nchw(train_x[i : i + 64], normalize) for i in range(0, args.calib_images, 64)]
    rows = []

    def row(variant, onnx_model, seconds, note=""):
        start = time.perf_counter()
        acc = top1_onnx(onnx_model, test_x, test_y, normalize)
        rows.append(
            {
                "model": name,
                "input": described,
                "variant": variant,
                "top1": acc,
                "size_bytes": size_of(onnx_model),
                "build_s": round(seconds, 1),
                "eval_s": round(time.perf_counter() - start, 1),
                "note": note,
            }
        )
        print(f"  {variant:<10} top-1 {acc:.2%}  ({rows[-1]['size_bytes']:,} bytes)", flush=True)

    row("fp32", fp32_onnx(model), 0.0, "onnxruntime fp32")
    for variant, config in (("W8A8 PTQ", QuantConfig(bits=8)), ("W4A4 PTQ", QuantConfig(bits=4))):
        start = time.perf_counter()
        qmodel = intq.quantize(model, calib, config, progress=False)
        row(variant, qmodel.to_onnx(), time.perf_counter() - start, f"{args.calib_images} train images calibrate")
        if config.bits == 4 and args.qat_images:
            start = time.perf_counter()
            data = qat_batches(train_x[: args.qat_images], train_y[: args.qat_images], normalize, 64, seed=0)
            tuned = intq.finetune(qmodel, data, epochs=args.qat_epochs, lr=args.qat_lr, progress=args.progress)
            row(
                "W4A4 QAT",
                tuned.to_onnx(),
                time.perf_counter() - start,
                f"{args.qat_epochs} epoch(s) on {args.qat_images} train images, lr {args.qat_lr}",
            )
    fp32 = rows[0]["top1"]
    for r in rows:
        r["drop_points"] = round(100 * (fp32 - r["top1"]), 2)
        r["size_vs_fp32"] = round(r["size_bytes"] / rows[0]["size_bytes"], 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--limit", type=int, default=None, help="the first N test images (default: all 10,000)")
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--qat-images", type=int, default=20000, help="0 skips QAT")
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    test_x, test_y = cifar10.load_cifar10("test", limit=args.limit)
    needed = max(args.calib_images, args.qat_images)
    train_x, train_y = cifar10.load_cifar10("train", limit=None if needed > 10000 else needed)
    print(f"CIFAR-10 test split (JPEG copy): {len(test_y)} images; intq {intq.__version__}, torch {torch.__version__}")
    rows = []
    for name in args.models:
        print(f"{name}:", flush=True)
        rows += run_model(name, args, test_x, test_y, train_x, train_y)
    print()
    print("| model | variant | top-1 | drop (points) | size on disk | vs fp32 | build s | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['variant']} | {r['top1']:.2%} | {r['drop_points']:.2f} | {r['size_bytes']:,} B "
            f"| {r['size_vs_fp32']:.2f} | {r['build_s']} | {r['note']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
