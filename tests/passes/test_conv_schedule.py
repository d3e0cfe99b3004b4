"""The x86 schedules of ``IntConv2d`` (``passes/schedules/conv.py``) equal onnxruntime and torch bit for bit.

Every convolution a CNN or a ViT exports, compiled for an AVX2 CPU
(``znver3``) after ``ScheduleKernels``: ResNet-8's 3x3 16->16 at 32x32, its
stride-2 16->32 with TF-style pads ``(0, 0, 1, 1)`` (symbolic height and
width, odd and even), a first conv over 3 channels, depthwise 3x3 at
stride 1 and 2, DeiT's 16x16/16 patch embedding on 224x224, pointwise,
asymmetric padding with dilation (dense and grouped), channel counts that
do not fill the register tile, symbolic batch.  The integers are
adversarial for the ``vpmaddubsw`` trick: activations at -128 and 127,
weights at +-127 (pair sums at the bound).  Dense convs must take the GEMM
call rewrite and grouped ones the direct schedule; a weight holding -128 and
a CPU without AVX2 fall back to the direct schedule, still exact.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from intq.passes import compat
from intq.passes.onnx_import import import_onnx
from intq.passes.schedules import ScheduleKernels
from intq.passes.schedules.conv import SCHEDULE_NAME, VNNI_SCHEDULE_NAME, Layout, pack_conv_weight, plan_tiles
from intq.passes.schedules.gemm import Tiles
from intq.quantizer.ops.conv import IntConv2d
from intq.quantizer.ops.onnx_fn import single_op_model

TARGET = {"kind": "llvm", "mcpu": "znver3"}
VNNI = {"kind": "llvm", "mcpu": "znver4"}  # AVX-512 VNNI: vpdpbusd on the input offset by 128
HOST_HAS_VNNI = compat.tvm.target.codegen.llvm_cpu_has_features(["avx512vnni", "avx512vl"], compat.host_target())
needs_vnni = pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI to run the kernels")

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:Field 'shape' of 'type' is required:UserWarning",
        "ignore:Renaming name:UserWarning",
        "ignore:Input .* has unknown dimension shapes:UserWarning",
    ),
    pytest.mark.skipif(
        not compat.tvm.target.codegen.llvm_cpu_has_features(["avx2"], compat.host_target()),
        reason="the scheduled kernels need an AVX2 CPU to run",
    ),
]


def int8s(rng, shape, lo: int = -128) -> np.ndarray:
    """int8 in [lo, 127] with a third of the entries at the extremes lo / 127."""
    x = rng.integers(lo, 127, size=shape, endpoint=True)
    extreme = rng.random(shape) < 0.33
    x[extreme] = rng.choice([lo, 127], size=int(extreme.sum()))
    return x.astype(np.int8)


def conv_op(rng, w_shape, weight_lo: int = -127, **config) -> IntConv2d:
    """Random weights in [weight_lo, 127] (extremes included), bias, per-channel ratios from tiny to saturating
    (every third one negative)."""
    out_channels, per_group, kh, kw = w_shape
    w = int8s(rng, w_shape, weight_lo)
    w[0] = 127
    w[-1] = weight_lo
    typical = np.sqrt(per_group * kh * kw) * 128 * 127 / 2  # |acc| of random extremes, about
    ratios = np.geomspace(0.05, 40.0, out_channels) * 127 / typical * np.where(np.arange(out_channels) % 3 == 2, -1, 1)
    return IntConv2d(w, rng.integers(-(2**12), 2**12, out_channels), ratios, **config)


def with_symbols(model: onnx.ModelProto, dims: dict[int, str]) -> onnx.ModelProto:
    for i, symbol in dims.items():
        model.graph.input[0].type.tensor_type.shape.dim[i].dim_param = symbol
    return model


def compile_scheduled(model: onnx.ModelProto, target=TARGET):
    schedule = ScheduleKernels(compat.make_target(target))
    mod = schedule(import_onnx(model))
    executable = compat.build(mod, compat.make_target(target))
    return executable, compat.VirtualMachine(executable, compat.tvm.cpu(0)), schedule, mod


def assert_exact(op: IntConv2d, vm, model: onnx.ModelProto, xs: list[np.ndarray]) -> None:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for x in xs:
        got = vm["main"](compat.tvm.runtime.tensor(x)).numpy()
        want = session.run(None, {"x": x})[0]
        assert got.dtype == np.int8 and got.shape == want.shape, (got.shape, want.shape)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(op(torch.from_numpy(x)).numpy(), want)
        assert {-128, 127} <= set(np.unique(want)), "the ratios should saturate some outputs"


def kernel_schedules(mod) -> set[str]:
    """The ``intq.schedule`` attrs of the module's kernels."""
    return {
        str(f.attrs["intq.schedule"])
        for f in mod.functions.values()
        if isinstance(f, compat.tirx.PrimFunc) and f.attrs and "intq.schedule" in f.attrs
    }


# name: (w shape, config, x shapes run, symbolic dims of x)
CASES = {
    "resnet8_3x3_16_32x32": ((16, 16, 3, 3), {"padding": 1}, [(1, 16, 32, 32)], {}),
    "resnet8_3x3_s2_tf_pads": (
        (32, 16, 3, 3),
        {"stride": 2, "padding": (0, 0, 1, 1)},
        [(1, 16, 32, 32), (2, 16, 11, 9)],  # even and odd sizes: the bottom / right pad used or not
        {0: "batch", 2: "height", 3: "width"},
    ),
    "first_conv_3_channels": ((16, 3, 3, 3), {"padding": 1}, [(2, 3, 12, 12)], {0: "batch"}),
    "depthwise_3x3": ((64, 1, 3, 3), {"padding": 1, "groups": 64}, [(1, 64, 32, 32)], {}),
    "depthwise_3x3_s2": ((32, 1, 3, 3), {"stride": 2, "padding": (0, 0, 1, 1), "groups": 32}, [(2, 32, 16, 16)], {}),
    "deit_patch16_224": ((192, 3, 16, 16), {"stride": 16}, [(1, 3, 224, 224)], {}),
    "pointwise_20_channels": ((20, 24, 1, 1), {}, [(3, 24, 7, 5)], {0: "batch"}),
    "asymmetric_dilated_dense": (
        (12, 8, 3, 3),
        {"stride": (1, 2), "padding": (2, 1, 0, 3), "dilation": (2, 3)},
        [(1, 8, 12, 12), (2, 8, 12, 12)],
        {0: "batch"},
    ),
    "asymmetric_dilated_grouped": (
        (12, 2, 3, 3),
        {"stride": (1, 2), "padding": (2, 1, 0, 3), "dilation": (2, 3), "groups": 4},
        [(1, 8, 12, 12)],
        {},
    ),
}


@pytest.mark.parametrize(
    ("target", "gemm_schedule"),
    [(TARGET, SCHEDULE_NAME), pytest.param(VNNI, VNNI_SCHEDULE_NAME, marks=needs_vnni, id="vnni")],
)
@pytest.mark.parametrize("case", list(CASES))
def test_scheduled_conv_equals_onnxruntime(case, target, gemm_schedule):
    w_shape, config, shapes, dims = CASES[case]
    rng = np.random.default_rng(len(case))
    op = conv_op(rng, w_shape, **config)
    model = with_symbols(single_op_model(op, [np.zeros(shapes[0], np.int8)]), dims)
    _, vm, schedule, mod = compile_scheduled(model, target)
    assert schedule.scheduled == {"intq_conv2d": "conv"}
    grouped = config.get("groups", 1) > 1
    assert kernel_schedules(mod) == ({"schedule_direct"} if grouped else {gemm_schedule})
    if grouped:
        assert schedule.skipped["intq_conv2d"].startswith("a grouped convolution")
    assert_exact(op, vm, model, [int8s(rng, shape) for shape in shapes])


def test_weight_with_minus_128_falls_back_to_the_direct_schedule_and_is_exact():
    rng = np.random.default_rng(3)
    op = conv_op(rng, (16, 16, 3, 3), weight_lo=-128, padding=1)
    model = single_op_model(op, [np.zeros((1, 16, 10, 10), np.int8)])
    _, vm, schedule, mod = compile_scheduled(model)
    assert "holds -128" in schedule.skipped["intq_conv2d"]
    assert kernel_schedules(mod) == {"schedule_direct"}
    assert_exact(op, vm, model, [int8s(rng, (1, 16, 10, 10))])


@needs_vnni
def test_vnni_takes_minus_128_weights_and_uses_vpdpbusd():
    """vpdpbusd multiplies u8 x s8 exactly for every int8 weight; the padded input holds 0 + 128."""
    rng = np.random.default_rng(3)
    op = conv_op(rng, (16, 16, 3, 3), weight_lo=-128, padding=1)
    model = single_op_model(op, [np.zeros((1, 16, 10, 10), np.int8)])
    executable, vm, schedule, mod = compile_scheduled(model, VNNI)
    assert kernel_schedules(mod) == {VNNI_SCHEDULE_NAME}
    asm = executable.mod.imports[0].inspect_source("asm")
    assert "vpdpbusd" in asm and "vpmaddubsw" not in asm
    assert_exact(op, vm, model, [int8s(rng, (1, 16, 10, 10)), np.full((1, 16, 10, 10), -128, np.int8)])


def test_cpu_without_avx2_gets_the_direct_schedule():
    rng = np.random.default_rng(4)
    op = conv_op(rng, (16, 16, 3, 3), padding=1)
    model = single_op_model(op, [np.zeros((1, 16, 8, 8), np.int8)])
    _, vm, schedule, mod = compile_scheduled(model, {"kind": "llvm", "mcpu": "x86-64"})
    assert "has no AVX2" in schedule.skipped["intq_conv2d"]
    assert kernel_schedules(mod) == {"schedule_direct"}
    assert_exact(op, vm, model, [int8s(rng, (1, 16, 8, 8))])


def test_assembly_uses_the_avx2_int8_dot():
    op = conv_op(np.random.default_rng(5), (16, 16, 3, 3), padding=1)
    executable, *_ = compile_scheduled(single_op_model(op, [np.zeros((1, 16, 8, 8), np.int8)]))
    asm = executable.mod.imports[0].inspect_source("asm") if executable.mod.imports else ""
    assert re.search(r"vpmaddubsw", asm) and re.search(r"vpsignb", asm)


# --- the plan -----------------------------------------------------------------------------------------


def test_layout_pads_the_reduction_least():
    assert Layout.choose(16, 3, 3, 1) == Layout("ijc", (3, 3, 16))  # 144 products, cij would pad kw to 192
    assert Layout.choose(3, 16, 16, 1) == Layout("cij", (3, 16, 16))  # 768, ijc would pad C to 1024
    assert Layout.choose(3, 3, 3, 1).order == "cij"  # a tie (36): the columns are contiguous in x
    assert Layout.choose(3, 3, 3, 2).order == "ijc"  # dilated columns are not contiguous


def test_tiles_fit_the_output_channels():
    assert plan_tiles(16) == Tiles(rows=6, col_blocks=2)
    assert plan_tiles(192) == Tiles(rows=2, col_blocks=6)
    assert plan_tiles(32) == Tiles(rows=3, col_blocks=4)
    assert plan_tiles(20) == Tiles(rows=4, col_blocks=3)
    assert plan_tiles(16, accumulators=24) == Tiles(rows=12, col_blocks=2)  # AVX-512: 32 registers
    assert plan_tiles(192, accumulators=24) == Tiles(rows=4, col_blocks=6)


def test_packed_weight_layout():
    w = np.arange(20 * 3 * 3 * 3).reshape(20, 3, 3, 3).astype(np.int8)
    layout, tiles = Layout.choose(3, 3, 3, 1), Tiles(rows=4, col_blocks=3)
    packed = pack_conv_weight(w, layout, tiles)
    assert packed.shape == (3, 3, 3, 1, 8, 4)  # blocks of 8 channels (3 = 24 / 8), c, i, j-groups of 4
    assert packed[1, 2, 0, 0, 3, 1] == w[11, 2, 0, 1]
    assert (packed[2, :, :, :, 4:] == 0).all() and (packed[..., 3] == 0).all()  # channels 20..23, column 3
