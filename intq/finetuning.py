"""``intq.finetune``: quantization-aware fine-tuning of a quantized model.

    qmodel = intq.quantize(model, calib, QuantConfig(bits=4))
    tuned  = intq.finetune(qmodel, train_batches, epochs=2, lr=1e-4, checkpoint="qat.pt")

Trains the weights and the activation clips of ``qmodel``'s canonical float
graph with fake quantizers (``quantizer/qat.py``: straight-through rounding,
LSQ step sizes), then converts the result with the same converter as PTQ:
the returned ``QuantizedModel`` exports and compiles exactly like a PTQ one.

Checkpoints: after every epoch (and every ``checkpoint_every`` steps) the
trainable state, the optimizer, the epoch and step go to ``checkpoint``,
written atomically (temp file, then rename); a later call with the same
file resumes where it stopped.  It is read back with
``torch.load(..., weights_only=True)``: tensors and plain containers only.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from intq.quantizer.model import QuantizedModel
from intq.quantizer.qat import build_qat_graph, trained_float_graph

CHECKPOINT_FORMAT = 1


class CheckpointMismatchError(ValueError):
    """The checkpoint file belongs to another model or another QAT setup."""


def finetune(
    qmodel: QuantizedModel,
    train_data: Iterable,
    epochs: int = 1,
    lr: float = 1e-4,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 200,
    weight_decay: float = 0.0,
    progress: bool = True,
) -> QuantizedModel:
    """Fine-tune ``qmodel`` on ``train_data`` and return the new ``QuantizedModel``.

    train_data: re-iterable batches ``(inputs, labels)``; ``inputs`` a tensor
        (one-input models) or a tuple in the model's input order.  With a
        ``len()``, the learning rate decays from ``lr`` to 0 on a cosine over
        the run; resuming mid-epoch skips the batches already trained, so the
        order must be the same on every pass of the same epoch.
    loss: ``loss(output, labels)``; cross entropy on the first output by default.
    """
    from intq.quantizer.convert import convert, quantization_sites

    if qmodel.float_graph is None or getattr(qmodel, "observers", None) is None:
        raise ValueError(
            "finetune needs the model returned by intq.quantize (it keeps the float graph and calibration "
            "statistics); a model rebuilt from ONNX cannot be fine-tuned."
        )
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be a positive integer")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} must be positive, e.g. 1e-4")
    loss = loss or (lambda out, y: F.cross_entropy(out, y))
    sites, weight_bits = quantization_sites(qmodel.float_graph, qmodel.observers, qmodel.config)
    qat, quantizers = build_qat_graph(qmodel.float_graph, sites, weight_bits)
    params = [p for p in qat.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # cosine decay to 0 over the run when the number of batches is known, else a constant rate
    per_epoch = len(train_data) if hasattr(train_data, "__len__") else None
    total = epochs * per_epoch if per_epoch else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total) / total))) if total else (lambda k: 1.0)
    )
    fingerprint = _fingerprint(qat, qmodel)

    epoch, step = 0, 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        epoch, step = _resume(ckpt, qat, optimizer, scheduler, fingerprint)

    qat.train()
    while epoch < epochs:
        skip = step  # batches of this epoch already trained before a mid-epoch checkpoint
        bar = tqdm(train_data, desc=f"QAT epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress)
        for i, (inputs, labels) in enumerate(bar):
            if i < skip:
                continue
            inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
            outs = qat(*inputs)
            out = outs[0] if isinstance(outs, (tuple, list)) else outs
            value = loss(out, labels)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            scheduler.step()
            step = i + 1
            bar.set_postfix(loss=f"{value.detach().item():.4f}")
            if ckpt is not None and checkpoint_every and step % checkpoint_every == 0:
                _save(ckpt, qat, optimizer, scheduler, epoch, step, fingerprint)
        epoch, step = epoch + 1, 0
        if ckpt is not None:
            _save(ckpt, qat, optimizer, scheduler, epoch, step, fingerprint)

    qat.eval()
    tuned_graph = trained_float_graph(qmodel.float_graph, qat)
    clips = {name: fq.clip for name, fq in quantizers.items()}
    int_gm, layers, out_meta = convert(tuned_graph, qmodel.observers, qmodel.config, clips=clips)
    outputs = [dict(o, **{k: v for k, v in m.items()}) for o, m in zip(qmodel.outputs, out_meta, strict=False)]
    tuned = QuantizedModel(
        int_gm, qmodel.inputs, outputs, layers, qmodel.config, qmodel.example, float_graph=tuned_graph
    )
    tuned.__dict__["observers"] = qmodel.observers
    return tuned


def _fingerprint(qat: torch.nn.Module, qmodel: QuantizedModel) -> str:
    """Names and shapes of the trainable tensors plus the config: a checkpoint must match them."""
    h = hashlib.sha256(qmodel.config.to_json().encode())
    for name, p in sorted(qat.named_parameters()):
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()


def _save(path: Path, qat, optimizer, scheduler, epoch: int, step: int, fingerprint: str) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "epoch": epoch,
        "step": step,
        "model": {k: v.detach().clone() for k, v in qat.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _resume(path: Path, qat, optimizer, scheduler, fingerprint: str) -> tuple[int, int]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointMismatchError(
            f"cannot read the QAT checkpoint {path} ({type(exc).__name__}: {exc}); delete it to start over."
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(f"{path} is not an intq QAT checkpoint; delete it or pass another path.")
    if state.get("fingerprint") != fingerprint:
        raise CheckpointMismatchError(
            f"the QAT checkpoint {path} was written for another model or configuration; delete it or pass "
            "another checkpoint path."
        )
    qat.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), int(state["step"])
