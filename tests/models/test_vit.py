from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from intq.models.cifar10 import load_cifar10, to_nchw
from intq.models.vit import CIFAR_VIT_PATH, VisionTransformer, ViTConfig, load_cifar_vit, load_vit_state_dict

SMALL = ViTConfig.deit_tiny(img_size=32, patch=4, num_classes=10, depth=2)


def _small_model() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(SMALL).eval()


def test_presets():
    assert (ViTConfig.deit_tiny().embed_dim, ViTConfig.deit_tiny().depth, ViTConfig.deit_tiny().heads) == (192, 12, 3)
    assert (ViTConfig.deit_small().embed_dim, ViTConfig.deit_small().heads) == (384, 6)
    assert (ViTConfig.deit_base().embed_dim, ViTConfig.deit_base().heads) == (768, 12)
    base = ViTConfig.deit_base(img_size=32, patch=4, num_classes=10)
    assert (base.img_size, base.patch, base.num_classes, base.num_patches) == (32, 4, 10, 64)
    assert ViTConfig.from_dict(base.to_dict()) == base
    # timm's deit_tiny_patch16_224 has 5,717,416 parameters.
    assert sum(p.numel() for p in VisionTransformer(ViTConfig.deit_tiny()).parameters()) == 5_717_416


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"img_size": 30}, "multiple of patch"),
        ({"heads": 5}, "divisible by heads"),
        ({"num_classes": -1}, "non-negative"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        ViTConfig.deit_tiny(**{"img_size": 32, "patch": 4, **overrides})
    with pytest.raises(ValueError, match="Unknown ViT preset"):
        ViTConfig.preset("deit_huge")


def test_parameter_names_are_timm_names():
    names = set(_small_model().state_dict())
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    expected |= {f"{m}.{p}" for m in ("norm", "head") for p in ("weight", "bias")}
    for i in range(SMALL.depth):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{m}.weight", f"blocks.{i}.{m}.bias"}
    assert names == expected
    model = _small_model()
    assert model.patch_embed.proj.kernel_size == model.patch_embed.proj.stride == (4, 4)
    assert model.blocks[0].norm1.eps == 1e-6


def test_forward_shapes_and_wrong_image_size():
    model = _small_model()
    with torch.no_grad():
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
        features = VisionTransformer(ViTConfig.deit_tiny(img_size=32, patch=4, num_classes=0, depth=1))
        assert features(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    with pytest.raises(ValueError, match=r"expects images \[B, 3, 32, 32\]"):
        model(torch.randn(1, 3, 64, 64))


def test_dynamo_export_matches_onnxruntime_at_two_batch_sizes(tmp_path):
    import onnxruntime as ort
    from torch.export import Dim

    model = _small_model()
    program = torch.onnx.export(
        model, (torch.randn(2, 3, 32, 32),), dynamo=True, dynamic_shapes=({0: Dim("batch")},), verbose=False
    )
    path = tmp_path / "vit.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32)
        got = session.run(None, {name: images.numpy()})[0]
        with torch.no_grad():
            want = model(images).numpy()
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"batch {batch}")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_state_dict_round_trip(tmp_path, suffix):
    source = _small_model()
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state, "epoch": 3}, path)  # the DeiT release wraps weights in "model"
    torch.manual_seed(1)
    target = load_vit_state_dict(VisionTransformer(SMALL).eval(), path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images), atol=0, rtol=0)


def test_load_state_dict_names_missing_and_unexpected_keys(tmp_path):
    state = dict(_small_model().state_dict())
    state.pop("head.bias")
    state["dist_token"] = torch.zeros(1, 1, 192)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"missing keys \['head.bias'\], unexpected keys \['dist_token'\]"):
        load_vit_state_dict(VisionTransformer(SMALL), path)

    good = tmp_path / "good.safetensors"
    save_file(dict(_small_model().state_dict()), str(good))
    seven_classes = VisionTransformer(ViTConfig.deit_tiny(img_size=32, patch=4, num_classes=7, depth=2))
    with pytest.raises(ValueError, match=r"wrong shape.*head.weight: checkpoint \(10, 192\) vs model \(7, 192\)"):
        load_vit_state_dict(seven_classes, good)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vit_state_dict(seven_classes, tmp_path / "absent.pth")


def test_vit_cifar_preset():
    config = ViTConfig.vit_cifar()
    assert (config.img_size, config.patch, config.num_patches, config.num_classes) == (32, 4, 64, 10)
    assert ViTConfig.preset("vit_cifar", depth=2) == ViTConfig.vit_cifar(depth=2) != config
    model = VisionTransformer(config)
    assert model.pos_embed.shape == (1, 65, config.embed_dim)  # 64 patch tokens + the class token


def test_shipped_cifar_vit_reaches_its_recorded_accuracy():
    record = json.loads(CIFAR_VIT_PATH.with_suffix(".json").read_text())
    assert CIFAR_VIT_PATH.stat().st_size < 5_000_000
    assert hashlib.sha256(CIFAR_VIT_PATH.read_bytes()).hexdigest() == record["sha256"]
    assert record["config"] == ViTConfig.vit_cifar().to_dict() and record["test_images"] == 10_000
    model = load_cifar_vit()
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    # The first 1,000 test images (100 per class).  Were they a random sample of the full set, their accuracy
    # would have standard deviation sqrt(p (1 - p) / 1000) around the full-set figure p the training recorded;
    # 4 sigma (about 6 points) is the tolerance.
    images, labels = load_cifar10("test", limit=1000)
    with torch.no_grad():
        top1 = float((model(to_nchw(images, normalize=True)).argmax(1).numpy() == labels).mean())
    p = record["test_acc"]
    sigma = math.sqrt(p * (1 - p) / 1000)
    assert abs(top1 - p) <= 4 * sigma, f"top-1 {top1:.4f} on 1,000 test images, recorded {p:.4f} on 10,000"
    assert top1 > 0.5, f"top-1 {top1:.4f}: the shipped ViT should be far above chance (10%)"
