from __future__ import annotations

import numpy as np
import pytest

from intq.models.probe import Probe, load_probe, probe_predict, save_probe
from intq.models.sst2 import load_sst2


def test_shipped_probe_loads():
    probe = load_probe()
    assert probe.dim == 384
    assert probe.info["n_train"] == 8000 and probe.info["seed"] == 0
    assert np.all(probe.std > 0)


def test_save_load_round_trip_and_shape_check(tmp_path):
    rng = np.random.default_rng(0)
    probe = Probe(weight=rng.normal(size=4), bias=0.5, mean=rng.normal(size=4), std=np.ones(4), info={"note": "x"})
    loaded = load_probe(save_probe(probe, tmp_path / "p.npz"))
    x = rng.normal(size=(10, 4))
    np.testing.assert_allclose(loaded.logits(x), probe.logits(x), rtol=1e-6, atol=1e-6)
    assert loaded.info == {"note": "x"}
    with pytest.raises(ValueError, match=r"embeddings \[n, 4\]"):
        probe_predict(np.zeros((2, 5)), loaded)


def test_fp32_dev_accuracy(minilm):
    from intq.models.minilm import encode

    model, tokenizer = minilm
    sentences, labels = load_sst2("dev")
    embeddings = encode(model, tokenizer, sentences, batch_size=128)
    accuracy = float((probe_predict(embeddings) == labels).mean())
    assert accuracy >= 0.78, f"fp32 SST-2 dev accuracy {accuracy:.4f} < 0.78"
