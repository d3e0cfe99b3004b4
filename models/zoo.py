"""Small networks written the way third-party code writes them, for the corpus of real exports.

intq's own models (``vit.py``, ``bert.py``, ``resnet.py``) are written for
clean capture.  Users bring models written otherwise, and these reproduce
what their exports contain, at a size that quantizes in seconds:

- ``TimmViT``: a ViT in timm's and DINOv2's style: ``B, N, C = x.shape``
  and ``C // heads`` in the reshapes, ``F.scaled_dot_product_attention``
  (the legacy exporter computes its scale from ``Shape``), the class token
  by ``expand``, LayerScale (``x * gamma`` with a learned vector), and
  position embeddings stored for one grid and interpolated (bicubic
  ``F.interpolate`` of a constant) to the input's grid.
- ``MobileNetV3Like``: inverted residuals with HardSwish and ReLU,
  squeeze-and-excitation gates ``x * hardsigmoid(fc(relu(fc(pool(x)))))``,
  BatchNorm after every conv, a HardSwish classifier head.
- ``EfficientNetLike``: MBConv blocks with SiLU (``x * sigmoid(x)``),
  sigmoid SE gates and residuals, as EfficientNet-B0 at CIFAR size.

Random weights would not look like a trained network to a quantizer:
``trained_like`` gives a CNN BatchNorm statistics measured on data (train
mode over a few batches, then eval), per-channel gains spread as training
spreads them, and a few near-dead channels (gain ~ 1e-6, shift not 0: the
folded weights are ~0 while the bias is not), the case that breaks naive
per-channel scales.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------- ViT in timm / DINOv2 style


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


class TimmAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, layer_scale: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, heads)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.ls2 = LayerScale(dim, layer_scale)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class TimmViT(nn.Module):
    """``images [B, 3, S, S] -> logits``; position embeddings stored for a ``grid x grid`` table."""

    def __init__(
        self,
        img_size: int = 32,
        patch: int = 8,
        dim: int = 48,
        depth: int = 2,
        heads: int = 3,
        grid: int = 3,
        num_classes: int = 10,
        layer_scale: float = 0.1,
    ):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.02)
        self.grid = grid
        self.blocks = nn.ModuleList(TimmBlock(dim, heads, 2.0, layer_scale) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        for block in self.blocks:  # LayerScale as trained: spread around its init, some channels near 0
            for ls in (block.ls1, block.ls2):
                with torch.no_grad():
                    ls.gamma.mul_(torch.rand(dim) * 2)

    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        table = patch_pos.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat((cls_pos, table.permute(0, 2, 3, 1).reshape(1, h * w, dim)), dim=1)

    def forward(self, images):
        x = self.patch_embed(images)
        B, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(h, w)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


# ---------------------------------------------------------------- CNNs with gated units


class SqueezeExcite(nn.Module):
    """``x * gate(fc2(act(fc1(pool(x)))))`` with 1x1 convs as the fcs (torchvision's layout)."""

    def __init__(self, channels: int, squeeze: int, act: type[nn.Module], gate: type[nn.Module]):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.act, self.gate = act(), gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


def conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int, act: type[nn.Module] | None) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise -> SE -> project (1x1), residual when the shape is kept."""

    def __init__(self, cin, expand, cout, kernel, stride, act, se_gate: type[nn.Module] | None, se_act):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [conv_bn(cin, hidden, 1, 1, 1, act)] if expand != 1 else []
        layers.append(conv_bn(hidden, hidden, kernel, stride, hidden, act))
        if se_gate is not None:
            layers.append(SqueezeExcite(hidden, max(8, hidden // 4), se_act, se_gate))
        layers.append(conv_bn(hidden, cout, 1, 1, 1, None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3Like(nn.Module):
    """A MobileNetV3-Small-shaped CNN for 32x32 inputs: HardSwish / ReLU, HardSigmoid SE gates."""

    # (kernel, expand, out, se, activation, stride)
    SETTING = (
        (3, 1, 16, True, nn.ReLU, 2),
        (3, 4, 24, False, nn.ReLU, 2),
        (3, 3, 24, False, nn.ReLU, 1),
        (5, 4, 40, True, nn.Hardswish, 2),
        (5, 3, 40, True, nn.Hardswish, 1),
    )

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, 16, 3, 1, 1, nn.Hardswish)]
        cin = 16
        for kernel, expand, cout, se, act, stride in self.SETTING:
            layers.append(
                InvertedResidual(cin, expand, cout, kernel, stride, act, nn.Hardsigmoid if se else None, nn.ReLU)
            )
            cin = cout
        layers.append(conv_bn(cin, 96, 1, 1, 1, nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(96, 128), nn.Hardswish(), nn.Linear(128, num_classes))

    def forward(self, images):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(images), 1), 1))


class EfficientNetLike(nn.Module):
    """An EfficientNet-B0-shaped CNN for 32x32 inputs: SiLU everywhere, sigmoid SE gates, MBConv residuals."""

    # (kernel, expand, out, stride, repeats)
    SETTING = ((3, 1, 16, 1, 1), (3, 6, 24, 2, 2), (5, 6, 40, 2, 1))

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, 24, 3, 1, 1, nn.SiLU)]
        cin = 24
        for kernel, expand, cout, stride, repeats in self.SETTING:
            for i in range(repeats):
                layers.append(
                    InvertedResidual(cin, expand, cout, kernel, stride if i == 0 else 1, nn.SiLU, nn.Sigmoid, nn.SiLU)
                )
                cin = cout
        layers.append(conv_bn(cin, 128, 1, 1, 1, nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, images):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(images), 1), 1))


def trained_like(model: nn.Module, batches, dead_channels: int = 1, seed: int = 0) -> nn.Module:
    """``model`` (eval mode) with the statistics a trained CNN has; see the module docstring.

    Per BatchNorm: gains ``|N(1, 0.5)|`` and shifts ``N(0, 0.3)`` (then the
    running statistics are measured on ``batches`` in train mode, so each
    layer's output is normalized as in training), and ``dead_channels`` of
    its channels get a gain of ``1e-6`` with a shift of ``0.5``.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            c = bn.num_features
            bn.weight.copy_((1 + 0.5 * torch.randn(c, generator=gen)).abs())
            bn.bias.copy_(0.3 * torch.randn(c, generator=gen))
            dead = torch.randperm(c, generator=gen)[:dead_channels]
            bn.weight[dead], bn.bias[dead] = 1e-6, 0.5
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the batches
        model.train()
        for x in batches:
            model(x)
    return model.eval()


def fan_in_init(model: nn.Module) -> nn.Module:
    """Conv and linear weights ``N(0, 1/fan_in)`` (activations keep their size through depth)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0, 1 / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.normal_(0, 0.05)
    return model
