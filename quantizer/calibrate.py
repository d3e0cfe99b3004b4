"""Post-training calibration: run the canonical float graph over the
calibration set and observe every floating-point value it produces.

Padding is not observed.  In a model with an attention mask (an
``FMaskedSoftmax`` reading a mask input ``[B, L]``), a value whose first two
dims are ``[B, L]`` (a token's hidden state, its FFN activations) is
observed at the kept positions only, ``value[mask != 0]``: the padded
positions compute from ``[PAD]`` tokens whatever they compute, the model's
consumer drops them (masked mean pooling), and their outliers would
otherwise widen every clip.  Values of other shapes (the attention scores
``[B, H, L, L]``) are observed whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from intq.quantizer.observers import MagnitudeObserver


class CalibrationError(ValueError):
    """The calibration data cannot calibrate this model (empty, NaN/Inf, wrong inputs)."""


def calibrate(gm: fx.GraphModule, batches: Sequence[tuple], progress: bool = True) -> dict[str, MagnitudeObserver]:
    """Observers keyed by fx node name, filled from every batch.

    ``batches``: a sequence of input tuples (one tensor per graph input).
    """
    if len(batches) == 0:
        raise CalibrationError(
            "The calibration set is empty: intq needs at least one batch of representative inputs to "
            "choose activation ranges. Pass a few hundred real samples."
        )
    observers: dict[str, MagnitudeObserver] = {}
    mask_indices = mask_inputs(gm)

    class _Observe(fx.Interpreter):
        def __init__(self, module, masks):
            super().__init__(module)
            self.masks = masks

        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                observers.setdefault(n.name, MagnitudeObserver()).observe(kept_positions(out, self.masks))
            return out

    with torch.no_grad():
        for batch in _progress(batches, progress):
            _Observe(gm, [batch[i] != 0 for i in mask_indices]).run(*batch)
    bad = {name: o.nonfinite for name, o in observers.items() if o.nonfinite}
    if bad:
        first = next(iter(bad))
        raise CalibrationError(
            f"Calibration produced NaN or Inf values ({bad[first]} of them first at node {first!r}, "
            f"{len(bad)} nodes in all). Check the calibration data for NaN/Inf and for values far outside "
            "the range the model was trained on."
        )
    return observers


def mask_inputs(gm: fx.GraphModule) -> list[int]:
    """Indices of the graph inputs that are attention masks (read by an ``FMaskedSoftmax``)."""
    from intq.quantizer.canonical import FMaskedSoftmax

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), FMaskedSoftmax):
            if node.args[1] in placeholders:
                found.add(placeholders.index(node.args[1]))
    return sorted(found)


def kept_positions(value: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """``value[mask]`` for the first mask whose ``[B, L]`` shape leads ``value``'s, else ``value``."""
    for mask in masks:
        if value.dim() >= 2 and tuple(value.shape[:2]) == tuple(mask.shape):
            return value[mask]
    return value


def _progress(batches: Iterable, enabled: bool):
    return tqdm(batches, desc="calibrating", unit="batch", disable=not enabled, leave=False)
