"""CNNs quantized by ``intq.quantize`` at 8 and 4 bits: the TVM artifact equals onnxruntime and torch bit for bit.

A small CNN with every CNN pattern the quantizer converts (conv-BN-ReLU with
the ReLU fused as the clamp, a TF-style ``Pad -> Conv`` at stride 2, a
residual add with its ReLU (``IntAdd_c0x127``), a max pool, global average
pooling as a depthwise conv and a linear head), and the MLPerf Tiny ResNet-8
with its reference weights on CIFAR-10 images.  At 4 bits (W4A4, first and
last layers at 8) the ONNX file holds packed INT4 weights and 4-bit clamp
ranges (``_c0x15``), so the compiled module runs ``UnpackInt4`` and the
ranged kernels.  Compiled once per model for an AVX2 CPU through
``compile_onnx`` (fusions, the conv GEMM and direct schedules), with a
symbolic batch that runs at two sizes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import intq
from intq.config import QuantConfig
from intq.passes import compat
from intq.passes.onnx_import import import_onnx
from intq.passes.pipeline import compile_onnx
from intq.passes.schedules import ScheduleKernels
from intq.passes.schedules.conv import SCHEDULE_NAME, VNNI_SCHEDULE_NAME

TARGET = {"kind": "llvm", "mcpu": "znver3"}

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(
        not compat.tvm.target.codegen.llvm_cpu_has_features(["avx2"], compat.host_target()),
        reason="the scheduled kernels need an AVX2 CPU to run",
    ),
]


def conv_bn_relu(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyCNN(nn.Module):
    """stem conv-BN-ReLU; TF-same pad + stride-2 conv; a residual block with ReLU; max pool; pool + linear head."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.down = conv_bn_relu(8, 16, stride=2, padding=0)
        self.block = nn.Sequential(conv_bn_relu(16, 16), nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(F.pad(self.stem(x), (0, 1, 0, 1)))
        x = self.pool(torch.relu(x + self.block(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # BN statistics a trained net has
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    return model


def check(qmodel, inputs: list[torch.Tensor], target=TARGET) -> onnx.ModelProto:
    """Compile ``qmodel``'s integer ONNX once; each input gives onnxruntime's and the emulation's output exactly."""
    int_model = qmodel.to_onnx()
    compiled = compile_onnx(int_model, target)
    vm = compat.VirtualMachine(compiled.executable, compat.tvm.cpu(0))
    session = ort.InferenceSession(int_model.SerializeToString(), providers=["CPUExecutionProvider"])
    for x in inputs:
        got = vm["main"](compat.tvm.runtime.tensor(x.numpy())).numpy()
        want = session.run(None, {compiled.input_names[0]: x.numpy()})[0]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, qmodel(x).numpy())
    return int_model


def assert_convs_scheduled(int_model: onnx.ModelProto, target=TARGET) -> None:
    """Every dense conv takes the GEMM rewrite; the grouped ones (the average pools) the direct schedule."""
    schedule = ScheduleKernels(compat.make_target(target))
    mod = schedule(import_onnx(int_model))
    convs = [n.op_type for n in int_model.graph.node if n.op_type.startswith("IntConv2d")]
    dense = [op for op in convs if "_g1_" in op or op.endswith("_g1")]
    kernels = [f for f in mod.functions.values() if isinstance(f, compat.tirx.PrimFunc) and f.attrs]
    gemm = [f for f in kernels if str(f.attrs.get("intq.schedule", "")) in (SCHEDULE_NAME, VNNI_SCHEDULE_NAME)]
    direct = [f for f in kernels if str(f.attrs.get("intq.schedule", "")) == "schedule_direct"]
    assert dense and len(gemm) >= len(set(dense)), (convs, schedule.skipped)
    assert len(direct) >= len(set(convs) - set(dense)), (convs, schedule.skipped)
    assert not any("weight" in reason for reason in schedule.skipped.values()), schedule.skipped


def assert_narrow(int_model: onnx.ModelProto, bits: int) -> None:
    ops = [n.op_type for n in int_model.graph.node]
    int4 = [t for t in int_model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert any(op.endswith("_c0x127") for op in ops), ops  # fused ReLUs
    if bits == 4:
        assert int4 and any(op.endswith("_c0x15") for op in ops), ops
    else:
        assert not int4 and not any(op.endswith("_c0x15") for op in ops), ops


@pytest.mark.parametrize("bits", [8, 4])
def test_tiny_cnn(bits):
    model = tiny_cnn()
    gen = torch.Generator().manual_seed(bits)
    calib = [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(2)]
    qmodel = intq.quantize(model, calib, QuantConfig(bits=bits), progress=False)
    int_model = check(qmodel, [torch.randn(b, 3, 16, 16, generator=gen) for b in (1, 3)])
    assert_narrow(int_model, bits)
    assert "MaxPool" in [n.op_type for n in int_model.graph.node]
    assert_convs_scheduled(int_model)


@pytest.fixture(scope="module")
def resnet8_and_images():
    from intq.models.cifar10 import load_cifar10, to_nchw
    from intq.models.resnet8 import load_resnet8

    images, _ = load_cifar10("test", limit=40)
    return load_resnet8(), to_nchw(images)


@pytest.mark.parametrize("target", [TARGET, "x86"], ids=["znver3", "host"])  # host: VNNI convs where it has them
@pytest.mark.parametrize("bits", [8, 4])
def test_resnet8(resnet8_and_images, bits, target):
    model, images = resnet8_and_images
    qmodel = intq.quantize(model, [images[:16], images[16:32]], QuantConfig(bits=bits), progress=False)
    int_model = check(qmodel, [images[32:33], images[33:40]], target)
    assert_narrow(int_model, bits)
    assert_convs_scheduled(int_model, compat.host_target() if target == "x86" else target)


@pytest.mark.parametrize("bits", [8, 4])
def test_resnet18(resnet8_and_images, bits):
    """ResNet-18 (torchvision names, CIFAR stem; BasicBlocks with 1x1 stride-2 shortcuts), random weights."""
    from intq.models.resnet import resnet18

    torch.manual_seed(18)
    model = resnet18(num_classes=10, cifar_stem=True).eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # statistics a trained net has
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.0)
        bn.bias.data.uniform_(-0.2, 0.2)
    _, images = resnet8_and_images
    images = (images / 255 - 0.5) / 0.25
    qmodel = intq.quantize(model, [images[:8]], QuantConfig(bits=bits), progress=False)
    int_model = check(qmodel, [images[32:33], images[33:35]])
    assert_narrow(int_model, bits)
    assert sum(op.startswith("IntConv2d") for op in (n.op_type for n in int_model.graph.node)) >= 20
