"""A BERT encoder written to be captured and exported cleanly.

Parameter names follow Hugging Face ``BertModel`` (``embeddings.*``,
``encoder.layer.{i}.*``), so a ``BertModel`` checkpoint loads with
``strict=True`` once its unused keys (``pooler.*``, the
``embeddings.position_ids`` buffer) are dropped; see ``intq.models.minilm``.

The forward pass is inference only and deliberately narrow:

- **no attention mask**: every token attends to every token.  Callers batch
  sentences of equal token length (``intq.models.minilm.encode`` groups them
  by length), so there is never padding to mask out.
- **token type 0 for every token**: the row ``token_type_embeddings.weight[0]``
  is added to every position (single-segment input).
- no dropout, no pooler.

It is built only from the operators the quantizer knows: ``nn.Linear``,
``torch.matmul`` for QK^T and AV, a division by ``sqrt(head_dim)``,
``torch.softmax(dim=-1)``, exact (erf) ``nn.GELU()``, ``nn.LayerNorm``, and
``view``/``transpose``/``reshape`` whose sizes come from the input's shape, so
``torch.onnx.export(..., dynamo=True)`` keeps batch and sequence dynamic.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class BertConfig:
    """Sizes of a BERT encoder; the defaults are all-MiniLM-L6-v2's."""

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden", "layers", "heads", "intermediate", "max_positions", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden % self.heads:
            raise ValueError(
                f"BertConfig.hidden ({self.hidden}) must be divisible by heads ({self.heads}) "
                "so that every attention head has the same width."
            )
        if not isinstance(self.layer_norm_eps, int | float) or not self.layer_norm_eps > 0:
            raise ValueError(f"BertConfig.layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}.")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BertConfig:
        return cls(**data)

    @classmethod
    def from_hf_config(cls, data: dict[str, Any]) -> BertConfig:
        """Build from a Hugging Face ``config.json`` dictionary of a ``bert`` model."""
        act = data.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"hidden_act {act!r} is not supported; this encoder uses exact (erf) GELU ('gelu').")
        pos = data.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"position_embedding_type {pos!r} is not supported; only 'absolute' is.")
        return cls(
            vocab_size=data["vocab_size"],
            hidden=data["hidden_size"],
            layers=data["num_hidden_layers"],
            heads=data["num_attention_heads"],
            intermediate=data["intermediate_size"],
            max_positions=data["max_position_embeddings"],
            type_vocab_size=data.get("type_vocab_size", 2),
            layer_norm_eps=float(data.get("layer_norm_eps", 1e-12)),
        )


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        # Not persistent: it is derived, and the state dict then matches BertModel's parameters exactly.
        self.register_buffer("position_ids", torch.arange(config.max_positions).unsqueeze(0), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        positions = self.position_ids[:, :seq_len]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        # Token type 0 everywhere: one constant row, broadcast over batch and sequence.
        x = x + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden, config.hidden)
        self.key = nn.Linear(config.hidden, config.hidden)
        self.value = nn.Linear(config.hidden, config.hidden)

    def _split_heads(self, x: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
        return x.view(batch, seq_len, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden = x.shape
        q = self._split_heads(self.query(x), batch, seq_len)
        k = self._split_heads(self.key(x), batch, seq_len)
        v = self._split_heads(self.value(x), batch, seq_len)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores, dim=-1)
        context = torch.matmul(probs, v)
        return context.transpose(1, 2).reshape(batch, seq_len, hidden)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        # ``self.self`` is Hugging Face's name (``attention.self.query``), kept for checkpoint compatibility.
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden, config.intermediate)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class BertLayerStack(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class BertEncoder(nn.Module):
    """BERT embeddings + encoder stack: ``input_ids [B, L] -> last_hidden_state [B, L, hidden]``.

    No attention mask and token type 0 for all tokens (see the module
    docstring): batch only sentences of equal token length.  ``L`` must not
    exceed ``config.max_positions``.
    """

    def __init__(self, config: BertConfig | None = None):
        super().__init__()
        self.config = config if config is not None else BertConfig()
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertLayerStack(self.config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids))
