"""Per-layer sensitivity for HAWQV3 mixed precision: Hessian trace and weight perturbation.

HAWQV3 gives each weighted layer ``i`` a width ``b_i`` by minimising (``ilp/``)

    Omega = sum_i  (Tr(H_i) / n_i) * ||W_i - Q_{b_i}(W_i)||^2

where ``W_i`` is the layer's weight (``n_i`` elements) and ``H_i = d^2 L / dW_i^2``
the diagonal block of the loss Hessian for that layer.  This module measures
both factors on the canonical float graph (``FLinear`` / ``FConv2d``
modules, e.g. ``QuantizedModel.float_graph``) or on a plain ``torch.nn.Module``
(its ``Linear`` / ``Conv2d`` modules).

What is differentiated
----------------------
``L(W) = sum_b w_b L_b(W)`` over the batches, ``w_b`` = batch size / total,
with ``y = model(batch)[output_index]`` (classes on its last axis) and
``L_b`` one of, averaged over all positions (every axis but the last):

- labels given: cross entropy ``-log softmax(y)[label]``;
- no labels: ``KL(p_f || p(W)) = sum_c p_f,c (log p_f,c - log p_c(W))`` with
  ``p = softmax(y)`` and ``p_f`` the float model's own output, computed once
  and *detached*.  At ``W = W_float`` the loss is 0 and its gradient is 0
  (a minimum), yet its Hessian is ``E[J^T (diag(p) - p p^T) J]`` (``J = dy/dW``):
  the generalized Gauss-Newton matrix, equal here to the Fisher information of
  the model's predictive distribution.  It is positive semi-definite, so
  every trace is >= 0.  Models whose output is not logits should pass labels
  with a ``loss_fn``;
- ``loss_fn(y, label)`` when given (``label`` is None without labels).

Hutchinson's estimator
----------------------
``Tr(A) = E[v^T A v]`` for ``v`` with independent Rademacher (+-1) entries.  One
draw ``v = (v_1, ..., v_L)`` over *all* layers' weights and one Hessian-vector
product ``H v`` (double backprop: ``g = dL/dW`` with ``create_graph``, then
``H v = d(g . v)/dW``) give every layer's sample ``v_i . (H v)_i``; its mean is
``Tr(H_ii)`` because ``E[v_i v_j^T] = 0`` for ``i != j``.  The variance of one
sample is ``2 ||H_ii - diag(H_ii)||_F^2 + sum_{j != i} ||H_ij||_F^2``.  Draws
stop at ``max_samples``, or once ``min_samples`` are in and the running mean's
standard error ``s / sqrt(k)`` is at most ``tol * |mean|`` for every layer.

Input activations
-----------------
A 4-bit layer also reads a 4-bit input (``quantizer/convert.py``), so the
same draws estimate, per layer, ``Tr(H_A,i)``: the trace of the Hessian of
``L`` with respect to the layer's *input* ``A_i`` over every calibration
position (a zero ``delta`` added to the input by a forward pre-hook is
differentiated like a weight; one Rademacher block per batch, the batch's
share folded in).  Rounding ``A_i`` onto a grid of step ``S`` adds noise of
variance ``S^2 / 12`` per element, which raises the loss by ``1/2 Tr(H_A,i)
S^2 / 12`` to second order, the same ``1/2`` as the weights' ``1/2 (Tr(H_i)
/ n_i) ||dW||^2``; ``ilp/table.py`` adds ``Tr(H_A,i) S_b^2 / 12`` to each
width's objective, ``S_b`` the input scale the converter chose at that width.
Each layer's block is its own: layers reading one shared activation (Q, K, V)
each count their own term, without the cross terms between them.  A module
called by several nodes is perturbed at its first call in each forward.

Weight perturbation
-------------------
The converter's weight quantizer: symmetric, per output channel ``c``,
``q = 2^(b-1) - 1`` (127 for 8 bits, 7 for 4), ``S_c = max|W_c| / q``,
``Q_b(W) = clamp(round(W / S_c), -q, q) * S_c`` with round-half-to-even (as
``torch.round``), all in float64; ``dW_b = sum (W - Q_b(W))^2``.  (When a
linear layer reads a LayerNorm output with one scale per input channel
``S_x[k]`` the converter quantizes ``W * S_x`` instead; this module measures
the perturbation of ``W`` itself.)

Also recorded per layer, for the ILP's cost columns: ``params`` (weight
elements) and ``macs``, multiply-accumulates per sample (the first axis of
the output is the batch): output elements per sample times weight elements
per output channel.

Results are cached in a JSON file (``cache_path``), one entry per SHA-256 of
the model's state (parameters and buffers), the layers, the data, the labels
and the settings; the file is replaced atomically.  A custom ``loss_fn``
enters the key by its qualified name only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from intq.quantizer.canonical import FConv2d, FLinear
from intq.quantizer.model import QuantizedModel

WEIGHTED = (FLinear, FConv2d, torch.nn.Linear, torch.nn.Conv2d)
CACHE_FORMAT = "intq-sensitivity"
CACHE_VERSION = 2


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """One weighted layer: Hessian trace, weight perturbation per width, cost data."""

    name: str  # the ONNX node name in a canonical graph (the converter's layer source), else the module path
    op: str  # module class: FLinear, FConv2d, Linear, Conv2d
    params: int
    macs: int  # per sample
    trace: float  # Tr(H_i), Hutchinson estimate
    trace_stderr: float  # standard error of that estimate
    samples: int
    delta_w: dict[int, float]  # bits -> ||W - Q_b(W)||^2
    act_trace: float = 0.0  # Tr(H_A): the Hessian with respect to the layer's input, over the calibration positions
    act_trace_stderr: float = 0.0

    @property
    def trace_per_param(self) -> float:
        return self.trace / self.params

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["delta_w"] = {str(b): v for b, v in self.delta_w.items()}
        d["trace_per_param"] = self.trace_per_param
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LayerSensitivity:
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["delta_w"] = {int(b): float(v) for b, v in d["delta_w"].items()}
        return cls(**kw)


def weight_codes(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes in [-q, q] and per-output-channel scales (float64) of ``w`` at ``bits``."""
    if bits < 2:
        raise ValueError(f"bits={bits}: a symmetric weight quantizer needs at least 2 bits.")
    q = 2 ** (bits - 1) - 1
    w = w.detach().to(torch.float64)
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(1e-30)
    scale = amax / q
    codes = torch.round(w / scale.reshape((-1,) + (1,) * (w.dim() - 1))).clamp(-q, q)
    return codes, scale


def fake_quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q_b(W)`` in float64 (see the module docstring)."""
    codes, scale = weight_codes(w, bits)
    return codes * scale.reshape((-1,) + (1,) * (w.dim() - 1))


def weight_perturbation(w: torch.Tensor, bits: int) -> float:
    """``||W - Q_b(W)||^2`` in float64."""
    return float(((w.detach().to(torch.float64) - fake_quantize_weight(w, bits)) ** 2).sum())


def hutchinson_traces(
    hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    shapes: Sequence[torch.Size],
    *,
    max_samples: int,
    min_samples: int,
    tol: float,
    generator: torch.Generator,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[float], list[float], int]:
    """Hutchinson estimates of the diagonal blocks' traces of a symmetric operator.

    ``hvp(vs)`` returns the blocks of ``H v`` for the blocks ``vs`` of ``v``.
    Returns the per-block means, their standard errors and the number of draws.
    """
    samples: list[list[float]] = [[] for _ in shapes]
    bar = tqdm(total=max_samples, desc="Hessian trace", unit="draw", disable=not progress, leave=False)
    try:
        for k in range(1, max_samples + 1):
            vs = [torch.randint(0, 2, tuple(s), generator=generator).to(dtype) * 2 - 1 for s in shapes]
            for acc, v, hv in zip(samples, vs, hvp(vs), strict=True):
                acc.append(float((v.double() * hv.double()).sum()))
            bar.update(1)
            if k >= max(min_samples, 2):
                worst = max(_rel_stderr(s) for s in samples)
                bar.set_postfix(rel_stderr=f"{worst:.3g}")
                if worst <= tol:
                    break
    finally:
        bar.close()
    means = [math.fsum(s) / len(s) for s in samples]
    return means, [_stderr(s) for s in samples], len(samples[0])


def _stderr(s: list[float]) -> float:
    if len(s) < 2:
        return math.inf
    m = math.fsum(s) / len(s)
    return math.sqrt(math.fsum((x - m) ** 2 for x in s) / (len(s) - 1) / len(s))


def _rel_stderr(s: list[float]) -> float:
    se = _stderr(s)
    m = abs(math.fsum(s) / len(s))
    if se == 0.0:
        return 0.0
    return se / m if m > 0 else math.inf


def weighted_layers(model: torch.nn.Module) -> list[tuple[str, str]]:
    """``(layer name, module path)`` of each weighted layer, in graph (or module) order.

    In an fx graph the name is the one the converter records as the layer's
    source (the ONNX node name); a module called by several nodes is listed
    once, under its first node.  Elsewhere it is the module path.
    """
    found: list[tuple[str, str]] = []
    if isinstance(model, fx.GraphModule):
        seen = set()
        for node in model.graph.nodes:
            if node.op != "call_module" or node.target in seen:
                continue
            if isinstance(model.get_submodule(node.target), WEIGHTED):
                seen.add(node.target)
                found.append((str(node.meta.get("onnx_node") or node.meta.get("onnx_name") or node.name), node.target))
    else:
        found = [(path or type(mod).__name__, path) for path, mod in model.named_modules() if isinstance(mod, WEIGHTED)]
    names = [n for n, _ in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(
            f"Sensitivity: several weighted layers share the name(s) {dup}; give the ONNX nodes unique names."
        )
    return found


def layer_sensitivity(
    model: torch.nn.Module,
    batches: Sequence,
    labels: Sequence | None = None,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    output_index: int = 0,
    bits: Sequence[int] = (4, 8),
    max_samples: int = 100,
    min_samples: int = 8,
    tol: float = 0.1,
    seed: int = 0,
    cache_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, LayerSensitivity]:
    """Hessian trace and weight perturbation of every weighted layer (see the module docstring).

    model: a ``QuantizedModel`` (its ``float_graph`` is measured), a canonical
        float graph, or a plain module with ``Linear`` / ``Conv2d`` layers.
    batches: each a tensor or a tuple of tensors in input order.
    labels: one tensor per batch (class indices for the cross entropy), or None.
    Returns the layers by name, in graph order.
    """
    if isinstance(model, QuantizedModel):
        if model.float_graph is None:
            raise ValueError("Sensitivity: this QuantizedModel carries no float graph; pass the float model instead.")
        model = model.float_graph
    batches = [_as_tuple(b, k) for k, b in enumerate(batches)]
    if not batches:
        raise ValueError("Sensitivity needs at least one batch of data.")
    if labels is not None:
        labels = [torch.as_tensor(t) for t in labels]
        if len(labels) != len(batches):
            raise ValueError(
                f"Sensitivity: {len(labels)} label tensors for {len(batches)} batches; pass one per batch."
            )
    if not 1 <= min_samples <= max_samples:
        raise ValueError(f"Sensitivity: need 1 <= min_samples ({min_samples}) <= max_samples ({max_samples}).")
    if tol < 0:
        raise ValueError(f"Sensitivity: tol={tol} must be >= 0 (the relative standard error to stop at).")
    layers = weighted_layers(model)
    if not layers:
        raise ValueError("Sensitivity: the model has no Linear/Conv2d (FLinear/FConv2d) layers.")
    kind = "custom" if loss_fn is not None else ("cross_entropy" if labels is not None else "kl")
    settings = {
        "loss": kind if loss_fn is None else f"custom:{loss_fn.__module__}.{getattr(loss_fn, '__qualname__', '?')}",
        "output_index": output_index,
        "bits": sorted(int(b) for b in bits),
        "max_samples": max_samples,
        "min_samples": min_samples,
        "tol": tol,
        "seed": seed,
    }
    key = None
    if cache_path is not None:
        key = cache_key(model, layers, batches, labels, settings)
        hit = _cache_read(Path(cache_path)).get(key)
        if hit is not None:
            return {d["name"]: LayerSensitivity.from_dict(d) for d in hit["layers"]}
    result = _measure(model, layers, batches, labels, loss_fn, kind, settings, progress)
    if cache_path is not None:
        _cache_write(Path(cache_path), key, {"settings": settings, "layers": [r.to_dict() for r in result.values()]})
    return result


def _as_tuple(batch, k: int) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(torch.as_tensor(t) for t in batch)
    if isinstance(batch, dict):
        raise ValueError(f"Sensitivity: batch {k} is a dict; pass a tuple of tensors in the model's input order.")
    return (torch.as_tensor(batch),)


def _measure(model, layers, batches, labels, loss_fn, kind, settings, progress) -> dict[str, LayerSensitivity]:
    was_training = model.training
    model.eval()
    try:
        mods = [model.get_submodule(path) for _, path in layers]
        weights = [m.weight.detach().clone().requires_grad_(True) for m in mods]
        frozen = {n: p.detach() for n, p in model.named_parameters()}
        macs: dict[str, int] = {}

        def record(path):
            def hook(mod, args, out):
                if path not in macs:
                    per_sample = out.numel() // max(out.shape[0], 1) if out.dim() > 0 else out.numel()
                    macs[path] = int(per_sample * mod.weight[0].numel())

            return hook

        handles = [m.register_forward_hook(record(path)) for m, (_, path) in zip(mods, layers, strict=True)]
        # Each layer's input gets a zero ``delta`` (the "Input activations" section): recorded shapes first.
        perturb = {"deltas": None, "seen": set(), "shapes": []}

        def add_delta(i):
            def pre_hook(mod, args):
                if i in perturb["seen"]:
                    return None  # a module called again in the same forward: perturbed at its first call only
                perturb["seen"].add(i)
                if perturb["deltas"] is None:
                    perturb["shapes"][-1][i] = args[0].shape
                    return None
                return (args[0] + perturb["deltas"][i], *args[1:])

            return pre_hook

        handles += [m.register_forward_pre_hook(add_delta(i)) for i, m in enumerate(mods)]

        def output(batch, ws):
            subst = dict(frozen)
            subst.update({f"{path}.weight" if path else "weight": w for (_, path), w in zip(layers, ws, strict=True)})
            out = torch.func.functional_call(model, subst, batch, strict=False)
            if isinstance(out, (tuple, list)):
                out = out[settings["output_index"]]
            return out

        def forward(batch, ws, deltas=None):
            perturb["deltas"], perturb["seen"] = deltas, set()
            if deltas is None:
                perturb["shapes"].append([None] * len(mods))
            return output(batch, ws)

        try:
            with torch.no_grad():
                firsts = [forward(b, weights) for b in batches]
            if any(shape is None for shapes in perturb["shapes"] for shape in shapes):
                raise ValueError("Sensitivity: a weighted layer is not called in the forward pass; remove it.")
            deltas = [
                [
                    torch.zeros(shape, dtype=w.dtype, requires_grad=True)
                    for shape, w in zip(shapes, weights, strict=True)
                ]
                for shapes in perturb["shapes"]
            ]
            return _traces(model, layers, mods, weights, deltas, forward, batches, labels, loss_fn, kind, settings,
                           firsts, macs, progress)  # fmt: skip
        finally:
            for h in handles:
                h.remove()
    finally:
        model.train(was_training)


def _traces(model, layers, mods, weights, deltas, forward, batches, labels, loss_fn, kind, settings, firsts, macs,
            progress) -> dict[str, LayerSensitivity]:  # fmt: skip
    """The Hutchinson draws over the weights and the per-batch input deltas (module docstring)."""
    if kind == "kl":
        targets = [torch.softmax(y.double(), dim=-1).to(y.dtype).detach() for y in firsts]
    else:
        targets = labels if labels is not None else [None] * len(batches)
    sizes = [b[0].shape[0] if b and b[0].dim() > 0 else 1 for b in batches]
    shares = [s / sum(sizes) for s in sizes]

    def loss_of(k):
        y = forward(batches[k], weights, deltas[k])
        if loss_fn is not None:
            return loss_fn(y, targets[k])
        if kind == "cross_entropy":
            return F.cross_entropy(y.reshape(-1, y.shape[-1]), targets[k].reshape(-1).long())
        logp = torch.log_softmax(y, dim=-1)
        p = targets[k]
        return (p * (torch.log(p.clamp_min(1e-30)) - logp)).sum(-1).mean()

    grads_cache: dict[int, tuple] = {}

    n_w, n_l = len(weights), len(mods)

    def hvp(vs):
        """``H v`` for ``vs`` = the weights' blocks, then each batch's input-delta blocks (``n_l`` per batch)."""
        total = [torch.zeros_like(w) for w in weights]
        per_batch = []
        for k, share in enumerate(shares):
            wrt = [*weights, *deltas[k]]
            v_k = [*vs[:n_w], *vs[n_w + k * n_l : n_w + (k + 1) * n_l]]
            grads = grads_cache.get(k)
            if grads is None:
                grads = torch.autograd.grad(loss_of(k), wrt, create_graph=True, allow_unused=True)
                if len(batches) == 1:  # one batch: keep its graph and reuse it for every draw
                    grads_cache[k] = grads
            terms = [(g * v).sum() for g, v in zip(grads, v_k, strict=True) if g is not None and g.requires_grad]
            hvs = [None] * len(wrt)
            if terms:  # else the loss is (at most) linear in the weights and inputs: H = 0
                hvs = torch.autograd.grad(sum(terms), wrt, retain_graph=len(batches) == 1, allow_unused=True)
            for t, hv in zip(total, hvs[:n_w], strict=True):
                if hv is not None:
                    t.add_(hv.detach(), alpha=share)
            per_batch += [
                torch.zeros_like(d) if hv is None else hv.detach() * share
                for d, hv in zip(deltas[k], hvs[n_w:], strict=True)
            ]
        return total + per_batch

    gen = torch.Generator().manual_seed(int(settings["seed"]))
    means, stderrs, count = hutchinson_traces(
        hvp,
        [w.shape for w in weights] + [d.shape for batch in deltas for d in batch],
        max_samples=settings["max_samples"],
        min_samples=settings["min_samples"],
        tol=settings["tol"],
        generator=gen,
        progress=progress,
        dtype=weights[0].dtype,
    )
    result = {}
    act_means = [math.fsum(means[n_w + k * n_l + i] for k in range(len(batches))) for i in range(n_l)]
    act_stderrs = [
        math.sqrt(math.fsum(stderrs[n_w + k * n_l + i] ** 2 for k in range(len(batches)))) for i in range(n_l)
    ]
    for i, ((name, path), mod, w) in enumerate(zip(layers, mods, weights, strict=True)):
        tr, se = means[i], stderrs[i]
        result[name] = LayerSensitivity(
            name=name,
            op=type(mod).__name__,
            params=w.numel(),
            macs=macs.get(path, 0),
            trace=tr,
            trace_stderr=se,
            samples=count,
            delta_w={b: weight_perturbation(w, b) for b in settings["bits"]},
            act_trace=act_means[i],
            act_trace_stderr=act_stderrs[i],
        )
    return result


# ---------------------------------------------------------------- cache
def cache_key(model, layers, batches, labels, settings) -> str:
    """SHA-256 of the model's state, its weighted layers, the data, the labels and the settings."""
    h = hashlib.sha256(f"{CACHE_FORMAT}-v{CACHE_VERSION}".encode())
    h.update(json.dumps([list(x) for x in layers]).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        _hash_tensor(h, t)
    for batch in batches:
        h.update(b"batch")
        for t in batch:
            _hash_tensor(h, t)
    for t in labels or ():
        h.update(b"label")
        _hash_tensor(h, t)
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _cache_read(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"Sensitivity cache {path} cannot be read ({exc}); delete it or pass another path.") from exc
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not an intq sensitivity cache; pass another cache path.")
    if doc.get("version") != CACHE_VERSION:
        return {}  # written by another version: recompute (and replace it)
    return doc.get("entries", {})


def _cache_write(path: Path, key: str, entry: dict) -> None:
    entries = dict(_cache_read(path))
    entries[key] = entry
    doc = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def input_noise(qmodels: dict) -> dict[str, dict[int, float]]:
    """``{layer: {b: S_b^2 / 12}}``: the variance of rounding each weighted layer's input to the converter's grid.

    ``qmodels``: ``{b: QuantizedModel}``, each converted with every layer at ``b`` bits
    (``QuantConfig(bits=b, first_last_bits=b)``).  ``S_b`` is the layer's input scale there
    (``LayerRecord.in_scale``; a per-channel scale contributes the mean of its squares).  A layer whose
    input the converter keeps at int8 whatever its width (a GELU, Softmax or MatMul output) has the same
    scale at every ``b``, so its term does not favour either width.  Layers are named by their source
    in the canonical graph, as ``layer_sensitivity`` names them.
    """
    out: dict[str, dict[int, float]] = {}
    for bits, qmodel in qmodels.items():
        for rec in qmodel.layers:
            if rec.op.startswith(("IntLinear", "IntConv2d")) and rec.in_scale is not None:
                scale = torch.as_tensor(rec.in_scale, dtype=torch.float64)
                out.setdefault(rec.source, {})[int(bits)] = float((scale**2).mean()) / 12.0
    return out
