"""fp32 top-1 of the CIFAR-10 models on the CIFAR-10 test split (the shared JPEG copy, 10,000 images).

    python benchmarks/cifar10_fp32.py [--models resnet8 vit_cifar] [--limit N] [--threads 1]

- ``resnet8``: the MLPerf Tiny ResNet-8 (``intq.models.resnet8.load_resnet8``), fed raw RGB 0..255
  (``cifar10.to_nchw(images)``); the shared data README states 75.5% for a faithful port.
- ``vit_cifar``: the ViT trained here (``intq.models.vit.load_cifar_vit``), fed
  ``(x / 255 - mean) / std`` (``cifar10.to_nchw(images, normalize=True)``); its JSON records the
  accuracy measured at the end of training.

Images are the test split in ``load_cifar10``'s class-balanced order; no resizing, no augmentation.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from intq.models import cifar10
from intq.models.resnet8 import load_resnet8
from intq.models.vit import load_cifar_vit

MODELS = {
    "resnet8": (load_resnet8, False, "raw RGB 0..255"),
    "vit_cifar": (load_cifar_vit, True, "(x/255 - mean)/std"),
}


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, normalize: bool, batch: int = 500) -> np.ndarray:
    """Top-1 class of each uint8 NHWC image."""
    outputs = [model(cifar10.to_nchw(images[i : i + batch], normalize)) for i in range(0, len(images), batch)]
    return torch.cat(outputs).argmax(1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--limit", type=int, default=None, help="the first N test images (default: all 10,000)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, labels = cifar10.load_cifar10("test", limit=args.limit)
    print(f"CIFAR-10 test split (JPEG copy): {len(labels)} images, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"| {'model':<10} | {'params':>8} | {'input':<20} | {'top-1':>7} | {'seconds':>7} |")
    print(f"|{'-' * 12}|{'-' * 10}|{'-' * 22}|{'-' * 9}|{'-' * 9}|")
    for name in args.models:
        load, normalize, described = MODELS[name]
        model = load().eval()
        params = sum(p.numel() for p in model.parameters())
        start = time.perf_counter()
        top1 = float((predict(model, images, normalize) == labels).mean())
        seconds = time.perf_counter() - start
        print(f"| {name:<10} | {params:>8,} | {described:<20} | {top1:>7.2%} | {seconds:>7.1f} |")


if __name__ == "__main__":
    main()
