"""Predicted vs measured end-to-end latency of mixed 4/8-bit models (issue 6's goal: within 15%).

    python benchmarks/mixed_precision_latency.py [--models resnet8 minilm] [--threads 1] [--repeats 30]
                                                 [--min-repeat-ms 20] [--hutchinson-samples 32] [--json OUT.json]

For each model, ``intq.mixed.analyze`` quantizes it at 8 and at 4 bits, measures the sensitivity and times every
weighted layer's integer kernel at both widths on x86 (TVM, this machine), and the whole 8-bit model, whose time
minus the sum of its layers' is the remainder.  For each budget the ILP chooses the widths and the model is
quantized with them; prediction: ``remainder + sum of the chosen layers' kernel times``
(``ilp.costs.predict_latency``).  Measurement: the model's integer ONNX compiled and timed as a whole, as
``ilp.costs.measure_model_latency`` does (the median of ``--repeats`` timings of at least ``--min-repeat-ms``), on
the calibration batch's shapes, the shapes the layers were timed at.  Uniform INT8 and INT4 (first and last layers
at 8) are measured the same way; INT8's prediction is the whole-model time the remainder came from.

On a shared machine the load drifts between measurements, so the latency table is measured ``--rounds`` times and
every model is timed ``--rounds`` times, interleaved with the others; each entry is the minimum over rounds (the
least disturbed; the medians over rounds are printed beside it).

- ResNet-8 (MLPerf Tiny, CIFAR-10): calibration = the first 256 train images in batches of 32 (timed at batch
  32); sensitivity: the cross entropy of their labels on the first batch.  Budgets: latency halfway between the
  smallest feasible fraction and 1, size 0.7, bops 0.5.  Top-1 on the first ``--test-images`` test images
  (onnxruntime on the integer ONNX).
- MiniLM-L6 (all-MiniLM-L6-v2): calibration = 256 SST-2 train phrases batched by length (16 per batch; timed at
  the shape of the fullest batch nearest the median length, put first); sensitivity: the squared distance of the hidden
  states to the float model's on that batch.  Budget: size 0.75.

Latencies are single-threaded by default (``TVM_NUM_THREADS``, set before TVM loads).  Timings are not asserted
anywhere; the machine's load shows in the INT8 row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time


def _combine(tables, stat):
    """One cost table from several measurements of it: each latency the ``stat`` (min, median) of its rounds."""
    from intq.ilp.costs import predict_latency

    first = tables[0]
    costs = {
        n: {b: dataclasses.replace(c, latency_s=stat([t[n][b].latency_s for t in tables])) for b, c in per.items()}
        for n, per in first.items()
    }
    model = {b: stat([t.model_latency_s[b] for t in tables]) for b in first.model_latency_s}
    remainder = model[8] - predict_latency(costs, dict.fromkeys(costs, 8), remainder_s=0.0)
    return dataclasses.replace(first, costs=costs, model_latency_s=model, remainder_s=remainder)


def run_model(name, model, calib, labels, loss_fn, budgets, args, evaluate=None) -> list[dict]:
    from intq.api import quantize
    from intq.ilp.costs import layer_costs, model_layer_bits, predict_latency
    from intq.ilp.solve import minimum_fraction
    from intq.ilp.table import Table
    from intq.ilp.timing import Runner
    from intq.mixed import analyze, plan_from
    from intq.passes.pipeline import compile_onnx
    from intq.passes.targets import resolve_target

    timing = dict(repeats=args.repeats, min_repeat_ms=args.min_repeat_ms)
    t0 = time.perf_counter()
    analysis = analyze(
        model,
        calib,
        labels,
        "x86",
        loss_fn=loss_fn,
        hutchinson_samples=args.hutchinson_samples,
        progress=False,
        **timing,
    )
    q8, q4_all = analysis.qmodel_8bit, analysis.qmodel_4bit
    tables = [analysis.costs]
    for _ in range(args.rounds - 1):
        tables.append(layer_costs(q8, q4_all, "x86", progress=False, **timing))
    by_stat = {"min": _combine(tables, min), "median": _combine(tables, statistics.median)}
    costs = by_stat["min"]
    table = Table.from_sensitivity(
        analysis.sensitivity, ties=analysis.table.ties, pins=analysis.table.pins, costs=costs
    )
    analysis = dataclasses.replace(analysis, costs=costs, table=table)
    inputs = {n: t.numpy() for n, t in zip(q8.input_names, q8.example, strict=True)}
    shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in inputs.items())
    floors = {k: minimum_fraction(table, k) for k in ("size", "bops", "latency")}
    print(
        f"{name}: analysis {time.perf_counter() - t0:.0f} s ({args.rounds} rounds of the latency table); timed at "
        f"{shapes}; {len(table.layers)} weighted layers, ties {[list(g) for g in table.ties]}; smallest feasible "
        f"budgets {', '.join(f'{k} {v:.3f}' for k, v in floors.items())}; whole INT8 model per round "
        f"{[round(t.model_latency_s[8] * 1e3, 3) for t in tables]} ms, remainder (min) "
        f"{costs.remainder_s * 1e3:.3f} ms",
        flush=True,
    )

    points = [("uniform INT8", q8, {})]
    config4 = dataclasses.replace(analysis.config, bits=4, first_last_bits=8, layer_bits={})
    points.append(
        ("uniform INT4 (first/last 8)", quantize(analysis.source, analysis.calib, config4, progress=False), {})
    )
    for budget in budgets(floors):
        plan = plan_from(analysis, budget, progress=False)
        label = "ILP " + ",".join(f"{k}={v:.3f}" for k, v in budget.items())
        points.append((label, plan.qmodel, {"budget": budget, "layer_bits": plan.layer_bits}))

    # every point compiled once, then timed in rounds, interleaved, so that the machine's load falls on all alike
    spec = resolve_target("x86")
    compiled = [compile_onnx(qm.to_onnx(), "x86") for _, qm, _ in points]
    times = [[] for _ in points]
    with Runner(spec) as runner:
        for _ in range(args.rounds):
            for k, c in enumerate(compiled):
                times[k].append(runner.time(c, [inputs[n] for n in c.input_names], **timing))

    rows = []
    for (label, qmodel, extra), measured in zip(points, times, strict=True):
        bits = model_layer_bits(qmodel)
        row = {
            "model": name,
            "point": label,
            "layers_at_4": sum(b == 4 for b in bits.values()),
            "layers": len(bits),
            "fractions": analysis.cost_fractions(bits),
            "rounds_s": measured,
            **extra,
        }
        for stat, fn in (("min", min), ("median", statistics.median)):
            row[f"predicted_{stat}_s"] = predict_latency(by_stat[stat], bits)
            row[f"measured_{stat}_s"] = fn(measured)
            row[f"error_{stat}"] = row[f"predicted_{stat}_s"] / row[f"measured_{stat}_s"] - 1
        if evaluate is not None:
            row["top1"] = evaluate(qmodel)
        rows.append(row)
        _print(row)
    return rows


def _print(row: dict) -> None:
    acc = f"  top-1 {row['top1']:.2%}" if "top1" in row else ""
    fr = ", ".join(f"{k} {v:.3f}" for k, v in row["fractions"].items())
    print(
        f"  {row['point']:<28} {row['layers_at_4']:>2}/{row['layers']:<2} at 4 bits  predicted "
        f"{row['predicted_min_s'] * 1e3:8.3f} ms  measured {row['measured_min_s'] * 1e3:8.3f} ms  "
        f"error {100 * row['error_min']:+6.1f}%  (medians: {row['predicted_median_s'] * 1e3:.3f} vs "
        f"{row['measured_median_s'] * 1e3:.3f} ms, {100 * row['error_median']:+.1f}%)  [{fr}]{acc}",
        flush=True,
    )


def resnet8(args) -> list[dict]:
    import numpy as np
    import onnxruntime as ort
    import torch

    from intq.models import cifar10
    from intq.models.resnet8 import load_resnet8

    x, y = cifar10.load_cifar10("train", limit=256)
    calib = [cifar10.to_nchw(x[i : i + 32]) for i in range(0, 256, 32)]
    labels = [torch.as_tensor(y[i : i + 32]) for i in range(0, 256, 32)]
    tx, ty = cifar10.load_cifar10("test", limit=args.test_images)

    def top1(qmodel) -> float:
        sess = ort.InferenceSession(qmodel.to_onnx().SerializeToString(), providers=["CPUExecutionProvider"])
        hits = 0
        for i in range(0, len(ty), 250):
            logits = sess.run(None, {qmodel.input_names[0]: cifar10.to_nchw(tx[i : i + 250]).numpy()})[0]
            hits += int((np.argmax(logits, 1) == ty[i : i + 250]).sum())
        return hits / len(ty)

    def budgets(floors):
        return [{"latency": round(floors["latency"] + 0.5 * (1 - floors["latency"]), 4)}, {"size": 0.7}, {"bops": 0.5}]

    return run_model("ResNet-8", load_resnet8(), calib, labels, None, budgets, args, top1)


def minilm(args) -> list[dict]:
    import torch

    from intq.demo import calibration_batches
    from intq.models.minilm import load_minilm_l6
    from intq.models.sst2 import load_calibration_sentences

    model, tokenizer = load_minilm_l6()
    calib = calibration_batches(tokenizer, load_calibration_sentences(256), 16)
    # the first batch's shape is the one every kernel is timed at: the fullest batch nearest the median length,
    # not the shortest (the batches come shortest first)
    median = statistics.median(b.shape[1] for b in calib for _ in range(len(b)))
    first = min(calib, key=lambda b: (-len(b), abs(b.shape[1] - median)))
    calib = [first] + [b for b in calib if b is not first]
    with torch.no_grad():
        targets = [model(b) for b in calib]  # float hidden states: the sensitivity's targets

    def distance(hidden, target):
        return 0.5 * ((hidden - target) ** 2).sum(-1).mean()

    return run_model("MiniLM-L6", model, calib, targets, distance, lambda floors: [{"size": 0.75}], args)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet8", "minilm"], choices=["resnet8", "minilm"])
    p.add_argument("--threads", type=int, default=1, help="TVM_NUM_THREADS (1)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--min-repeat-ms", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=3, help="measurements of the latency table and of each model (3)")
    p.add_argument("--hutchinson-samples", type=int, default=32)
    p.add_argument("--test-images", type=int, default=1000, help="ResNet-8 top-1 on this many test images")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    import torch

    torch.set_num_threads(args.threads)
    print(f"x86, TVM_NUM_THREADS={args.threads}, repeats {args.repeats} x >= {args.min_repeat_ms} ms", flush=True)
    rows = []
    for name in args.models:
        rows += {"resnet8": resnet8, "minilm": minilm}[name](args)
    for stat in ("min", "median"):
        worst = max(abs(r[f"error_{stat}"]) for r in rows)
        print(f"largest |error| ({stat} of rounds) {100 * worst:.1f}% over {len(rows)} points (goal: within 15%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
