from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from intq.models.mobilenet import InvertedResidual, mobilenet_v2, round_channels


def test_torchvision_names_and_parameter_count():
    model = mobilenet_v2()
    # torchvision's mobilenet_v2 (1000 classes, width 1.0) has 3,504,872 parameters
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    state = model.state_dict()
    shapes = {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),  # t = 1: no expansion, depthwise first
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.running_var": (16,),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),  # expansion 6
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "classifier.1.weight": (1000, 1280),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert len(model.features) == 19
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert sum(b.use_residual for b in blocks) == 10
    assert all(isinstance(m, nn.ReLU6) for m in model.modules() if isinstance(m, nn.ReLU | nn.ReLU6))


def test_width_multiplier():
    assert [round_channels(c * 0.5) for c in (32, 16, 24, 96, 320)] == [16, 8, 16, 48, 160]
    assert round_channels(32 * 0.35) == 16  # 8 would lose more than 10%
    half = mobilenet_v2(num_classes=10, width=0.5)
    assert half.features[0][0].out_channels == 16 and half.last_channels == 1280
    assert mobilenet_v2(width=1.4).last_channels == 1792
    depthwise = [m for m in half.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    with pytest.raises(ValueError, match="width must be a positive number"):
        mobilenet_v2(width=0)


def test_cifar_forward_shapes():
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10, width=0.5, cifar_stem=True).eval()
    with torch.no_grad():
        assert model.features(torch.randn(1, 3, 32, 32)).shape == (1, 1280, 4, 4)
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
        assert mobilenet_v2(num_classes=10).eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_dynamo_export_and_capture():
    import onnxruntime as ort

    from intq.quantizer.capture import capture, export_torch

    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10, width=0.5, cifar_stem=True).eval()
    proto = export_torch(model, (torch.randn(2, 3, 32, 32),))  # torch.onnx.export(dynamo=True), batch dynamic
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    images = torch.randn(3, 3, 32, 32)
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        want = model(images).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4 * float(np.abs(want).max()), rtol=1e-4)
    assert {n.op_type for n in proto.graph.node} >= {"Conv", "Clip", "Add"}
    graph = capture(proto)
    assert [n for n in graph.graph.nodes if n.op == "call_module"], "capture produced no ONNX node modules"
