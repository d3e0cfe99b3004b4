from __future__ import annotations

import math

import h5py
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from intq.models.cifar10 import load_cifar10, to_nchw
from intq.models.resnet8 import ResNet8, load_resnet8, resnet8_path

FULL_TEST_TOP1 = 0.7548
"""fp32 top-1 on all 10,000 test JPEGs, measured by benchmarks/cifar10_fp32.py (the shared README says 75.5%)."""
SLICE = 1000


@pytest.fixture(scope="module")
def resnet8():
    # CI runs with ../shared beside the checkout: a missing file is a failure, not a skip
    assert resnet8_path().is_file(), f"ResNet-8 Keras file not found at {resnet8_path()}"
    return load_resnet8()


def test_structure(resnet8):
    convs = [m for m in resnet8.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in resnet8.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 9 and len(bns) == 7
    assert all(bn.eps == 1e-3 for bn in bns)
    # Keras model.summary(): 78,666 total = 78,186 trainable + 480 BatchNorm moving statistics
    assert sum(p.numel() for p in resnet8.parameters()) == 78_186
    assert sum(bn.running_mean.numel() + bn.running_var.numel() for bn in bns) == 480
    for stack in (resnet8.stack2, resnet8.stack3):
        assert stack.pad.padding == (0, 1, 0, 1) and stack.conv1.padding == (0, 0) and stack.conv1.stride == (2, 2)
        assert stack.shortcut.kernel_size == (1, 1) and stack.shortcut.stride == (2, 2)
    assert isinstance(resnet8.stack1.shortcut, nn.Identity)


def test_keras_layouts_are_transposed(resnet8):
    with h5py.File(resnet8_path()) as f:
        w = f["model_weights/conv2d_3/conv2d_3/kernel:0"][()]  # HWIO [3, 3, 16, 32]
        dense = f["model_weights/dense/dense/kernel:0"][()]  # [in 64, out 10]
        var = f["model_weights/batch_normalization_4/batch_normalization_4/moving_variance:0"][()]
    assert resnet8.stack2.conv1.weight[5, 7, 0, 2].item() == w[0, 2, 7, 5]
    assert resnet8.fc.weight[3, 60].item() == dense[60, 3]
    np.testing.assert_array_equal(resnet8.stack2.bn2.running_var.numpy(), var)


def test_accuracy_on_a_test_slice(resnet8):
    # The slice is the first 1,000 of the class-balanced order (100 per class).  Were it a random sample of
    # the full set, its accuracy would have standard deviation sqrt(p (1 - p) / 1000) = 1.36 points at
    # p = 75.48%; 4 sigma (5.4 points) is the tolerance.  Symmetric padding of the stride-2 convs (~50%)
    # or a wrong layout is far outside it.
    images, labels = load_cifar10("test", limit=SLICE)
    with torch.no_grad():
        top1 = float((resnet8(to_nchw(images)).argmax(1).numpy() == labels).mean())
    sigma = math.sqrt(FULL_TEST_TOP1 * (1 - FULL_TEST_TOP1) / SLICE)
    assert abs(top1 - FULL_TEST_TOP1) <= 4 * sigma, f"top-1 {top1:.4f} on {SLICE} images, full set {FULL_TEST_TOP1}"


def test_onnx_export_and_capture(resnet8):
    import onnxruntime as ort

    from intq.quantizer.capture import capture, export_torch

    images = torch.rand(2, 3, 32, 32) * 255
    proto = export_torch(resnet8, (images,))
    onnx.checker.check_model(proto)
    convs = {n.input[1]: n for n in proto.graph.node if n.op_type == "Conv"}
    assert len(convs) == 9
    # The exporter's optimizer folds our ZeroPad2d into the Conv: ONNX pads (top, left, bottom, right).
    pads = {k: [a.ints for a in n.attribute if a.name == "pads"][0] for k, n in convs.items()}
    assert pads["stack2.conv1.weight"] == pads["stack3.conv1.weight"] == [0, 0, 1, 1]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = torch.rand(3, 3, 32, 32) * 255
    got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, resnet8(batch).numpy(), atol=1e-3, rtol=1e-4)
    assert capture(resnet8, (images,)) is not None


def test_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("INTQ_SHARED", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"models/resnet8_cifar10\.h5 does not exist.*INTQ_SHARED"):
        load_resnet8()
    with pytest.raises(ValueError, match=r"expects images \[B, 3, 32, 32\]"):
        ResNet8()(torch.zeros(1, 32, 32, 3))
