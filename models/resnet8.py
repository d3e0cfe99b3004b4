"""ResNet-8 for CIFAR-10, the MLPerf Tiny image-classification reference, ported from its Keras HDF5 file.

The reference (GitHub ``mlcommons/tiny``, Apache-2.0) is a Keras functional
model; ``load_resnet8`` reads its weights from
``$INTQ_SHARED/models/resnet8_cifar10.h5`` (else ``../shared/models/`` beside
the repository) with ``h5py``.  Architecture (9 convolutions, 7 BatchNorms,
3 residual adds, 78,186 parameters plus 480 BatchNorm running statistics)::

    x [B, 3, 32, 32], raw RGB 0..255 (no normalization)
    stem:   conv3x3(3->16)  BN ReLU                                   32x32
    stack1: conv3x3(16->16) BN ReLU conv3x3(16->16) BN  + stem out   ReLU
    stack2: conv3x3/2(16->32) BN ReLU conv3x3(32->32) BN + conv1x1/2(16->32) of the input   ReLU   16x16
    stack3: conv3x3/2(32->64) BN ReLU conv3x3(64->64) BN + conv1x1/2(32->64) of the input   ReLU    8x8
    head:   average pool 8x8 -> [B, 64] -> dense(64->10) -> logits

Every convolution has a bias; BatchNorm eps is 1e-3 (Keras' default); the
1x1 shortcuts have no BatchNorm.  Keras' ``padding="same"`` pads
``total = max((ceil(n / s) - 1) * s + k - n, 0)`` pixels, ``total // 2``
before and the rest after: (1, 1) for the 3x3 stride-1 convs, (0, 1) for the
3x3 stride-2 ones (written here as ``nn.ZeroPad2d((0, 1, 0, 1))`` and an
unpadded conv, so the ONNX graph shows ``Pad -> Conv``), and none for the
1x1 stride-2 shortcuts.  Symmetric padding would cost ~25 points of accuracy.

Layouts: the torch model takes NCHW float (``intq.models.cifar10.to_nchw``
turns the loader's uint8 NHWC into it, unscaled).  Keras kernels are HWIO and
become OIHW; the dense kernel ``[in, out]`` is transposed.  The Flatten sits
after an 8x8 average pool of an 8x8 map, so it flattens ``[B, 1, 1, 64]``:
NHWC and NCHW orders agree and the dense weights need no permutation.  The
Keras dense layer ends in a softmax; this port returns the logits before it
(same argmax).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from intq.models.sst2 import SHARED_ENV, _default_shared

BN_EPS = 1e-3


def resnet8_path() -> Path:
    """Where ``load_resnet8`` reads the Keras file by default."""
    shared = Path(os.environ[SHARED_ENV]) if os.environ.get(SHARED_ENV) else _default_shared()
    return shared / "models" / "resnet8_cifar10.h5"


class Stack(nn.Module):
    """Two 3x3 convs with BN; the first (and the 1x1 shortcut) strided when the width grows."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        # TF "same" padding: symmetric for stride 1, one extra row/column at the bottom/right for stride 2.
        self.pad = nn.ZeroPad2d((0, 1, 0, 1)) if stride == 2 else nn.Identity()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1 if stride == 1 else 0)
        self.bn1 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride) if stride != 1 or in_ch != out_ch else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(self.pad(x))))
        y = self.bn2(self.conv2(y))
        return self.relu2(self.shortcut(x) + y)


class ResNet8(nn.Module):
    """``images [B, 3, 32, 32]`` (float, raw 0..255) ``-> logits [B, num_classes]``."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16, eps=BN_EPS)
        self.relu = nn.ReLU()
        self.stack1 = Stack(16, 16, 1)
        self.stack2 = Stack(16, 32, 2)
        self.stack3 = Stack(32, 64, 2)
        self.pool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, 32, 32):
            raise ValueError(
                f"ResNet8 expects images [B, 3, 32, 32] (NCHW, raw 0..255), got {tuple(images.shape)}; "
                "convert uint8 NHWC images with intq.models.cifar10.to_nchw."
            )
        x = self.relu(self.bn1(self.conv1(images)))
        x = self.stack3(self.stack2(self.stack1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# torch module -> (Keras layer, its class, (filters, kernel, stride)) in the reference's layer naming.
_CONVS = {
    "conv1": ("conv2d", (16, 3, 1)),
    "stack1.conv1": ("conv2d_1", (16, 3, 1)),
    "stack1.conv2": ("conv2d_2", (16, 3, 1)),
    "stack2.conv1": ("conv2d_3", (32, 3, 2)),
    "stack2.conv2": ("conv2d_4", (32, 3, 1)),
    "stack2.shortcut": ("conv2d_5", (32, 1, 2)),
    "stack3.conv1": ("conv2d_6", (64, 3, 2)),
    "stack3.conv2": ("conv2d_7", (64, 3, 1)),
    "stack3.shortcut": ("conv2d_8", (64, 1, 2)),
}
_BNS = {
    "bn1": "batch_normalization",
    "stack1.bn1": "batch_normalization_1",
    "stack1.bn2": "batch_normalization_2",
    "stack2.bn1": "batch_normalization_3",
    "stack2.bn2": "batch_normalization_4",
    "stack3.bn1": "batch_normalization_5",
    "stack3.bn2": "batch_normalization_6",
}


def load_resnet8(path: str | Path | None = None) -> ResNet8:
    """The MLPerf Tiny ResNet-8 with the reference weights (eval mode), from ``path`` or ``resnet8_path()``.

    Raises ``FileNotFoundError`` saying where the file is looked for, and
    ``ValueError`` naming the Keras layer when the file's architecture differs
    from the one this port implements.
    """
    import h5py

    path = Path(path) if path is not None else resnet8_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"ResNet-8 Keras file {path} does not exist; pass path=..., or set {SHARED_ENV} to the shared folder "
            "that holds models/resnet8_cifar10.h5 (see its data/README.md)."
        )
    model = ResNet8().eval()
    state: dict[str, torch.Tensor] = {}
    with h5py.File(path, "r") as f:
        layers = {layer["name"]: layer for layer in json.loads(f.attrs["model_config"])["config"]["layers"]}
        weights = f["model_weights"] if "model_weights" in f else f

        def tensor(layer: str, name: str) -> np.ndarray:
            try:
                return np.asarray(weights[layer][layer][f"{name}:0"], dtype=np.float32)
            except KeyError as err:
                raise ValueError(f"{path}: layer {layer!r} has no weight {name!r}; is this the ResNet-8 file?") from err

        for prefix, (layer, (filters, kernel, stride)) in _CONVS.items():
            config = layers.get(layer, {}).get("config", {})
            got = (config.get("filters"), config.get("kernel_size"), config.get("strides"), config.get("padding"))
            if got != (filters, [kernel, kernel], [stride, stride], "same"):
                raise ValueError(
                    f"{path}: Keras layer {layer!r} is {got}, expected (filters, kernel, strides, padding) = "
                    f"({filters}, {[kernel, kernel]}, {[stride, stride]}, 'same') for {prefix}."
                )
            state[f"{prefix}.weight"] = torch.from_numpy(tensor(layer, "kernel").transpose(3, 2, 0, 1).copy())
            state[f"{prefix}.bias"] = torch.from_numpy(tensor(layer, "bias"))
        for prefix, layer in _BNS.items():
            eps = layers.get(layer, {}).get("config", {}).get("epsilon")
            if eps != BN_EPS:
                raise ValueError(f"{path}: BatchNormalization {layer!r} has epsilon {eps}, expected {BN_EPS}.")
            state[f"{prefix}.weight"] = torch.from_numpy(tensor(layer, "gamma"))
            state[f"{prefix}.bias"] = torch.from_numpy(tensor(layer, "beta"))
            state[f"{prefix}.running_mean"] = torch.from_numpy(tensor(layer, "moving_mean"))
            state[f"{prefix}.running_var"] = torch.from_numpy(tensor(layer, "moving_variance"))
        state["fc.weight"] = torch.from_numpy(tensor("dense", "kernel").T.copy())
        state["fc.bias"] = torch.from_numpy(tensor("dense", "bias"))
    expected = model.state_dict()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key not in state or state[key].shape != value.shape:
            got = tuple(state[key].shape) if key in state else "nothing"
            raise ValueError(f"{path}: {key} should be {tuple(value.shape)}, the file gave {got}.")
    model.load_state_dict(state, strict=True)
    return model
