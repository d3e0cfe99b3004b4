"""Fidelity of an integer model against its float original.

Per output: cosine similarity, max and mean absolute error, SQNR (dB) of the
dequantized integer output against the float output on the same inputs.
Per layer: the same statistics for every quantized layer's dequantized
output against the float value it replaces.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    ref = np.asarray(ref, dtype=np.float64).reshape(-1)
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    err = got - ref
    denom = float(np.linalg.norm(ref) * np.linalg.norm(got))
    cos = float(ref @ got / denom) if denom > 0 else float(np.array_equal(ref, got))
    noise = float((err**2).sum())
    sqnr = math.inf if noise == 0 else 10 * math.log10(max(float((ref**2).sum()), 1e-30) / noise)
    return {
        "cosine": cos,
        "max_abs_error": float(np.abs(err).max()) if err.size else 0.0,
        "mean_abs_error": float(np.abs(err).mean()) if err.size else 0.0,
        "sqnr_db": sqnr,
    }


def node_values(gm: fx.GraphModule, inputs, by_target: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor value of one run, keyed by node name (or module target)."""
    values = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                values[n.target if (by_target and n.op == "call_module") else n.name] = out
            return out

    with torch.no_grad():
        _Rec(gm).run(*inputs)
    return values


def layer_errors(float_gm: fx.GraphModule, qmodel, inputs) -> list[dict]:
    """Per quantized layer: its dequantized output vs the float node it replaced."""
    fvals = node_values(float_gm, inputs)
    ivals = node_values(qmodel.graph_module, inputs, by_target=True)
    rows = []
    for rec in qmodel.layers:
        if rec.op in ("Quantize", "Requantize") or rec.out_scale is None or np.size(rec.out_scale) != 1:
            continue
        f, q = fvals.get(rec.name), ivals.get(rec.name)
        if f is None or q is None or f.shape != q.shape:
            continue
        deq = q.double() * float(np.asarray(rec.out_scale))
        rows.append(
            {"layer": rec.name, "op": rec.op, "source": rec.source, "bits": rec.bits, **compare(f.numpy(), deq.numpy())}
        )
    return rows
