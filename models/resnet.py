"""ResNet-18 and ResNet-50 (He et al. 2016) with torchvision's ``state_dict`` keys, randomly initialized.

No pretrained weights ship offline; the models exist so the quantizer, the
ILP and the TVM pipeline can be exercised on the standard CNN shapes (BN
folding, strided 1x1 downsample shortcuts, residual adds, max and global
average pooling).  A torchvision checkpoint loads with ``load_state_dict``.

Layout (as torchvision, "ResNet v1.5": the stride of a Bottleneck sits on its
3x3 conv)::

    conv1 7x7/2 (64, no bias) -> bn1 -> relu -> maxpool 3x3/2 pad 1
    layer1..layer4: blocks of ``planes`` 64, 128, 256, 512; the first block of layer2..4 has stride 2
    avgpool (global) -> flatten -> fc (512 * expansion -> num_classes)

    BasicBlock (expansion 1):  conv1 3x3/s bn1 relu conv2 3x3 bn2 (+ identity or downsample) relu
    Bottleneck (expansion 4):  conv1 1x1 bn1 relu conv2 3x3/s bn2 relu conv3 1x1 (4 planes) bn3 (+ ...) relu
    downsample (first block of a layer whose stride or width changes): Sequential(conv 1x1/s, BN)

All convolutions are bias-free; BatchNorm eps 1e-5.  ResNet-18 has blocks
(2, 2, 2, 2) and 11,689,512 parameters, ResNet-50 (3, 4, 6, 3) and
25,557,032, for 1000 classes.  ``cifar_stem=True`` makes ``conv1`` a 3x3
stride-1 conv and drops the max pool (the usual CIFAR variant: a 32x32 image
reaches layer4 at 4x4); the keys stay the same.

Initialization: convs Kaiming-normal (fan_out, ReLU gain), BN weight 1 and
bias 0, ``fc`` torch's default.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(y + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(y + shortcut)


class ResNet(nn.Module):
    """``images [B, 3, H, W] -> logits [B, num_classes]`` (any H, W large enough for the strides)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks: tuple[int, int, int, int],
        num_classes: int = 1000,
        cifar_stem: bool = False,
    ):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"ResNet num_classes must be a positive integer, got {num_classes!r}.")
        if len(blocks) != 4 or any(not isinstance(n, int) or n < 1 for n in blocks):
            raise ValueError(f"ResNet blocks must be four positive integers (blocks per layer), got {blocks!r}.")
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        in_ch = 64
        for index, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
            stride = 1 if index == 1 else 2
            layer, in_ch = self._layer(block, in_ch, planes, count, stride)
            setattr(self, f"layer{index}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _layer(block, in_ch: int, planes: int, count: int, stride: int) -> tuple[nn.Sequential, int]:
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or in_ch != out_ch:
            downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
        layers = [block(in_ch, planes, stride, downsample)]
        layers += [block(out_ch, planes) for _ in range(count - 1)]
        return nn.Sequential(*layers), out_ch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, cifar_stem: bool = False) -> ResNet:
    """ResNet-18: BasicBlocks (2, 2, 2, 2)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, cifar_stem)


def resnet50(num_classes: int = 1000, cifar_stem: bool = False) -> ResNet:
    """ResNet-50: Bottlenecks (3, 4, 6, 3)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, cifar_stem)
