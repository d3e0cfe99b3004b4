"""MobileNetV2 (Sandler et al. 2018) with a width multiplier and a CIFAR-size variant, randomly initialized.

Parameter names follow torchvision's ``MobileNetV2`` (``features.{i}...``,
``classifier.1``), so its checkpoints load with ``load_state_dict``.
Layout::

    features.0:  conv 3x3/2 (3 -> c0) BN ReLU6                         c0 = 32 * width
    features.1..17: inverted residuals, rows (t expansion, c channels, n blocks, s stride of the first):
                 (1, 16, 1, 1) (6, 24, 2, 2) (6, 32, 3, 2) (6, 64, 4, 2) (6, 96, 3, 1) (6, 160, 3, 2) (6, 320, 1, 1)
    features.18: conv 1x1 (-> 1280 * max(1, width)) BN ReLU6
    global average pool -> classifier: Dropout(0.2) (identity in eval), Linear(-> num_classes)

    inverted residual (in -> out, stride s, expansion t), ``.conv`` is a Sequential of:
        [conv 1x1 (in -> t*in) BN ReLU6]   (absent when t = 1)
        depthwise conv 3x3/s (groups = t*in) BN ReLU6
        conv 1x1 (t*in -> out) BN          (linear bottleneck: no activation)
    plus the input when s = 1 and in = out.

Channel counts ``c * width`` are rounded to the nearest multiple of 8, and
bumped by 8 when rounding lost more than 10%.  Convs have no bias; BN eps
1e-5.  1000 classes at width 1.0: 3,504,872 parameters.

``cifar_stem=True`` (for 32x32 images) makes the stem conv and the first
stride-2 row (c = 24) stride 1, so the feature map ends at 4x4 instead of 1x1.

Initialization: convs Kaiming-normal (fan_out), BN weight 1 and bias 0, the
classifier normal(0, 0.01) with zero bias.
"""

from __future__ import annotations

import torch
from torch import nn

SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
"""Rows (expansion t, channels c, blocks n, first stride s) of the inverted residual stages."""


def round_channels(value: float, divisor: int = 8) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``), never 10% below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU6(nn.Sequential):
    """``conv (no bias) -> BN -> ReLU6``; 3x3 convs are padded by 1."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        layers: list[nn.Module] = [ConvBNReLU6(in_ch, hidden, kernel=1)] if expansion != 1 else []
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_residual else y


class MobileNetV2(nn.Module):
    """``images [B, 3, H, W] -> logits [B, num_classes]``."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, cifar_stem: bool = False):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"MobileNetV2 num_classes must be a positive integer, got {num_classes!r}.")
        if isinstance(width, bool) or not isinstance(width, int | float) or not width > 0:
            raise ValueError(f"MobileNetV2 width must be a positive number, got {width!r}.")
        in_ch = round_channels(32 * width)
        self.last_channels = round_channels(1280 * max(1.0, width))
        features: list[nn.Module] = [ConvBNReLU6(3, in_ch, stride=1 if cifar_stem else 2)]
        for row, (t, c, n, s) in enumerate(SETTING):
            out_ch = round_channels(c * width)
            first_stride = 1 if cifar_stem and row == 1 else s
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, first_stride if i == 0 else 1, t))
                in_ch = out_ch
        features.append(ConvBNReLU6(in_ch, self.last_channels, kernel=1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channels, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(images)), 1))


def mobilenet_v2(num_classes: int = 1000, width: float = 1.0, cifar_stem: bool = False) -> MobileNetV2:
    return MobileNetV2(num_classes, width, cifar_stem)
