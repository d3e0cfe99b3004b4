"""Post-training calibration: run the canonical float graph over the
calibration set and observe every floating-point value it produces."""

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

    class _Observe(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                observers.setdefault(n.name, MagnitudeObserver()).observe(out)
            return out

    with torch.no_grad():
        for batch in _progress(batches, progress):
            _Observe(gm).run(*batch)
    bad = {name: o.nonfinite for name, o in observers.items() if o.nonfinite}
    if bad:
        first = next(iter(bad))
        raise CalibrationError(
            f"Calibration produced NaN or Inf values ({bad[first]} of them first at node {first!r}, "
            f"{len(bad)} nodes in all). Check the calibration data for NaN/Inf and for values far outside "
            "the range the model was trained on."
        )
    return observers


def _progress(batches: Iterable, enabled: bool):
    return tqdm(batches, desc="calibrating", unit="batch", disable=not enabled, leave=False)
