"""The attention_mask rule on encoders exported by ``transformers`` (legacy and dynamo exporters, eager and
SDPA attention): every masked softmax becomes FMaskedSoftmax, the mask path disappears, and the float
function is unchanged; masks that are not padding masks are refused with the reason."""

from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from intq.quantizer.canonical import FMaskedSoftmax
from intq.quantizer.canonicalize import canonicalize
from intq.quantizer.capture import capture

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
LAYERS = 2


def tiny_bert(attn: str):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=40, attn_implementation=attn,
    )  # fmt: skip
    return BertModel(config).eval()


class LastHidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


def export(module, exporter: str, example) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            buffer = io.BytesIO()
            torch.onnx.export(
                module, example, buffer, dynamo=False, input_names=NAMES, output_names=["last_hidden_state"],
                dynamic_axes={n: {0: "batch", 1: "seq"} for n in NAMES}, opset_version=17,
            )  # fmt: skip
            return onnx.load_from_string(buffer.getvalue())
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        program = torch.onnx.export(
            module, example, dynamo=True, input_names=NAMES, output_names=["last_hidden_state"],
            dynamic_shapes=tuple({0: batch, 1: seq} for _ in NAMES),
        )  # fmt: skip
        return program.model_proto


def batch(rows: int, length: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (rows, length), generator=gen)
    mask = torch.ones(rows, length, dtype=torch.int64)
    for r in range(1, rows):
        mask[r, length - r :] = 0  # row r has r padding tokens
    return ids, mask, torch.zeros(rows, length, dtype=torch.int64)


@pytest.fixture(scope="module", params=[("legacy", "eager"), ("legacy", "sdpa"), ("dynamo", "sdpa")], ids=str)
def exported(request):
    exporter, attn = request.param
    return export(LastHidden(tiny_bert(attn)), exporter, batch(2, 8, 0))


def ops_left(gm) -> Counter:
    return Counter(
        gm.get_submodule(n.target).op_type
        for n in gm.graph.nodes
        if n.op == "call_module" and hasattr(gm.get_submodule(n.target), "op_type")
    )


def test_every_masked_softmax_is_recognised(exported):
    gm = capture(exported)
    counts = canonicalize(gm, batch(4, 8, 1))
    assert counts["attention_mask"] == LAYERS
    masked = [
        n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FMaskedSoftmax)
    ]
    assert len(masked) == LAYERS
    assert all(n.args[1].op == "placeholder" and n.args[1].meta["onnx_name"] == "attention_mask" for n in masked)
    left = ops_left(gm)
    for op in ("Softmax", "Where", "IsNaN", "Cast", "Expand", "GatherND", "Range", "And", "Equal"):
        assert left[op] == 0, (op, left)  # the mask path is gone; shape ops for the reshapes remain


def test_the_float_function_is_unchanged_at_the_kept_tokens(exported):
    gm = capture(exported)
    canonicalize(gm, batch(4, 8, 1))
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    for rows, length, seed in ((3, 8, 2), (2, 5, 3)):
        inputs = batch(rows, length, seed)
        want = session.run(None, {n: t.numpy() for n, t in zip(NAMES, inputs, strict=True)})[0]
        with torch.no_grad():
            got = gm(*inputs)[0].numpy()
        kept = inputs[1].numpy().astype(bool)
        np.testing.assert_allclose(got[kept], want[kept], rtol=0, atol=1e-4)


class CausalEncoder(torch.nn.Module):
    """One attention layer whose mask is padding AND causal: not a padding mask, so refused."""

    def __init__(self, weak: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.weak = weak

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) * 0.25
        pad = (1.0 - attention_mask[:, None, :].float()) * (-100.0 if self.weak else -1e9)
        if not self.weak:
            length = input_ids.shape[1]
            causal = torch.triu(torch.ones(length, length), diagonal=1) * -1e9
            pad = pad + causal
        return torch.softmax(scores + pad, dim=-1) @ v


@pytest.mark.parametrize(
    "weak, reason",
    [(False, "keeps other positions than those where this input is nonzero"), (True, "not all 0 or <= -1e4")],
    ids=["causal", "weak-mask"],
)
def test_a_mask_that_is_not_a_padding_mask_is_refused_with_the_reason(weak, reason):
    import intq
    from intq.quantizer.convert import UnsupportedModelError

    ids, mask = batch(3, 6, 4)[:2]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            CausalEncoder(weak).eval(), (ids, mask), buffer, dynamo=False, input_names=NAMES[:2],
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in NAMES[:2]}, opset_version=17,
        )  # fmt: skip
    model = onnx.load_from_string(buffer.getvalue())
    gm = capture(model)
    assert canonicalize(gm, (ids, mask))["attention_mask"] == 0
    with pytest.raises(UnsupportedModelError, match=reason):
        intq.quantize(model, [(ids, mask)], progress=False)


def test_calibration_does_not_see_the_padding(exported):
    """What the [PAD] positions hold changes no clip of a per-token value (hidden states, FFN activations)."""
    from intq.quantizer.calibrate import calibrate

    gm = capture(exported)
    ids, mask, types = batch(4, 8, 1)
    canonicalize(gm, (ids, mask, types))
    other = ids.clone()
    other[mask == 0] = 63  # another token at every padded position
    seen = calibrate(gm, [(ids, mask, types)], progress=False)
    seen_other = calibrate(gm, [(other, mask, types)], progress=False)
    per_token = [n.name for n in gm.graph.nodes if tuple(n.meta.get("shape", ()))[:2] == (4, 8)]
    assert len(per_token) > 10
    for name in per_token:
        if name in seen:
            assert seen[name].amax == seen_other[name].amax, name
    scores = [n for n in gm.graph.nodes if len(n.meta.get("shape", ())) == 4 and n.name in seen]
    assert any(seen[n.name].amax != seen_other[n.name].amax for n in scores)  # the whole scores are observed
