"""Canonicalization rule: the attention mask of a Hugging Face encoder → ``FMaskedSoftmax``.

``transformers`` encoders take ``attention_mask [B, L]`` (1 keep, 0 pad) and
turn it, inside the exported graph, into something added to the scores:

- eager attention: ``M = Where(keep4d, 0, finfo.min)`` (older versions
  ``(1 - Cast(mask)) * finfo.min``), then ``Softmax(Add(scores, M))``;
- SDPA: ``M = Where(keep4d, 0, -inf)``, ``Softmax(Add(scores, M))``, then
  ``Where(IsNaN(P), 0, P)`` for rows with no kept key;
- ``masked_fill``: ``Softmax(Where(keep4d, scores, NEG))``.

``keep4d`` is a boolean ``[B, 1, Lq, Lk]`` built from the mask by ``Cast``,
``Unsqueeze``, ``Expand``, ``Range``, ``GatherND`` and friends, in a different
way by every exporter and every transformers version.  What they all
compute is the padding mask ``keep[b, :, :, k] = attention_mask[b, k] !=
0``.  The rule recognises that *function*, not the nodes that compute it:

1. Candidates: a ``Softmax`` over the last axis whose input is
   ``Add(scores, M)`` with ``M`` a float value computed from the integer
   graph inputs alone (through data edges; ``Shape``/``Size`` of a float
   value cut the dependency, as shape computations), or ``Where(C, scores,
   NEG)`` / ``Where(C, NEG, scores)`` with ``C`` so computed and ``NEG`` a
   constant ``<= MASKED_AT`` (``-1e4``; ``exp`` of it is 0 in float32).
2. Evaluation: the float graph runs on the calibration batch with the mask
   input replaced by random 0/1 values (every row keeps key 0, one row
   keeps every key), and, when the sequence axis is dynamic and every input
   is integer, once more one token shorter.  ``M`` must take only the
   values 0 (kept) and ``<= MASKED_AT`` (masked), and the kept set must
   equal ``attention_mask[b, k] != 0`` broadcast onto the scores, at every
   position, in every run.  The mask input is the rank-2 integer input
   that makes this hold (inputs named like ``*mask*`` are tried first).
3. Rewrite: the ``Softmax`` becomes ``FMaskedSoftmax(scores, mask
   input)``; a ``Where(IsNaN(P), 0, P)`` on its result is dropped (it never
   yields NaN: a row with no kept key is 0, as that ``Where`` makes it); the
   mask path becomes dead and is removed.

Where a candidate fails the evaluation (a causal mask, a relative position
bias added to the scores), the graph is left unchanged and each node that
turns the integer inputs into floats on that path records why in
``meta["refused"]``, which the converter's error quotes.

Integer semantics: the converter makes the masked Shiftmax
(``quantizer/ops/shiftmax.py``), in which a masked key contributes nothing
to the row maximum or the row sum, so a sentence padded to any length gets
the same integers at its own tokens as the sentence alone.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from intq.quantizer.canonical import FMaskedSoftmax, key_mask
from intq.quantizer.fx_graph import const_value, is_last_axis, onnx_op, remove_dead, replace_with_module, scalar_const

MASKED_AT = -1e4  # a mask value at or below this is a masked key; 0 is a kept one
SHAPE_OPS = ("Shape", "Size")
PROBE_SEED = 20261207


def attention_mask(gm: fx.GraphModule, example_inputs) -> int:
    """Rewrite every recognised masked softmax (see the module docstring); return how many."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sources = _integer_sources(gm)
    candidates = [c for c in (_candidate(gm, n, sources) for n in list(gm.graph.nodes)) if c is not None]
    if not candidates:
        return 0
    mask_inputs = _mask_input_candidates(placeholders, example_inputs)
    count = 0
    verdicts: dict[fx.Node, tuple[fx.Node | None, str]] = {}
    for softmax_node, scores, path, form in candidates:
        if path not in verdicts:
            verdicts[path] = _identify(gm, path, form, scores, placeholders, mask_inputs, example_inputs)
        mask_input, reason = verdicts[path]
        if mask_input is None:
            _refuse_path(gm, path, reason, sources)
            continue
        new = replace_with_module(gm, softmax_node, FMaskedSoftmax(), (scores, mask_input), softmax_node.name)
        _drop_nan_guards(gm, new)
        count += 1
    remove_dead(gm)
    return count


def _integer_sources(gm: fx.GraphModule) -> dict[fx.Node, frozenset | None]:
    """Per node: the integer placeholders its value is computed from, or None if it carries float data.

    Float data: a float graph input, or a float constant of more than one element (a weight, an embedding
    table); a value read through them (the scores, an embedding lookup of the token ids) carries it.  Data
    edges only: ``Shape``/``Size`` depend on a shape, not on a value; constants depend on nothing.
    """
    sources: dict[fx.Node, frozenset | None] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            dt = node.meta.get("dtype")
            sources[node] = None if dt is None or dt.is_floating_point else frozenset({node})
        elif node.op == "get_attr":
            value = const_value(gm, node)
            sources[node] = (
                None if value is not None and value.is_floating_point() and value.numel() > 1 else frozenset()
            )
        elif onnx_op(gm, node, SHAPE_OPS) is not None:
            sources[node] = frozenset()
        elif node.op in ("call_module", "call_function"):
            found: frozenset | None = frozenset()
            for arg in node.all_input_nodes:
                src = sources.get(arg)
                if src is None:
                    found = None
                    break
                found = found | src
            sources[node] = found
    return sources


def _from_integer_inputs(node, sources) -> bool:
    return isinstance(node, fx.Node) and bool(sources.get(node))


def _candidate(gm, node: fx.Node, sources):
    """``(softmax node, scores, mask path value, form)`` if ``node`` is a softmax of a masked score, else None."""
    op = onnx_op(gm, node, "Softmax")
    if op is None or not is_last_axis(op.attrs.get("axis", -1), node.args[0]):
        return None
    inner = node.args[0]
    if len(inner.users) != 1:
        return None
    if onnx_op(gm, inner, "Add") is not None:
        a, b = inner.args
        for scores, path in ((a, b), (b, a)):
            if _from_integer_inputs(path, sources) and sources.get(scores) is None and _is_float(path):
                return node, scores, path, "add"
        return None
    if onnx_op(gm, inner, "Where") is not None:
        cond, yes, no = inner.args
        if not _from_integer_inputs(cond, sources):
            return None
        neg_no, neg_yes = _masked_constant(gm, no), _masked_constant(gm, yes)
        if neg_no and sources.get(yes) is None:
            return node, yes, cond, "keep_if_true"
        if neg_yes and sources.get(no) is None:
            return node, no, cond, "keep_if_false"
    return None


def _is_float(node: fx.Node) -> bool:
    dt = node.meta.get("dtype")
    return dt is not None and dt.is_floating_point


def _masked_constant(gm, node) -> bool:
    value = scalar_const(gm, node)
    return value is not None and value <= MASKED_AT


def _mask_input_candidates(placeholders, example_inputs) -> list[int]:
    """Indices of the rank-2 integer inputs, those named like a mask first."""
    found = [i for i, value in enumerate(example_inputs) if value.dim() == 2 and not value.is_floating_point()]
    return sorted(found, key=lambda i: "mask" not in str(placeholders[i].meta.get("onnx_name", "")).lower())


def _identify(gm, path, form, scores, placeholders, mask_inputs, example_inputs) -> tuple[fx.Node | None, str]:
    """The placeholder whose padding mask ``path`` computes, or ``(None, reason)``."""
    if not mask_inputs:
        return None, "the model has no rank-2 integer input that could be an attention mask [batch, keys]"
    reasons = []
    for index in mask_inputs:
        reason = _check_mask_input(gm, path, form, scores, index, example_inputs)
        if reason is None:
            return placeholders[index], ""
        reasons.append(f"input {placeholders[index].meta.get('onnx_name', placeholders[index].name)!r}: {reason}")
    return None, (
        "the value added to the attention scores is computed from the integer inputs, but it is not a padding "
        "mask (keep key k of row b where mask[b, k] != 0 for an input mask [batch, keys], masked keys <= -1e4): "
        + "; ".join(reasons)
        + ". Causal masks and additive position biases are not supported; export the encoder with a padding "
        "mask only"
    )


def _probes(example_inputs, index: int) -> list[tuple[torch.Tensor, ...]]:
    """Inputs for the evaluation: random 0/1 masks at the example's length, and one token shorter if possible."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    base = list(example_inputs)
    batch, length = base[index].shape
    probes = [tuple(base[:index] + [_random_mask(batch, length, gen, base[index].dtype)] + base[index + 1 :])]
    all_integer = all(not t.is_floating_point() for t in base)
    if all_integer and length > 2:
        short = [t[:, : length - 1] if t.dim() >= 2 and tuple(t.shape[:2]) == (batch, length) else t for t in base]
        short[index] = _random_mask(batch, length - 1, gen, base[index].dtype)
        probes.append(tuple(short))
    return probes


def _random_mask(batch: int, length: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.randint(0, 2, (batch, length), generator=gen)
    mask[:, 0] = 1
    mask[0] = 1
    return mask.to(dtype)


class _Capture(fx.Interpreter):
    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted, self.values = set(wanted), {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def _check_mask_input(gm, path, form, scores, index, example_inputs) -> str | None:
    """None if ``path`` computes the padding mask of input ``index`` on every probe, else why not."""
    for probe in _probes(example_inputs, index):
        capture = _Capture(gm, (path, scores))
        try:
            with torch.no_grad():
                capture.run(*probe)
        except Exception as exc:  # the probe is not a valid input of this model: the input is not its mask
            return f"the model does not run with a 0/1 mask in it ({type(exc).__name__})"
        value, score = capture.values[path], capture.values[scores]
        if form == "add":
            if not bool(((value == 0) | (value <= MASKED_AT)).all()):
                return "the added values are not all 0 or <= -1e4"
            kept = value == 0
        else:
            kept = value.bool() if form == "keep_if_true" else ~value.bool()
        mask = probe[index]
        if score.dim() < 2 or score.shape[0] != mask.shape[0] or score.shape[-1] != mask.shape[-1]:
            return f"the scores {tuple(score.shape)} are not [batch, ..., keys] for a mask {tuple(mask.shape)}"
        try:
            kept = torch.broadcast_to(kept, score.shape)
        except RuntimeError:
            return f"the mask value {tuple(kept.shape)} does not broadcast onto the scores {tuple(score.shape)}"
        if not torch.equal(kept, torch.broadcast_to(key_mask(mask, score.dim()), score.shape)):
            return "it keeps other positions than those where this input is nonzero"
    return None


def _drop_nan_guards(gm, probs: fx.Node) -> None:
    """Route the users of ``Where(IsNaN(probs), 0, probs)`` to ``probs`` (a masked softmax is never NaN)."""
    for user in list(probs.users):
        if onnx_op(gm, user, "IsNaN") is None:
            continue
        for where in list(user.users):
            if onnx_op(gm, where, "Where") is None or len(where.args) != 3:
                continue
            cond, yes, no = where.args
            if cond is user and no is probs and scalar_const(gm, yes) == 0.0:
                where.replace_all_uses_with(probs)


def _refuse_path(gm, path: fx.Node, reason: str, sources) -> None:
    """Record ``reason`` on the nodes of the mask path that produce floats from integers."""
    stack, seen = [path], set()
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if node.op == "call_module" and _is_float(node):
            ins = [a for a in node.all_input_nodes if a.op != "get_attr"]
            if all(not _is_float(a) for a in ins):
                node.meta["refused"] = reason
        stack.extend(a for a in node.all_input_nodes if sources.get(a) is not None)
