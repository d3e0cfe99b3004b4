from __future__ import annotations

import numpy as np
import pytest
import torch

from intq.models.bert import BertConfig, BertEncoder

SMALL = BertConfig(vocab_size=100, hidden=32, layers=2, heads=4, intermediate=64, max_positions=64)


def _small_model() -> BertEncoder:
    torch.manual_seed(0)
    model = BertEncoder(SMALL).eval()
    # Non-trivial LayerNorm parameters, so that a swapped weight/bias would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("heads", 5, "divisible by heads"),
        ("layers", 0, "layers must be a positive integer"),
        ("hidden", 32.0, "hidden must be a positive integer"),
        ("layer_norm_eps", 0.0, "layer_norm_eps must be a positive number"),
    ],
)
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        BertConfig(**{**SMALL.to_dict(), field: value})


def test_config_round_trips_through_a_dict():
    assert BertConfig.from_dict(SMALL.to_dict()) == SMALL
    assert BertConfig().head_dim == 32


def test_config_from_hf_rejects_other_activations():
    hf = {
        "vocab_size": 10,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
        "max_position_embeddings": 8,
        "hidden_act": "relu",
    }
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        BertConfig.from_hf_config(hf)


def test_parameter_names_are_hugging_face_names():
    names = set(BertEncoder(SMALL).state_dict())
    expected = {
        f"embeddings.{n}.weight" for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    } | {"embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"}
    for i in range(SMALL.layers):
        prefix = f"encoder.layer.{i}."
        for module in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        ):
            expected |= {prefix + module + ".weight", prefix + module + ".bias"}
    assert names == expected


def test_output_shape_and_no_cross_talk_between_rows():
    model = _small_model()
    ids = torch.randint(0, SMALL.vocab_size, (3, 9))
    with torch.no_grad():
        out = model(ids)
        single = model(ids[1:2])
    assert out.shape == (3, 9, SMALL.hidden)
    torch.testing.assert_close(out[1:2], single, atol=1e-6, rtol=0)


def test_dynamo_export_matches_torch_with_dynamic_batch_and_sequence(tmp_path):
    import onnxruntime as ort
    from torch.export import Dim

    model = _small_model()
    ids = torch.randint(0, SMALL.vocab_size, (2, 7))
    program = torch.onnx.export(
        model, (ids,), dynamo=True, dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},), verbose=False
    )
    path = tmp_path / "bert.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for shape in [(2, 7), (3, 11), (1, SMALL.max_positions)]:
        x = torch.randint(0, SMALL.vocab_size, shape)
        got = session.run(None, {name: x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (*shape, SMALL.hidden)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"input shape {shape}")


def test_matches_transformers_bert_model_on_real_minilm(minilm, monkeypatch):
    import transformers  # a test dependency: setup.py extras_require["test"]

    from intq.models.minilm import minilm_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = transformers.BertModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    model, tokenizer = minilm
    sentences = [
        "it 's a charming and often affecting journey .",
        "Unflinchingly bleak and desperate",
        "A",
        "The movie was good, but the popcorn was stale and the seats were far too small for anyone over 6 feet!",
    ]
    for sentence in sentences:
        ids = torch.tensor([tokenizer.encode(sentence).ids])
        with torch.no_grad():
            ours = model(ids)
            theirs = reference(input_ids=ids).last_hidden_state
        diff = (ours - theirs).abs().max().item()
        assert diff < 1e-4, f"max |diff| {diff:.2e} on {sentence!r}"
