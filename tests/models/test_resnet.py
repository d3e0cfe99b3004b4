from __future__ import annotations

import numpy as np
import pytest
import torch

from intq.models.resnet import resnet18, resnet50

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_keys(blocks: tuple[int, ...], bottleneck: bool) -> list[str]:
    """state_dict keys of torchvision's ResNet, written from its documented structure (not from our module)."""
    keys = ["conv1.weight", *(f"bn1.{p}" for p in BN)]
    convs = 3 if bottleneck else 2
    for layer, count in enumerate(blocks, start=1):
        for block in range(count):
            prefix = f"layer{layer}.{block}"
            for i in range(1, convs + 1):
                keys += [f"{prefix}.conv{i}.weight", *(f"{prefix}.bn{i}.{p}" for p in BN)]
            # the first block of a layer downsamples when its stride (layers 2-4) or its width (bottleneck) changes
            if block == 0 and (layer > 1 or bottleneck):
                keys += [f"{prefix}.downsample.0.weight", *(f"{prefix}.downsample.1.{p}" for p in BN)]
    return [*keys, "fc.weight", "fc.bias"]


@pytest.mark.parametrize(
    ("build", "blocks", "bottleneck", "params"),
    [(resnet18, (2, 2, 2, 2), False, 11_689_512), (resnet50, (3, 4, 6, 3), True, 25_557_032)],
)
def test_torchvision_keys_and_parameter_counts(build, blocks, bottleneck, params):
    model = build()
    assert list(model.state_dict()) == torchvision_keys(blocks, bottleneck)
    # torchvision's published parameter counts for 1000 classes
    assert sum(p.numel() for p in model.parameters()) == params
    state = model.state_dict()
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["fc.weight"].shape == (1000, 512 * (4 if bottleneck else 1))
    cifar = build(num_classes=10, cifar_stem=True)
    assert list(cifar.state_dict()) == list(state)
    assert cifar.state_dict()["conv1.weight"].shape == (64, 3, 3, 3)


def test_resnet50_downsample_and_strides():
    model = resnet50()
    assert tuple(model.state_dict()["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # v1.5
    assert model.layer2[0].downsample[0].stride == (2, 2)
    assert resnet18().layer1[0].downsample is None  # BasicBlock: layer1 keeps stride and width


def test_forward_shapes():
    torch.manual_seed(0)
    with torch.no_grad():
        assert resnet18().eval()(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
        assert resnet18(num_classes=10, cifar_stem=True).eval()(torch.randn(3, 3, 32, 32)).shape == (3, 10)
        assert resnet50(num_classes=7).eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        resnet18(num_classes=0)


@pytest.mark.parametrize("build", [resnet18, resnet50])
def test_dynamo_export_and_capture(build):
    import onnxruntime as ort

    from intq.quantizer.capture import capture, export_torch

    torch.manual_seed(0)
    model = build(num_classes=10, cifar_stem=True).eval()
    proto = export_torch(model, (torch.randn(2, 3, 32, 32),))  # torch.onnx.export(dynamo=True), batch dynamic
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    images = torch.randn(3, 3, 32, 32)
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        want = model(images).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4 * float(np.abs(want).max()), rtol=1e-4)
    graph = capture(proto)
    ops = [n for n in graph.graph.nodes if n.op == "call_module"]
    assert ops, "capture produced no ONNX node modules"
