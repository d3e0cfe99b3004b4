"""Vision Transformer (ViT / DeiT) with timm's parameter names, written for clean capture and export.

Parameter names match timm's ``VisionTransformer`` (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv``,
``blocks.{i}.attn.proj``, ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``,
``blocks.{i}.mlp.fc2``, ``norm``, ``head``), so a DeiT checkpoint (non
distilled: no ``dist_token``) loads strictly with ``load_vit_state_dict``.

Inference only: no dropout, no drop-path.  Pre-norm blocks, LayerNorm eps
1e-6, exact (erf) GELU, attention as ``softmax(Q K^T / sqrt(head_dim)) V``
with ``torch.matmul``; logits come from the class token.  The position
embedding is fixed to ``img_size``: images must be ``img_size x img_size``.
The batch dimension stays dynamic under ``torch.onnx.export(dynamo=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_PRESETS: dict[str, dict[str, Any]] = {
    "deit_tiny": {"embed_dim": 192, "depth": 12, "heads": 3},
    "deit_small": {"embed_dim": 384, "depth": 12, "heads": 6},
    "deit_base": {"embed_dim": 768, "depth": 12, "heads": 12},
    # Small enough to train on one CPU core in about half an hour (benchmarks/train_cifar_vit.py).
    "vit_cifar": {
        "embed_dim": 96,
        "depth": 4,
        "heads": 3,
        "mlp_ratio": 2.0,
        "img_size": 32,
        "patch": 4,
        "num_classes": 10,
    },
}


@dataclass(frozen=True)
class ViTConfig:
    """Sizes of a ViT; ``ViTConfig.deit_tiny()`` etc. give the DeiT presets (224x224, patch 16, 1000 classes).

    ``ViTConfig.vit_cifar()`` is the small CIFAR-10 model trained here (see ``load_cifar_vit``).
    """

    embed_dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: float = 4.0
    img_size: int = 224
    patch: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "heads", "img_size", "patch", "in_chans"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive integer, got {value!r}.")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(
                f"ViTConfig.num_classes must be a non-negative integer (0: no head), got {self.num_classes!r}."
            )
        if self.embed_dim % self.heads:
            raise ValueError(f"ViTConfig.embed_dim ({self.embed_dim}) must be divisible by heads ({self.heads}).")
        if self.img_size % self.patch:
            raise ValueError(f"ViTConfig.img_size ({self.img_size}) must be a multiple of patch ({self.patch}).")
        if not isinstance(self.mlp_ratio, int | float) or self.mlp_ratio <= 0 or self.mlp_hidden < 1:
            raise ValueError(f"ViTConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}.")
        if not isinstance(self.layer_norm_eps, int | float) or not self.layer_norm_eps > 0:
            raise ValueError(f"ViTConfig.layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}.")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ViTConfig:
        """A named preset (``deit_tiny``, ``deit_small``, ``deit_base``, ``vit_cifar``) with fields overridden."""
        if name not in _PRESETS:
            raise ValueError(f"Unknown ViT preset {name!r}; choose one of {sorted(_PRESETS)}.")
        return cls(**{**_PRESETS[name], **overrides})

    @classmethod
    def deit_tiny(cls, **overrides: Any) -> ViTConfig:
        return cls.preset("deit_tiny", **overrides)

    @classmethod
    def deit_small(cls, **overrides: Any) -> ViTConfig:
        return cls.preset("deit_small", **overrides)

    @classmethod
    def deit_base(cls, **overrides: Any) -> ViTConfig:
        return cls.preset("deit_base", **overrides)

    @classmethod
    def vit_cifar(cls, **overrides: Any) -> ViTConfig:
        """DeiT-like ViT for CIFAR-10: 32x32 input, patch 4 (64 tokens + class token), dim 96, depth 4, 3 heads."""
        return cls.preset("vit_cifar", **overrides)


class PatchEmbed(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, kernel_size=config.patch, stride=config.patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images)  # [B, D, H/p, W/p]
        return x.flatten(2).transpose(1, 2)  # [B, N, D]


class Attention(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [B, heads, N, head_dim]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores, dim=-1)
        context = torch.matmul(probs, v)
        return self.proj(context.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.mlp_hidden, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """``images [B, in_chans, img_size, img_size] -> logits [B, num_classes]`` (features ``[B, embed_dim]`` if 0)."""

    def __init__(self, config: ViTConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ViTConfig.deit_tiny()
        c = self.config
        self.patch_embed = PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.embed_dim))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.layer_norm_eps)
        self.head = nn.Linear(c.embed_dim, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # Random-init models are used by tests only; small normal weights keep activations in a sane range.
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.in_chans, c.img_size, c.img_size):
            raise ValueError(
                f"VisionTransformer expects images [B, {c.in_chans}, {c.img_size}, {c.img_size}], "
                f"got {tuple(images.shape)}; resize the images or set ViTConfig.img_size."
            )
        x = self.patch_embed(images)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0])


def load_vit_state_dict(model: VisionTransformer, path: str | Path) -> VisionTransformer:
    """Load a local ``.safetensors`` or ``.pth``/``.pt``/``.bin`` checkpoint into ``model`` strictly; returns it.

    A torch checkpoint is read with ``torch.load(weights_only=True)``; a
    top-level ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper (as in
    the DeiT release files) is unwrapped.  Raises ``ValueError`` listing the
    missing and unexpected keys, or the shape mismatches.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ViT checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif path.suffix in (".pth", ".pt", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    else:
        raise ValueError(
            f"Unsupported checkpoint format {path.suffix!r} for {path}; use .safetensors, .pth, .pt or .bin."
        )
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__}).")

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match VisionTransformer({model.config}): "
            f"missing keys {missing}, unexpected keys {unexpected}."
        )
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if tuple(state[key].shape) != tuple(value.shape)
    ]
    if mismatched:
        raise ValueError(f"{path} has tensors of the wrong shape for VisionTransformer({model.config}): {mismatched}.")
    model.load_state_dict(state, strict=True)
    return model


CIFAR_VIT_PATH = Path(__file__).resolve().parent / "data" / "vit_cifar10.safetensors"
"""Weights of ``ViTConfig.vit_cifar()`` trained on CIFAR-10 by ``benchmarks/train_cifar_vit.py``."""


def load_cifar_vit(path: str | Path | None = None) -> VisionTransformer:
    """The shipped CIFAR-10 ViT (eval mode), or the one at ``path``; its config is read from the ``.json`` beside it.

    Inputs are ``intq.models.cifar10.to_nchw(images, normalize=True)``:
    ``(x / 255 - mean) / std`` with the CIFAR-10 statistics, NCHW float32.
    The JSON also records the recipe, the training time and the full test
    set accuracy (``test_acc``).
    """
    path = Path(path) if path is not None else CIFAR_VIT_PATH
    record_path = path.with_suffix(".json")
    if not record_path.is_file():
        raise FileNotFoundError(
            f"{record_path} (the config of {path.name}) does not exist; "
            "train the model with `python benchmarks/train_cifar_vit.py --minutes 35`."
        )
    config = ViTConfig.from_dict(json.loads(record_path.read_text())["config"])
    return load_vit_state_dict(VisionTransformer(config), path).eval()
