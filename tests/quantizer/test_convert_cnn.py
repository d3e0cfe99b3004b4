"""Integer-only CNNs at 8 and 4 bits: torch emulation == onnxruntime bit for bit.

Each small network is built here from torch layers (the patterns of
ResNet, MobileNet and the MLPerf Tiny models), quantized with
``intq.quantize`` at ``bits=8`` and ``bits=4`` (W4A4, first and last
weighted layers at 8), and checked for: identical integers from
``QuantizedModel.integer_forward`` and onnxruntime on the exported file (at
a batch size calibration never saw), the integer-only verifier, the integer
ops chosen (fused clamps, HAWQV3 residual adds, packed 4-bit weights, 4-bit
activation ranges), and a float error in line with the widths.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import intq
from intq.config import QuantConfig
from intq.export.verify import verify_integer_only

HW = 16


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.head(F.relu(self.bn2(self.conv2(x))))


class TfSameStride2(nn.Module):
    """Keras ``padding="same"`` with stride 2: one extra row and column at the bottom/right, then a valid conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 16, 3, stride=2)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        return self.head(F.relu(self.down(F.pad(x, (0, 1, 0, 1)))))


class DepthwiseRelu6(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu6(self.conv1(x))
        x = F.relu6(self.dw(x))
        return self.head(F.relu6(self.pw(x)))


class MaxPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return self.head(F.max_pool2d(F.relu(self.conv2(x)), 3, stride=2, padding=1))


class AvgPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
        x = self.conv2(x)  # signed: the pooled value keeps the signed range
        return self.head(F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=True))


class GlobalPoolHead(nn.Module):
    def __init__(self, mean: bool = False):
        super().__init__()
        self.mean = mean
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = x.mean((2, 3)) if self.mean else torch.flatten(self.pool(x), 1)
        return self.fc(x)


class Residual(nn.Module):
    """ResNet's basic block: ``relu(x + bn(conv(relu(bn(conv(x))))))``."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.head(F.relu(x + y))


class Concat(nn.Module):
    """Two branches of different ranges (a ReLU one and a signed one) concatenated on channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a, self.b = nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.mix, self.head = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.head(F.relu(self.mix(torch.cat([F.relu(self.a(x)), self.b(x)], dim=1))))


class SharedPreActivation(nn.Module):
    """A conv output read by a ReLU and by an add: the ReLU cannot fuse (an int8 ``Clip``), the add has no ReLU
    after it (the int16 stream, requantized for the head)."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.head = (
            nn.Conv2d(3, 16, 3, padding=1),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.Conv2d(16, 4, 1),
        )

    def forward(self, x):
        y = self.conv(F.relu(self.stem(x)))
        return self.head(F.relu(y) + y)


NETS = {
    "conv_bn_relu": ConvBnRelu,
    "tf_same_stride2": TfSameStride2,
    "depthwise_relu6": DepthwiseRelu6,
    "maxpool": MaxPool,
    "avgpool": AvgPool,
    "global_pool_head": GlobalPoolHead,
    "mean_head": functools.partial(GlobalPoolHead, mean=True),
    "residual": Residual,
    "concat": Concat,
    "shared_pre_activation": SharedPreActivation,
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    net = NETS[name]().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so that folding them matters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net


@functools.cache
def quantized(name: str, bits: int):
    """``(float net, QuantizedModel, a test batch)``; calibrated on 4 batches of 4 random images."""
    net = build(name)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, HW, HW, generator=gen) for _ in range(4)]
    qmodel = intq.quantize(net, calib, QuantConfig(bits=bits), progress=False)
    return net, qmodel, torch.randn(3, 3, HW, HW, generator=gen)


def sqnr(net, qmodel, x) -> float:
    with torch.no_grad():
        ref = net(x).double()
    got = qmodel(x).double()
    return float(10 * torch.log10((ref**2).sum() / ((ref - got) ** 2).sum()))


def ort_integers(qmodel, x) -> np.ndarray:
    model = qmodel.to_onnx(integer_outputs=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {qmodel.input_names[0]: x.numpy()})[0]


# Float error bounds: SQNR of the dequantized output against the float model, in dB.  One quantization of a
# zero-mean Gaussian value (variance v) clipped at c ~= 3.9 sqrt(v) (percentile 99.99 of |x|) onto q = 2**(b-1) - 1
# steps per side adds noise (c / q)**2 / 12: SQNR = 10 log10(12 q**2 / 3.9**2) = 41 dB at 8 bits, 16 dB at 4; a
# ReLU output on the unsigned [0, q'] keeps half the power but q' = 15 at 4 bits: 38 dB / 19 dB.  Per-channel
# weights clip at their own max (~2.9 sigma over 144 values): 44 dB / 18 dB.  Independent noises add, so an
# 8-bit net with ~6 quantization points is near 31 dB (bound 28).  At 4 bits the middle layer's 4-bit weights
# and input alone cost ~16 dB (bound 12).  Measured with these seeds: 36-48 dB at 8 bits, 22-34 dB at 4 bits.
SQNR_MIN = {8: 28.0, 4: 12.0}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", sorted(NETS))
def test_torch_equals_onnxruntime_and_tracks_float(name, bits):
    net, qmodel, x = quantized(name, bits)
    verify_integer_only(qmodel.to_onnx())
    ints = qmodel.integer_forward(x)[0].numpy()
    got = ort_integers(qmodel, x)
    assert got.dtype == ints.dtype
    np.testing.assert_array_equal(got, ints)
    db = sqnr(net, qmodel, x)
    assert db > SQNR_MIN[bits], f"{name} at {bits} bits: SQNR {db:.1f} dB"


# 4-bit layers whose input is also read by a path to an 8-bit layer, and so stays 8-bit (the widest consumer wins):
# the residual block's first conv shares its input with the skip connection, which reaches the 8-bit head.
EIGHT_BIT_INPUTS = {"residual": 1}


def producer_range(qmodel, node) -> tuple[int, int]:
    """The integer range of ``node``'s input: the nearest recorded layer upstream (through MaxPool, Reshape, ...)."""
    records = {r.name: r for r in qmodel.layers}
    src = node.args[0]
    while src.target not in records:
        src = src.args[0]
    return records[src.target].out_range


@pytest.mark.parametrize("name", sorted(NETS))
def test_four_bit_layers_have_four_bit_weights_and_inputs(name):
    _, qmodel, _ = quantized(name, 4)
    gm = qmodel.graph_module
    widths = gm.meta["layer_bits"]  # the weighted layers in graph order
    names = list(widths)
    assert widths[names[0]] == widths[names[-1]] == 8 and all(widths[n] == 4 for n in names[1:-1]), widths
    records = {r.name: r for r in qmodel.layers}
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    eight_bit_inputs = 0
    for layer, bits in widths.items():
        op = gm.get_submodule(layer)
        assert records[layer].bits == bits and op.packed_int4 == (frozenset({"w"}) if bits == 4 else frozenset())
        if bits == 4:
            assert int(op.w.abs().max()) <= 7
            in_range = producer_range(qmodel, nodes[layer])
            assert in_range in ((-8, 7), (0, 15), (-128, 127), (0, 127)), in_range
            eight_bit_inputs += in_range[1] > 15
    assert eight_bit_inputs == EIGHT_BIT_INPUTS.get(name, 0)
    int4 = [t.name for t in qmodel.to_onnx().graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert sorted(int4) == sorted(f"{n}.w.int4" for n in names[1:-1])


def test_relus_fuse_into_their_producers():
    _, qmodel, _ = quantized("conv_bn_relu", 8)
    ranges = [r.out_range for r in qmodel.layers if r.op == "IntConv2d"]
    assert ranges == [(0, 127), (0, 127), (-128, 127)]  # BN folded, ReLU fused: unsigned [0, 127] at 8 bits
    assert not [r for r in qmodel.layers if r.op in ("Clip", "Requantize")]
    _, qmodel4, _ = quantized("conv_bn_relu", 4)
    assert [r.out_range for r in qmodel4.layers if r.op == "IntConv2d"] == [(0, 15), (0, 127), (-128, 127)]


def test_relu6_clamps_at_six():
    _, qmodel, x = quantized("depthwise_relu6", 8)
    convs = [r for r in qmodel.layers if r.op == "IntConv2d"]
    for rec in convs[:-1]:
        lo, hi = rec.out_range
        assert lo == 0 and rec.out_scale * hi <= 6.0 + 1e-6  # the calibrated clip never passes 6


def test_residual_add_with_relu_is_an_int8_hawq_add():
    _, qmodel, _ = quantized("residual", 8)
    adds = [r for r in qmodel.layers if r.op == "IntAdd"]
    assert [(a.bits, a.out_range) for a in adds] == [(8, (0, 127))]
    ops = {type(m).__name__: m for m in qmodel.graph_module.modules()}
    assert ops["IntAdd"].op_type == "IntAdd_c0x127" and ops["IntAdd"].output_dtype == torch.int8


def test_unfused_relu_is_an_int8_clip_and_a_plain_add_feeds_the_int16_stream():
    for bits in (8, 4):  # the conv's value reaches the 8-bit head through the add: 8 bits at both widths
        _, qmodel, _ = quantized("shared_pre_activation", bits)
        by_op = {}
        for r in qmodel.layers:
            by_op.setdefault(r.op, []).append(r)
        assert [r.out_range for r in by_op["Clip"]] == [(0, 127)]  # the signed [-128, 127] clamped at 0
        assert [(r.bits, r.out_range) for r in by_op["IntAdd"]] == [(16, (-32768, 32767))]
        assert len(by_op["Requantize"]) == 1  # int16 -> the head's int8 input
    clips = [n for n in qmodel.to_onnx().graph.node if n.op_type == "Clip"]
    assert len(clips) == 1


def test_first_layer_at_four_bits_clips_the_quantized_input():
    net = build("conv_bn_relu")
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, HW, HW, generator=gen) for _ in range(2)]
    qmodel = intq.quantize(net, calib, QuantConfig(bits=4, first_last_bits=4), progress=False)
    x = torch.randn(2, 3, HW, HW, generator=gen) * 3  # beyond the calibrated range: the Clip saturates
    ints = qmodel.integer_forward(x)[0].numpy()
    np.testing.assert_array_equal(ort_integers(qmodel, x), ints)
    quant = next(r for r in qmodel.layers if r.op == "Quantize")
    assert quant.out_range == (-8, 7) and quant.bits == 4
    assert [r.out_range for r in qmodel.layers if r.op == "Clip"] == [(-8, 7)]
    assert set(qmodel.graph_module.meta["layer_bits"].values()) == {4}


def test_layer_bits_picks_single_layers():
    net = build("conv_bn_relu")
    calib = [torch.randn(4, 3, HW, HW, generator=torch.Generator().manual_seed(1))]
    probe = intq.quantize(net, calib, progress=False)
    sources = [r.source for r in probe.layers if r.op == "IntConv2d"]
    qmodel = intq.quantize(net, calib, QuantConfig(layer_bits={sources[1]: 4}), progress=False)
    assert [r.bits for r in qmodel.layers if r.op == "IntConv2d"] == [8, 4, 8]
    assert [r.out_range for r in qmodel.layers if r.op == "IntConv2d"] == [(0, 15), (0, 127), (-128, 127)]
    x = torch.randn(2, 3, HW, HW)
    np.testing.assert_array_equal(ort_integers(qmodel, x), qmodel.integer_forward(x)[0].numpy())


def test_concat_requantizes_branches_to_one_scale():
    _, qmodel, _ = quantized("concat", 4)
    rqs = [r for r in qmodel.layers if r.op == "Requantize"]
    cat_scale = {r.out_scale for r in rqs}
    assert len(rqs) >= 1 and len(cat_scale) == 1
    # the concat feeds a 4-bit conv; one branch is signed, so the concat is signed 4-bit
    assert all(r.out_range == (-8, 7) for r in rqs), [r.out_range for r in rqs]


def test_four_bit_model_file_is_about_half():
    """Weights dominate this net, so packing the middle layers' weights two per byte about halves the file."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 4, 1),
    ).eval()
    calib = [torch.randn(2, 3, 6, 6)]
    files = {bits: intq.quantize(net, calib, QuantConfig(bits=bits), progress=False).to_onnx() for bits in (8, 4)}
    packed = [t for t in files[4].graph.initializer if t.data_type == onnx.TensorProto.INT4]
    middle = 64 * 256 * 9 + 256 * 256 * 9  # the two 4-bit layers' weights (737280)
    assert sum(len(t.raw_data) for t in packed) == middle // 2
    sizes = {bits: len(model.SerializeToString()) for bits, model in files.items()}
    # the rest (first and last layers, biases, multipliers, one more function for the 4-bit clamp range) is ~4%
    assert sizes[4] / sizes[8] < 0.55, sizes


def test_clips_override_the_calibrated_clip():
    """QAT hands learned clips to ``convert`` by fx node name; the integer model uses them."""
    from intq.quantizer.convert import convert

    _, qmodel, _ = quantized("conv_bn_relu", 8)
    gm, observers = qmodel.float_graph, qmodel.observers
    sites = qmodel.graph_module.meta["quant_sites"]
    site = next(name for name, s in sites.items() if s["qmin"] == 0)
    _, layers, _ = convert(gm, observers, qmodel.config, clips={site: 3.0})
    changed = [r for r in layers if r.out_scale is not None and np.isclose(np.asarray(r.out_scale), 3.0 / 127).all()]
    assert len(changed) == 1
    assert "observers" not in dict(qmodel.named_modules()) and "observers" not in qmodel.state_dict()


def test_unknown_layer_bits_name_is_refused():
    net = build("conv_bn_relu")
    with pytest.raises(ValueError, match=r"layer_bits names \['nope'\] are not weighted layers of this model"):
        intq.quantize(net, [torch.randn(2, 3, HW, HW)], QuantConfig(layer_bits={"nope": 4}), progress=False)


def test_average_pool_not_counting_padding_is_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return F.avg_pool2d(self.conv(x), 3, stride=1, padding=1, count_include_pad=False)

    with pytest.raises(ValueError, match=r"AveragePool \(count_include_pad=0 with padding"):
        intq.quantize(Net().eval(), [torch.randn(2, 3, HW, HW)], progress=False)


# ResNet-8 (MLPerf Tiny) has ~12 quantization points: at 8 bits ~41 - 10 log10(12) = 30 dB by the estimate above
# (bound 25); at 4 bits eight layers of ~16 dB each give ~7 dB (bound 5).  Post-training only, on random images;
# QAT recovers the 4-bit accuracy.  Measured: 33.4 dB and 9.3 dB.
RESNET8_SQNR_MIN = {8: 25.0, 4: 5.0}


@pytest.mark.parametrize("bits", [8, 4])
def test_resnet8_is_bit_exact(bits):
    from intq.models.resnet8 import load_resnet8

    net = load_resnet8()
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 256, (4, 3, 32, 32), generator=gen).float() for _ in range(2)]
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=gen).float()
    qmodel = intq.quantize(net, calib, QuantConfig(bits=bits), progress=False)
    verify_integer_only(qmodel.to_onnx())
    np.testing.assert_array_equal(ort_integers(qmodel, x), qmodel.integer_forward(x)[0].numpy())
    ops = [r.op for r in qmodel.layers]
    assert ops.count("IntConv2d") == 9 + 1 and ops.count("IntAdd") == 3  # 9 convs + the average pool, 3 residuals
    assert all(r.out_range[0] == 0 for r in qmodel.layers if r.op == "IntAdd")  # ReLU fused into each add
    assert sorted(set(qmodel.graph_module.meta["layer_bits"].values())) == sorted({8, bits})
    db = sqnr(net, qmodel, x)
    assert db > RESNET8_SQNR_MIN[bits], f"ResNet-8 at {bits} bits: SQNR {db:.1f} dB"
