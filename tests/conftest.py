"""Shared fixtures: the real all-MiniLM-L6-v2 (its pip package is installed by .ci/run)."""

from __future__ import annotations

import pytest
import torch

import intq
from intq.config import QuantConfig
from intq.models.vit import VisionTransformer, ViTConfig


@pytest.fixture(scope="session")
def minilm():
    """``(model, tokenizer)`` of all-MiniLM-L6-v2, loaded once per session."""
    from intq.models.minilm import load_minilm_l6

    return load_minilm_l6()


@pytest.fixture(scope="session")
def deit_tiny():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig.deit_tiny(num_classes=10)).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(2, 3, 224, 224, generator=gen) for _ in range(2)]
    return model, intq.quantize(model, calib, progress=False)


@pytest.fixture(scope="session")
def minilm_int8(minilm):
    from intq.models.minilm import length_batches
    from intq.models.sst2 import load_calibration_sentences

    model, tokenizer = minilm
    ids = [e.ids for e in tokenizer.encode_batch(load_calibration_sentences(48))]
    calib = [torch.tensor([ids[i] for i in g]) for g in length_batches([len(x) for x in ids], 8)]
    return model, tokenizer, intq.quantize(model, calib, QuantConfig(calibration="percentile"), progress=False)
