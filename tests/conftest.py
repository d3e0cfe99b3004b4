"""Shared fixtures: the real all-MiniLM-L6-v2 (its pip package is installed by .ci/run)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def minilm():
    """``(model, tokenizer)`` of all-MiniLM-L6-v2, loaded once per session."""
    from intq.models.minilm import load_minilm_l6

    return load_minilm_l6()
