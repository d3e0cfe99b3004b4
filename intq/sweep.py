"""Accuracy against cost over a sweep of mixed-precision budgets: ``intq.pareto``.

One ``intq.mixed.analyze`` (the two uniform quantizations, sensitivity, the
cost table) serves every budget; each budget is then one ILP solve and one
quantization.  Budgets that give the same widths share one evaluation.  Two
reference points come with the sweep, flagged by ``uniform``: every layer at
8 bits, and ``QuantConfig(bits=4)`` (4 bits with the first and last weighted
layers at 8, as ``--bits 4``).

Per point: the user's ``evaluate(qmodel) -> float`` (accuracy, or any score
where higher is better), the latency the cost table predicts
(``ilp.costs.predict_latency``) and the measured one (the whole integer
model compiled for ``target`` and timed on the calibration batch's shapes,
``ilp.costs.measure_model_latency``), and the size of the integer ONNX file
in bytes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence

from intq.ilp.solve import InfeasibleBudgetError
from intq.ilp.table import COSTS

__all__ = ["ParetoPoint", "pareto"]


@dataclasses.dataclass(frozen=True)
class ParetoPoint:
    """One model of the sweep.

    budget: the fraction of the all-INT8 ``kind`` cost given to the ILP (None for the uniform points).
    uniform: 8 or 4 for the uniform references (4: first and last layers at 8), None for an ILP point.
    cost_fractions: the model's size, BOPs (and latency) as fractions of the all-INT8 costs of the weighted layers.
    """

    budget: float | None
    layer_bits: dict[str, int]
    accuracy: float
    predicted_latency_s: float | None
    measured_latency_s: float | None
    size_bytes: int
    uniform: int | None = None
    cost_fractions: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.uniform == 8:
            return "uniform INT8"
        if self.uniform == 4:
            return "uniform INT4 (first/last 8)"
        return f"ILP {self.budget:g}"


def pareto(
    model,
    calib: Sequence,
    evaluate: Callable[[object], float],
    budgets: Sequence[float] = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5),
    kind: str = "latency",
    target: str | Mapping | None = "x86",
    labels: Sequence | None = None,
    *,
    measure: bool = True,
    include_uniform: bool = True,
    progress: bool = True,
    **analyze_options,
) -> list[ParetoPoint]:
    """The uniform INT8 and INT4 points, then one point per feasible budget in decreasing order.

    model, calib, labels, target: as ``intq.mixed.plan_mixed_precision``.
    evaluate: ``evaluate(qmodel) -> float`` on the user's held-out data.
    budgets: fractions of the all-INT8 ``kind`` cost (``size``, ``bops`` or ``latency``); a budget below the
        smallest feasible one is skipped with a warning that gives that smallest budget.
    measure: compile and time every point's whole model on ``target`` (where the cost table was timed).
    analyze_options: passed to ``intq.mixed.analyze`` (config, pins, repeats, hutchinson_samples, ...).
    """
    from intq.api import quantize
    from intq.ilp.costs import measure_model_latency, model_layer_bits
    from intq.mixed import analyze, choose

    if kind not in COSTS:
        raise ValueError(f"pareto: kind={kind!r}; sweep one of {list(COSTS)}.")
    fractions = sorted({float(b) for b in budgets}, reverse=True)
    if not fractions or any(not b > 0 for b in fractions):
        raise ValueError(f"pareto: budgets={list(budgets)}; give positive fractions of the all-INT8 {kind} cost.")
    if kind == "latency" and target is None:
        raise ValueError("pareto: a latency sweep needs a target to time the layers on.")
    analysis = analyze(model, calib, labels, target, progress=progress, **analyze_options)
    if kind == "latency" and not analysis.has_latency:
        raise ValueError(f"pareto: target {target!r} cannot be timed from here; sweep size or bops, or pass remote=.")
    timed = measure and analysis.has_latency
    example = analysis.qmodel_8bit
    inputs = {n: t.numpy() for n, t in zip(example.input_names, example.example, strict=True)}
    repeats = analyze_options.get("repeats", 20)
    min_repeat_ms = analyze_options.get("min_repeat_ms", 10.0)
    remote = analyze_options.get("remote")
    seen: dict[tuple, tuple] = {}  # widths -> (accuracy, measured latency, size): one evaluation per model

    def point(layer_bits, make_qmodel, budget, uniform) -> ParetoPoint:
        key = tuple(sorted(layer_bits.items()))
        if key not in seen:
            qmodel = make_qmodel()
            proto = qmodel.to_onnx()
            latency = None
            if timed:
                latency = measure_model_latency(
                    proto, target, inputs=inputs, repeats=repeats, min_repeat_ms=min_repeat_ms, remote=remote
                )
            seen[key] = (float(evaluate(qmodel)), latency, proto.ByteSize())
        accuracy, latency, size = seen[key]
        return ParetoPoint(
            budget=budget,
            layer_bits=dict(layer_bits),
            accuracy=accuracy,
            predicted_latency_s=analysis.predicted_latency(layer_bits),
            measured_latency_s=latency,
            size_bytes=size,
            uniform=uniform,
            cost_fractions=analysis.cost_fractions(layer_bits),
        )

    def mixed(layer_bits: Mapping[str, int]):
        config = dataclasses.replace(analysis.config, bits=8, first_last_bits=8, layer_bits=layer_bits)
        return lambda: quantize(analysis.source, analysis.calib, config, progress=progress)

    points = []
    if include_uniform:
        q8 = analysis.qmodel_8bit
        points.append(point(model_layer_bits(q8), lambda: q8, None, 8))
        config4 = dataclasses.replace(analysis.config, bits=4, first_last_bits=8, layer_bits={})
        q4 = quantize(analysis.source, analysis.calib, config4, progress=progress)
        points.append(point(model_layer_bits(q4), lambda: q4, None, 4))
    for fraction in fractions:
        try:
            layer_bits, _ = choose(analysis, {kind: fraction})
        except InfeasibleBudgetError as exc:
            warnings.warn(f"pareto: skipped {kind}={fraction:g}: {exc}", stacklevel=2)
            continue
        points.append(point(layer_bits, mixed(layer_bits), fraction, None))
    return points
