"""Quantization-aware training graph: the canonical float graph with fake quantizers.

The integer model is produced by ``convert`` from two things: the canonical
float graph's weights and one clip per quantized activation.  QAT trains
exactly those two things, on a copy of the canonical graph where

- each weighted layer's weight ``W`` (``FConv2d`` / ``FLinear``, BatchNorm
  already folded in) is replaced, through a ``torch.nn.utils.parametrize``
  parametrization, by its fake-quantized value, per output channel ``c``::

      S_w[c] = max|W[c]| / q_w,   W_q = clamp(round(W / S_w[c]), -q_w, q_w) * S_w[c],   q_w = 2**(b-1) - 1

  (``S_w`` is recomputed from the current weights at every step and not
  differentiated, as the converter recomputes it from the final weights);
- each activation the converter quantizes (a *site*: the fx node whose
  calibrated clip the converter reads, with the integer range it uses) is
  followed by an LSQ-style fake quantizer (Esser et al. 2020) with a learned
  step ``S = exp(log_S)``, initialised to ``clip / q_max``::

      y = clamp(round(x / S), q_min, q_max) * S

Rounding passes gradients straight through (``round_ste(v) = v +
(round(v) - v).detach()``).  The step is learned in the log domain: with
Adam, an update moves ``log_S`` by about the learning rate whatever the
gradient's size, so a step of ``1e-4`` changes ``S`` by 0.01 % whether ``S``
is 2 (raw pixels) or 0.01 (a deep activation); learned directly, the same
update is 0.005 % of the first and 1 % of the second.  (Adam moves weights
by about ``lr`` per step too, whatever their size: on ResNet-8's BN-folded
weights W4A4 QAT diverged at ``lr >= 3e-4`` (13-26 % top-1) and works at
``1e-4``, the default of ``intq.finetune``.)  After training, the learned
clip of a site is ``S * q_max``; ``convert`` turns the trained weights and
these clips into the integer model, so a fine-tuned model exports and
compiles exactly like a PTQ one.

Not simulated: the integer approximations of Shiftmax, ShiftGELU and
I-LayerNorm (their float forms run), and the dyadic rounding of requantize
multipliers (relative error below ``2**-24``).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.fx as fx
from torch.nn.utils import parametrize

from intq.quantizer.canonical import FConv2d, FLinear


@dataclasses.dataclass(frozen=True)
class ActSite:
    """A quantized activation: its calibrated clip and integer range."""

    clip: float
    qmin: int
    qmax: int


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """``round(v)`` forward, identity backward."""
    return v + (torch.round(v) - v).detach()


class WeightFakeQuant(torch.nn.Module):
    """Per-output-channel symmetric fake quantization of a weight to ``bits``."""

    def __init__(self, bits: int):
        super().__init__()
        self.qmax = 2 ** (bits - 1) - 1

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(1e-30)
        scale = (amax / self.qmax).reshape((-1,) + (1,) * (w.dim() - 1))
        return torch.clamp(round_ste(w / scale), -self.qmax, self.qmax) * scale


class ActFakeQuant(torch.nn.Module):
    """Fake quantizer with a learned step ``exp(log_scale)`` (see the module docstring)."""

    def __init__(self, site: ActSite):
        super().__init__()
        self.qmin, self.qmax = int(site.qmin), int(site.qmax)
        step = max(float(site.clip), 1e-8) / self.qmax
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(step), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.exp(self.log_scale).to(x.dtype)
        return torch.clamp(round_ste(x / s), self.qmin, self.qmax) * s

    @property
    def clip(self) -> float:
        return math.exp(float(self.log_scale.detach())) * self.qmax


def _weighted(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (FConv2d, FLinear)):
            yield node


def build_qat_graph(
    float_graph: fx.GraphModule, sites: dict[str, ActSite], weight_bits: dict[str, int]
) -> tuple[fx.GraphModule, dict[str, ActFakeQuant]]:
    """A trainable copy of ``float_graph`` with fake quantizers.

    ``sites``: fx node name -> ``ActSite``; ``weight_bits``: fx node name of
    each weighted layer -> its bits (a weighted layer not listed keeps float
    weights, like a layer the converter does not quantize).  Returns the graph
    and its activation quantizers by site name.
    """
    gm = copy.deepcopy(float_graph)
    unknown = sorted(set(sites) - {n.name for n in gm.graph.nodes})
    if unknown:
        raise ValueError(f"QAT: quantization sites {unknown} are not nodes of the float graph")
    for node in _weighted(gm):
        mod = gm.get_submodule(node.target)
        for name in ("weight", "bias"):
            value = getattr(mod, name)
            if value is not None and name in mod._buffers:
                del mod._buffers[name]
                setattr(mod, name, torch.nn.Parameter(value.detach().clone()))
        bits = weight_bits.get(node.name)
        if bits is not None:
            parametrize.register_parametrization(mod, "weight", WeightFakeQuant(bits))
    quantizers: dict[str, ActFakeQuant] = {}
    for node in list(gm.graph.nodes):
        site = sites.get(node.name)
        if site is None:
            continue
        fq = ActFakeQuant(site)
        name = f"fq_{node.name}"
        gm.add_module(name, fq)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, fq_node=new: user is not fq_node)
        quantizers[node.name] = fq
    gm.graph.lint()
    gm.recompile()
    return gm, quantizers


def trained_float_graph(float_graph: fx.GraphModule, qat_graph: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``float_graph`` carrying the trained (unquantized) weights of ``qat_graph``."""
    out = copy.deepcopy(float_graph)
    for node in _weighted(out):
        src = qat_graph.get_submodule(node.target)
        dst = out.get_submodule(node.target)
        weight = src.parametrizations.weight.original if parametrize.is_parametrized(src, "weight") else src.weight
        dst.weight = weight.detach().clone().to(dst.weight.dtype)
        if dst.bias is not None:
            dst.bias = src.bias.detach().clone().to(dst.bias.dtype)
    return out
