"""Train the small DeiT-like ViT (``ViTConfig.vit_cifar()``) on CIFAR-10 from scratch, on one CPU thread.

    nice -n 10 python benchmarks/train_cifar_vit.py --minutes 35 [--seed 0] [--out models/data/vit_cifar10.safetensors]
    python benchmarks/train_cifar_vit.py --epochs 9     # a fixed schedule instead of a wall-clock budget

Data: the 50,000 CIFAR-10 training JPEGs (``intq.models.cifar10.load_cifar10("train")``); every epoch
is a fresh permutation; augmentation is a random 32x32 crop of the image zero-padded by 4 pixels on each
side plus a horizontal flip with probability 1/2 (the standard CIFAR recipe); inputs are normalized with
``cifar10.MEAN``/``STD`` (``cifar10.to_nchw(images, normalize=True)``).  Evaluation: the full 10,000-image
test split after every epoch, no augmentation.

Optimization: AdamW (lr ``--lr``, betas 0.9/0.999, weight decay ``--weight-decay`` on matrices and
convolution kernels only, none on biases, LayerNorm, class token and position embedding), batch
``--batch``, cross-entropy with label smoothing ``--label-smoothing``, gradient norm clipped at 1.  The
learning rate rises linearly from 0 over the first epoch and then follows a half cosine to 0 at the end
of the last epoch, stepped per batch.

With ``--minutes`` the number of epochs is fixed at the end of the first (warm-up) epoch: as many whole
epochs (training plus evaluation) as the measured first epoch says fit in the budget.  The chosen count is
written to the JSON, so ``--epochs N`` with the same seed reproduces the schedule.  Everything runs with
``torch.set_num_threads(1)``, so a run is deterministic for a given seed and epoch count on one machine.

Writes, each atomically (temporary file, then rename): the weights as safetensors (``--out``) and, beside
them with the suffix ``.json``, the config, the recipe, the per-epoch log, the final full-test accuracy
and the training time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from intq.models import cifar10
from intq.models.vit import CIFAR_VIT_PATH, VisionTransformer, ViTConfig


def augment(images: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop of the zero-padded images plus a random horizontal flip; uint8 NHWC in, uint8 NHWC out."""
    batch, height, width, _ = images.shape
    padded = F.pad(images, (0, 0, pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=gen)
    rows = (dy[:, None] + torch.arange(height))[:, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, :]
    crops = padded[torch.arange(batch)[:, None, None], rows, cols]
    flip = torch.rand(batch, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(2), crops)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n not in ("cls_token", "pos_embed")]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n not in ("cls_token", "pos_embed"))]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, warmup_steps: int, total_steps: int, peak: float) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: VisionTransformer, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch):
        logits = model(cifar10.to_nchw(images[start : start + batch], normalize=True))
        correct += int((logits.argmax(1).numpy() == labels[start : start + batch]).sum())
    return correct / len(labels)


def _atomic_write(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-clock budget for training and per-epoch evaluation")
    budget.add_argument("--epochs", type=int, help="a fixed number of epochs (the first one is the warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=CIFAR_VIT_PATH)
    parser.add_argument("--limit", type=int, default=None, help="train/test on the first N images (smoke runs)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    config = ViTConfig.vit_cifar()
    model = VisionTransformer(config)
    n_params = sum(p.numel() for p in model.parameters())
    train_x, train_y = cifar10.load_cifar10("train", limit=args.limit)
    test_x, test_y = cifar10.load_cifar10("test", limit=args.limit)
    train_x_t, train_y_t = torch.from_numpy(train_x), torch.from_numpy(train_y)
    steps_per_epoch = len(train_y) // args.batch  # the last partial batch is dropped
    epochs = args.epochs
    print(f"ViT {config} | {n_params:,} parameters | {steps_per_epoch} steps/epoch", flush=True)

    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    log: list[dict] = []
    start = time.perf_counter()
    epoch = 0
    while epochs is None or epoch < epochs:
        model.train()
        order = torch.randperm(len(train_y), generator=gen)
        total_loss = 0.0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            total_steps = (epochs if epochs is not None else 1 << 20) * steps_per_epoch
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps_per_epoch, total_steps, args.lr)
            idx = order[i * args.batch : (i + 1) * args.batch]
            images = augment(train_x_t[idx], gen)
            logits = model(cifar10.to_nchw(images.numpy(), normalize=True))
            loss = F.cross_entropy(logits, train_y_t[idx], label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total_loss += float(loss.detach())
        accuracy = evaluate(model, test_x, test_y)
        elapsed = time.perf_counter() - start
        epoch += 1
        train_loss = total_loss / steps_per_epoch
        log.append({"epoch": epoch, "train_loss": train_loss, "test_acc": accuracy, "time_s": round(elapsed, 1)})
        print(
            f"epoch {epoch:3d}  train loss {train_loss:.4f}  test acc {accuracy:.4f}  elapsed {elapsed / 60:.1f} min",
            flush=True,
        )
        if epochs is None:
            epochs = max(1, int(args.minutes * 60 // elapsed))
            print(f"first epoch took {elapsed:.0f} s: training {epochs} epochs in {args.minutes} minutes", flush=True)
    train_time = time.perf_counter() - start

    final_acc = log[-1]["test_acc"]
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(args.out, lambda tmp: save_file(state, tmp))
    record = {
        "model": "VisionTransformer(ViTConfig.vit_cifar())",
        "config": config.to_dict(),
        "parameters": n_params,
        "preprocessing": {
            "input": "RGB uint8 NHWC -> float NCHW, (x / 255 - mean) / std",
            "mean": cifar10.MEAN,
            "std": cifar10.STD,
        },
        "recipe": {
            "seed": args.seed,
            "epochs": epochs,
            "warmup_epochs": 1,
            "batch": args.batch,
            "optimizer": "AdamW(betas=(0.9, 0.999)), no decay on biases/LayerNorm/cls_token/pos_embed",
            "lr": args.lr,
            "schedule": "linear warm-up over epoch 1, then half cosine to 0, per batch",
            "weight_decay": args.weight_decay,
            "label_smoothing": args.label_smoothing,
            "grad_clip_norm": 1.0,
            "augmentation": "random crop 32 of 4-pixel zero padding + horizontal flip p=0.5",
            "budget_minutes": args.minutes,
            "threads": torch.get_num_threads(),
            "train_images": len(train_y),
        },
        "data": "CIFAR-10 JPEG copy (../shared/data/cifar10): train split for training, test split for test_acc",
        "test_acc": final_acc,
        "test_images": len(test_y),
        "train_time_s": round(train_time, 1),
        "log": log,
        "sha256": hashlib.sha256(args.out.read_bytes()).hexdigest(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    json_path = args.out.with_suffix(".json")
    _atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))
    size = args.out.stat().st_size
    print(f"final fp32 top-1 on the full CIFAR-10 test set: {final_acc:.4f} ({len(test_y)} images)")
    print(f"training time {train_time / 60:.1f} min ({epochs} epochs)")
    print(f"wrote {args.out} ({size / 1e6:.2f} MB) and {json_path}")


if __name__ == "__main__":
    main()
