"""Mixed 4/8-bit precision (HAWQV3): each weighted layer's width chosen by the bit-width ILP under a budget.

``plan_mixed_precision(model, calib, budget)`` runs the steps below and
returns a ``MixedPlan`` whose ``qmodel`` is the model quantized with the
chosen widths (``QuantConfig(bits=8, layer_bits=...)``):

1. the float model is captured once (a torch module is exported to ONNX once,
   so every quantization below sees the same graph and node names) and
   quantized twice: every layer at 8 bits, and every layer at 4 bits
   (``QuantConfig(bits=4, first_last_bits=4)``, which gives each layer a real
   4-bit instance to time);
2. sensitivity (``quantizer.sensitivity.layer_sensitivity`` on the float
   graph): the Hessian trace per parameter, with the cross entropy of
   ``labels`` when given, else the KL divergence from the float model's own
   outputs, and ``||W - Q_b(W)||^2`` for b = 4, 8;
3. costs (``ilp.costs.layer_costs``): size and BOPs per layer and width, and
   each layer's integer kernel timed on ``target`` (in this process, or on a
   device behind an RPC tracker with ``remote``), plus the whole 8- and 4-bit
   models (the remainders that ``predict_latency`` interpolates between);
   without a latency budget on a target that cannot be timed, size and BOPs
   only;
4. ties (``quantizer.layer_widths.shared_input_groups``): layers whose input
   activation's width the converter decides together.  The converter gives a
   shared activation its widest reader's width, so the integers are right
   whatever the widths, but a 4-bit layer then reads an 8-bit input and its
   ``macs * 4 * 4`` BOPs (and "4-bit input") would not hold; tying the group
   keeps every layer's input at its own width.  Layers reading a GELU,
   Softmax or MatMul output get an int8 input at any width (listed in
   ``MixedPlan.fixed_int8_inputs``; no tie changes them);
5. pins: the first and last weighted layers at 8 bits unless ``pins`` says
   otherwise (``{}``: none);
6. the ILP (``ilp.solve.solve``): minimise ``sum_i Tr_i/n_i * ||W_i - Q_b(W_i)||^2
   + Tr(H_A,i) * S_{b,i}^2 / 12`` within the budget (the second term: the
   layer's ``b``-bit input, ``S_{b,i}`` its scale in the ``b``-bit model;
   ``ilp/table.py``).  Budgets are fractions of the all-INT8 cost of the
   weighted layers: ``size`` of their weights and biases, ``bops`` of their
   multiply-accumulates, ``latency`` of the sum of their measured kernels
   (a 4-bit layer also counts its share of how the time outside the kernels
   changes at 4 bits, ``ilp.table``'s remainder model, the one
   ``predict_latency`` uses; the all-INT8 time outside them is not part of
   the fraction).  An infeasible budget raises ``InfeasibleBudgetError`` naming
   the smallest feasible one.

``analyze`` does steps 1-5 once; ``plan_from(analysis, budget)`` solves and
quantizes for one budget (``intq.pareto`` sweeps budgets over one analysis).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import torch

from intq.config import QuantConfig
from intq.ilp.costs import Cost, CostTable, RemoteSpec, layer_costs, predict_latency, weighted_layers
from intq.ilp.solve import Budget, solve
from intq.ilp.table import COSTS, Table

__all__ = ["MixedAnalysis", "MixedPlan", "analyze", "plan_from", "plan_mixed_precision"]


@dataclasses.dataclass(frozen=True)
class MixedAnalysis:
    """What every budget shares: the two uniform quantizations, sensitivity, costs and the ILP table."""

    source: onnx.ModelProto  # the float model as captured once
    calib: tuple  # the calibration batches, as given
    config: QuantConfig  # the base config (calibration method ...); bits and layer_bits are set per plan
    qmodel_8bit: object
    qmodel_4bit: object
    sensitivity: Mapping  # layer -> quantizer.sensitivity.LayerSensitivity
    costs: CostTable
    table: Table
    fixed_int8_inputs: tuple[str, ...]
    target: str | None  # None: nothing timed

    @property
    def has_latency(self) -> bool:
        return self.costs.remainder_s is not None

    def predicted_latency(self, layer_bits: Mapping[str, int]) -> float | None:
        """End-to-end seconds predicted for ``layer_bits`` (``ilp.costs.predict_latency``), None if not timed."""
        return predict_latency(self.costs, layer_bits) if self.has_latency else None

    def cost_fractions(self, layer_bits: Mapping[str, int]) -> dict[str, float]:
        """Each cost kind of ``layer_bits`` as a fraction of the all-INT8 cost (the budgets' unit)."""
        kinds = [k for k in COSTS if k != "latency" or self.has_latency]
        return {k: self.table.total(k, layer_bits) / self.table.reference_cost(k) for k in kinds}


@dataclasses.dataclass(frozen=True)
class MixedPlan:
    """The widths chosen for one budget, and the model quantized with them.

    layer_bits: ONNX node name -> 4 or 8, every weighted layer.
    predicted_latency_s: ``ilp.costs.predict_latency`` of ``layer_bits`` (None when nothing was timed).
    cost_fractions: the chosen widths' size, BOPs (and latency) as fractions of the all-INT8 costs.
    """

    layer_bits: dict[str, int]
    table: Table
    costs: CostTable
    sensitivity: Mapping
    predicted_latency_s: float | None
    budget: Budget
    config: QuantConfig
    qmodel: object
    cost_fractions: dict[str, float]
    solve_s: float
    fixed_int8_inputs: tuple[str, ...] = ()

    def report(self, measured_latency_s: float | None = None) -> dict:
        """The report's ``mixed_precision`` section: the budget, totals, and per layer bits, sensitivity, costs."""
        from intq.quantizer.layer_widths import input_ranges

        ranges = input_ranges(self.qmodel)
        rows = []
        for r in self.table.layers:
            sens = self.sensitivity[r.name]
            per = self.costs[r.name]
            lo, hi = ranges.get(r.name, (None, None))
            rows.append(
                {
                    "layer": r.name,
                    "bits": self.layer_bits[r.name],
                    "input_range": None if lo is None else [lo, hi],
                    "trace": sens.trace,
                    "trace_stderr": sens.trace_stderr,
                    "trace_per_param": r.sensitivity,
                    "params": r.params,
                    "delta_w": {str(b): v for b, v in r.delta_w.items()},
                    "input_trace": sens.act_trace,
                    "input_trace_stderr": sens.act_trace_stderr,
                    "objective": {str(b): r.objective(b) for b in r.delta_w},
                    "size_bytes": {str(b): c.size_bytes for b, c in per.items()},
                    "bops": {str(b): c.bops for b, c in per.items()},
                    "latency_s": {str(b): c.latency_s for b, c in per.items()},
                    "latency_4bit_synthetic": bool(per[4].synthetic) if 4 in per else None,
                }
            )
        all8 = self.costs.model_latency_s.get(8)
        return {
            "budget": self.budget.requested(),
            "budget_unit": "fractions of the all-INT8 cost of the weighted layers",
            "cost_fractions": self.cost_fractions,
            "solve_seconds": round(self.solve_s, 4),
            "pins": self.table.resolved_pins(),
            "ties": [list(g) for g in self.table.groups() if len(g) > 1],  # overlapping tie groups merged
            "fixed_int8_inputs": list(self.fixed_int8_inputs),
            "target": self.costs.target if self.costs.remainder_s is not None else None,
            "latency": {
                "predicted_s": self.predicted_latency_s,
                "measured_s": measured_latency_s,
                "error": None
                if self.predicted_latency_s is None or measured_latency_s is None
                else self.predicted_latency_s / measured_latency_s - 1,
                "all_int8_measured_s": all8,
                "remainder_s": self.costs.remainder_s,
                "remainder_4_s": self.costs.remainder_4_s,  # None: taken to be remainder_s at every width
            },
            "layers": rows,
        }


# ---------------------------------------------------------------- steps
def _capture(model, first: tuple) -> onnx.ModelProto:
    """The float model as ONNX, once: a torch module is exported (as ``intq.quantize`` would), a path read."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, torch.nn.Module):
        from intq.quantizer.capture import export_torch

        return export_torch(model, first)
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(os.fspath(model))
    raise ValueError(
        f"Mixed precision: model is a {type(model).__name__}; pass a torch.nn.Module, an ONNX file path or an "
        "onnx.ModelProto."
    )


def _timeable(target, remote) -> bool:
    if target is None:
        return False
    from intq.passes.targets import resolve_target

    return remote is not None or resolve_target(target).runs_here


def _static_costs(qmodel_8bit, target) -> CostTable:
    """Size and BOPs (no latency) of every weighted layer, as ``layer_costs`` computes them."""
    layers = weighted_layers(qmodel_8bit)
    return CostTable(
        costs={x.name: {b: Cost(x.size_bytes(b), x.bops(b)) for b in (8, 4)} for x in layers},
        target=str(target) if target is not None else "none",
        input_shapes={x.name: x.input_shape for x in layers},
    )


def analyze(
    model,
    calib: Sequence,
    labels: Sequence | None = None,
    target: str | Mapping | None = "x86",
    *,
    config: QuantConfig | None = None,
    pins: Mapping[str, int] | None = None,
    tie_shared_inputs: bool = True,
    measure_latency: bool | None = None,
    remote: RemoteSpec | None = None,
    repeats: int = 20,
    min_repeat_ms: float = 10.0,
    hutchinson_samples: int = 100,
    sensitivity_batches: int | None = 1,
    loss_fn=None,
    cache_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> MixedAnalysis:
    """Steps 1-5 of the module docstring, shared by every budget.

    model: a ``torch.nn.Module``, an ONNX file path or an ``onnx.ModelProto`` (as ``intq.quantize``).
    calib: calibration batches (as ``intq.quantize``); the first ``sensitivity_batches`` of them (None: all)
        also feed the Hessian traces.
    labels: one label tensor per calibration batch (class indices), or None for the KL sensitivity.
    target: where latency is measured (``x86``, ``arm``, ``cuda`` or a TVM target dict); None: not timed.
    config: the base ``QuantConfig`` (calibration method, percentile ...); its bits are replaced.
    pins: layer -> width held fixed; None pins the first and last weighted layers at 8, ``{}`` nothing.
    tie_shared_inputs: tie the layers that share an input activation (module docstring, step 4).
    measure_latency: time the kernels; None: when ``target`` runs here or ``remote`` is given.
    repeats, min_repeat_ms: the timing (``ilp.timing``).
    hutchinson_samples: the most Hutchinson draws (at least ``min(8, hutchinson_samples)``).
    sensitivity_batches: the Hessian is that of the first this many calibration batches (None: all).  One
        batch (HAWQV3 estimates it on a small subset of the data) keeps its gradient graph for every draw;
        each further batch costs one more double backward per draw.
    loss_fn: ``loss_fn(output, label)`` for the sensitivity instead of the cross entropy (with ``labels``)
        or the KL divergence (``quantizer.sensitivity``); e.g. the squared distance to the float model's
        outputs, passed as ``labels``, for a model whose output is not logits.
    cache_path: a JSON file caching the sensitivity per model hash.
    """
    from intq.api import _as_tuple, quantize
    from intq.quantizer.layer_widths import fixed_int8_inputs, shared_input_groups
    from intq.quantizer.sensitivity import input_noise, layer_sensitivity

    config = config or QuantConfig()
    raw = list(calib)
    if not raw:
        raise ValueError("Mixed precision needs calibration data: pass a few hundred representative samples.")
    if labels is not None and len(labels) != len(raw):
        raise ValueError(f"{len(labels)} label tensors for {len(raw)} calibration batches; pass one per batch.")
    if isinstance(hutchinson_samples, bool) or not isinstance(hutchinson_samples, int) or hutchinson_samples < 1:
        raise ValueError(f"hutchinson_samples={hutchinson_samples!r}: give the most Hessian draws, an int >= 1.")
    if measure_latency is None:
        measure_latency = _timeable(target, remote)
    elif measure_latency and not _timeable(target, remote):
        raise ValueError(
            f"Target {target!r} cannot be timed from here: pass remote=RemoteSpec(tracker_host, tracker_port, key) "
            "for a device behind a TVM RPC tracker, or measure_latency=False."
        )

    source = _capture(model, _as_tuple(raw[0], None))
    base = dataclasses.replace(config, layer_bits={})
    q8 = quantize(source, raw, dataclasses.replace(base, bits=8, first_last_bits=8), progress=progress)
    q4 = quantize(source, raw, dataclasses.replace(base, bits=4, first_last_bits=4), progress=progress)

    n = len(raw) if sensitivity_batches is None else max(1, min(int(sensitivity_batches), len(raw)))
    batches = [_as_tuple(b, q8.inputs) for b in raw[:n]]
    sens = layer_sensitivity(
        q8,
        batches,
        None if labels is None else [torch.as_tensor(np.asarray(t)) for t in labels[:n]],
        loss_fn=loss_fn,
        max_samples=hutchinson_samples,
        min_samples=min(8, hutchinson_samples),
        cache_path=cache_path,
        progress=progress,
    )
    if measure_latency:
        costs = layer_costs(
            q8, q4, target, repeats=repeats, min_repeat_ms=min_repeat_ms, remote=remote, progress=progress
        )
    else:
        costs = _static_costs(q8, target)
    ties = shared_input_groups(q8.float_graph) if tie_shared_inputs else ()
    noise = input_noise({8: q8, 4: q4})
    table = Table.from_sensitivity(sens, bits=(4, 8), ties=ties, pins=pins, costs=costs, input_noise=noise)
    return MixedAnalysis(
        source=source,
        calib=tuple(raw),
        config=base,
        qmodel_8bit=q8,
        qmodel_4bit=q4,
        sensitivity=sens,
        costs=costs,
        table=table,
        fixed_int8_inputs=tuple(fixed_int8_inputs(q8.float_graph)),
        target=None if not measure_latency else str(costs.target),
    )


def choose(
    analysis: MixedAnalysis,
    budget: Budget | Mapping[str, float],
    debug_lp_path: str | os.PathLike | None = None,
    time_limit: float | None = None,
) -> tuple[dict[str, int], float]:
    """The ILP's widths for ``budget`` and the seconds the solve took (``InfeasibleBudgetError`` if none)."""
    budget = Budget.coerce(budget)
    if budget.latency is not None and not analysis.has_latency:
        raise ValueError(
            "A latency budget needs the kernels timed on the target, and this analysis has no latency table "
            "(no target that runs here, and no remote); use a size or bops budget, or analyze with a target."
        )
    t0 = time.perf_counter()
    bits = solve(analysis.table, budget, debug_lp_path=debug_lp_path, time_limit=time_limit)
    return bits, time.perf_counter() - t0


def plan_from(
    analysis: MixedAnalysis,
    budget: Budget | Mapping[str, float],
    *,
    debug_lp_path: str | os.PathLike | None = None,
    time_limit: float | None = None,
    progress: bool = True,
) -> MixedPlan:
    """Solve for ``budget`` on ``analysis`` and quantize the model with the chosen widths."""
    from intq.api import quantize

    budget = Budget.coerce(budget)
    layer_bits, seconds = choose(analysis, budget, debug_lp_path, time_limit)
    config = dataclasses.replace(analysis.config, bits=8, first_last_bits=8, layer_bits=layer_bits)
    qmodel = quantize(analysis.source, analysis.calib, config, progress=progress)
    return MixedPlan(
        layer_bits=layer_bits,
        table=analysis.table,
        costs=analysis.costs,
        sensitivity=analysis.sensitivity,
        predicted_latency_s=analysis.predicted_latency(layer_bits),
        budget=budget,
        config=config,
        qmodel=qmodel,
        cost_fractions=analysis.cost_fractions(layer_bits),
        solve_s=seconds,
        fixed_int8_inputs=analysis.fixed_int8_inputs,
    )


def plan_mixed_precision(
    model,
    calib: Sequence,
    budget: Budget | Mapping[str, float],
    labels: Sequence | None = None,
    target: str | Mapping | None = "x86",
    *,
    debug_lp_path: str | os.PathLike | None = None,
    time_limit: float | None = None,
    **analyze_options,
) -> MixedPlan:
    """Mixed 4/8-bit widths for ``budget`` and the model quantized with them (see the module docstring).

    budget: ``{"size": 0.6, "bops": 0.5, "latency": 0.8}`` in any combination (or an ``ilp.solve.Budget``):
        fractions of the all-INT8 cost of the weighted layers.
    debug_lp_path: also write the ILP as an LP file.
    analyze_options: passed to ``analyze`` (config, pins, tie_shared_inputs, remote, repeats, ...).

    The budget is checked for its kinds before anything is measured; an infeasible one raises
    ``ilp.solve.InfeasibleBudgetError`` (a ``ValueError``) with the smallest feasible budget.
    """
    budget = Budget.coerce(budget)
    if not budget.requested():
        raise ValueError("Mixed precision needs a budget: e.g. {'latency': 0.8} or {'size': 0.6, 'bops': 0.5}.")
    if budget.latency is not None and analyze_options.get("measure_latency") is False:
        raise ValueError("A latency budget needs measure_latency=True (or None): the kernels must be timed.")
    if budget.latency is not None and not _timeable(target, analyze_options.get("remote")):
        raise ValueError(
            f"A latency budget needs the kernels timed on the target, but target {target!r} does not run here; "
            "pass remote=RemoteSpec(...) for a device behind a TVM RPC tracker, or use a size or bops budget."
        )
    progress = analyze_options.get("progress", True)
    analysis = analyze(model, calib, labels, target, **analyze_options)
    return plan_from(analysis, budget, debug_lp_path=debug_lp_path, time_limit=time_limit, progress=progress)


def fraction_text(fractions: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in fractions.items() if math.isfinite(v))


def report_markdown(section: Mapping) -> list[str]:
    """The Markdown lines of a ``MixedPlan.report()`` section."""

    def us(v):
        return "-" if v is None else f"{v * 1e6:.1f}"

    def per(d, fmt):
        return " / ".join("-" if d.get(b) is None else fmt(d[b]) for b in ("4", "8"))

    budget = ", ".join(f"{k}={v:g}" for k, v in section["budget"].items())
    got = fraction_text(section["cost_fractions"])
    lat = section["latency"]
    lines = ["## Mixed precision (HAWQV3 ILP)", ""]
    lines.append(f"Budget: {budget} ({section['budget_unit']}); chosen: {got}; solved in {section['solve_seconds']} s.")
    lines.append("")
    if lat["predicted_s"] is not None:
        measured = "not measured" if lat["measured_s"] is None else f"measured {us(lat['measured_s'])} us"
        error = "" if lat["error"] is None else f" (prediction {100 * lat['error']:+.1f}%)"
        lines.append(
            f"End-to-end latency on {section['target']}: predicted {us(lat['predicted_s'])} us, {measured}{error}; "
            f"all-INT8 measured {us(lat['all_int8_measured_s'])} us, time outside the weighted layers "
            f"{us(lat['remainder_s'])} us."
        )
        lines.append("")
    if section["ties"]:
        lines.append("Tied (one width per group): " + "; ".join(", ".join(g) for g in section["ties"]) + ".")
    if section["fixed_int8_inputs"]:
        lines.append("Int8 input at any width (GELU/Softmax/MatMul output): " + ", ".join(section["fixed_int8_inputs"]))
    lines += [
        "",
        "| layer | bits | input range | Tr(H)/n | dW 4 / 8 | size B 4 / 8 | BOPs 4 / 8 | latency us 4 / 8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in section["layers"]:
        rng = "-" if r["input_range"] is None else f"[{r['input_range'][0]}, {r['input_range'][1]}]"
        lines.append(
            f"| {r['layer']} | {r['bits']} | {rng} | {r['trace_per_param']:.3g} | {per(r['delta_w'], '{:.3g}'.format)} "
            f"| {per(r['size_bytes'], str)} | {per(r['bops'], '{:.3g}'.format)} | {per(r['latency_s'], us)} |"
        )
    return lines
