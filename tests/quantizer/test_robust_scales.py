"""Scales of trained networks: a near-dead BatchNorm channel, a dead ReLU, an all-zero input, and a reduction
too long for a bias; each quantizes (or is refused by name) instead of a saturated bias and a wrong diagnosis."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import intq
from intq.quantizer.convert import UnsupportedModelError
from intq.quantizer.observers import DEAD_CLIP, MagnitudeObserver


def images(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(n)]


class Stem(nn.Module):
    """conv-BN-ReLU stem, a second conv, pooling and a head: the start of an ImageNet CNN."""

    def __init__(self, dead_bias: float | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=dead_bias is not None)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, 3)
        if dead_bias is not None:
            with torch.no_grad():
                self.conv.bias.fill_(dead_bias)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(self.conv2(x).mean(dim=(2, 3)))


def emulation_matches_onnxruntime(qmodel, batch: torch.Tensor) -> np.ndarray:
    model = qmodel.to_onnx()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, {qmodel.input_names[0]: batch.numpy()})[0]
    np.testing.assert_array_equal(qmodel(batch).numpy(), want)
    return want


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_a_near_dead_batchnorm_channel_keeps_its_bias():
    torch.manual_seed(0)
    model = Stem().eval()
    with torch.no_grad():
        model.bn.weight[2], model.bn.bias[2] = 1e-6, 0.5  # gain ~ 0: the folded weights ~ 0, the bias not
        model.bn.running_var.fill_(1.0)
    calib = images(4, 1)
    qmodel = intq.quantize(model, calib, progress=False)
    conv = next(m for m in qmodel.graph_module.modules() if type(m).__name__ == "IntConv2d")
    assert int(conv.b.abs().max()) < 2**31 - 1 - 27 * 128 * 128  # no saturated bias
    x = images(1, 2)[0]
    got = emulation_matches_onnxruntime(qmodel, x)
    with torch.no_grad():
        assert cosine(got, model(x).numpy()) > 0.99


def test_a_dead_relu_feeds_the_next_layer_its_bias_only():
    torch.manual_seed(0)
    model = Stem(dead_bias=-1e3).eval()  # every conv output < 0: the ReLU is 0 everywhere
    calib = images(3, 3)
    qmodel = intq.quantize(model, calib, progress=False)
    x = images(1, 4)[0]
    got = emulation_matches_onnxruntime(qmodel, x)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(6, 5)

    def forward(self, x, extra):
        return self.a(x) + self.b(extra)


def test_an_input_that_is_zero_in_every_calibration_batch():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    gen = torch.Generator().manual_seed(5)
    calib = [(torch.randn(4, 6, generator=gen), torch.zeros(4, 6)) for _ in range(3)]
    qmodel = intq.quantize(model, calib, progress=False)
    x = (torch.randn(2, 6, generator=gen), torch.zeros(2, 6))
    with torch.no_grad():
        np.testing.assert_allclose(qmodel(*x).numpy(), model(*x).numpy(), atol=0.05)
    observer = MagnitudeObserver()
    observer.observe(torch.zeros(3, 4))
    assert observer.clip("percentile", 127) == DEAD_CLIP


def test_a_reduction_too_long_for_a_bias_is_refused_by_layer_name():
    model = nn.Sequential(nn.Linear(131072, 2)).eval()
    calib = [torch.randn(2, 131072, generator=torch.Generator().manual_seed(6))]
    with pytest.raises(UnsupportedModelError, match=r"layer '.*': its reduction length K = 131072 .* Split the layer"):
        intq.quantize(model, calib, progress=False)
