"""IntConv2d: torch == onnxruntime bit for bit, against a numpy convolution and the float reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from intq.quantizer.ops.conv import IntConv2d
from intq.quantizer.ops.onnx_fn import single_op_model

INT8 = st.integers(-128, 127)


def run_both(op, inputs: list[np.ndarray]) -> np.ndarray:
    """Run ``op`` in torch and in onnxruntime; assert they agree bit for bit; return the result."""
    model = single_op_model(op, inputs)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(inferred, full_check=True)  # the inferred output shape satisfies the checker
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, dict(zip(op.data_inputs, inputs, strict=True)))[0]
    want = op(*[torch.from_numpy(a) for a in inputs]).numpy()
    assert got.dtype == want.dtype == np.int8
    np.testing.assert_array_equal(got, want)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert tuple(d.dim_value for d in dims) == want.shape
    return got


def numpy_conv(x, w, b, stride=(1, 1), pads=(0, 0, 0, 0), dilation=(1, 1), groups=1) -> np.ndarray:
    """Exact int64 grouped convolution, written from the definition (no torch)."""
    top, left, bottom, right = pads
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    batch, channels, height, width = xp.shape
    out_channels, per_group, kh, kw = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    out_h = (height - dh * (kh - 1) - 1) // sh + 1
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    wg = w.astype(np.int64).reshape(groups, out_channels // groups, per_group, kh, kw)
    out = np.zeros((batch, groups, out_channels // groups, out_h, out_w), np.int64)
    for i in range(kh):
        for j in range(kw):
            window = xp[:, :, i * dh : i * dh + sh * (out_h - 1) + 1 : sh, j * dw : j * dw + sw * (out_w - 1) + 1 : sw]
            window = window.reshape(batch, groups, per_group, out_h, out_w)
            out += np.einsum("ngchw,goc->ngohw", window, wg[:, :, :, i, j])
    return out.reshape(batch, out_channels, out_h, out_w) + b.astype(np.int64).reshape(-1, 1, 1)


def as_pair(v) -> tuple[int, int]:
    return (v, v) if np.ndim(v) == 0 else tuple(v)


def round_clip(v: np.ndarray) -> np.ndarray:
    """Round half up (towards +inf), then saturate to int8."""
    return np.clip(np.floor(v + 0.5), -128, 127)


def dyadic_ratios(n: int, exponent: int) -> np.ndarray:
    """Ratios with few mantissa bits: dyadic holds them exactly, so ``acc * r`` is the exact target."""
    return (2 * np.arange(n, dtype=np.float64) + 1) * 2.0**exponent


# --- (a) bit-exact ------------------------------------------------------------------------------

# (name, x shape, w shape, stride, padding as given, padding as (t, l, b, r), dilation, groups)
CONFIGS = [
    ("3x3", (2, 4, 9, 10), (6, 4, 3, 3), 1, 1, (1, 1, 1, 1), 1, 1),
    ("3x3_stride2_asym", (1, 4, 11, 9), (5, 4, 3, 3), 2, (0, 0, 1, 1), (0, 0, 1, 1), 1, 1),
    ("patch16", (1, 3, 32, 48), (8, 3, 16, 16), 16, 0, (0, 0, 0, 0), 1, 1),
    ("grouped", (2, 8, 7, 7), (12, 2, 3, 3), (1, 2), (1, 2), (1, 2, 1, 2), 1, 4),
    ("depthwise", (1, 6, 8, 8), (6, 1, 3, 3), 1, 1, (1, 1, 1, 1), 1, 6),
    ("dilated", (1, 3, 12, 12), (4, 3, 3, 3), 1, (2, 1, 0, 3), (2, 1, 0, 3), (2, 3), 1),
    ("pointwise", (2, 16, 5, 5), (7, 16, 1, 1), 1, 0, (0, 0, 0, 0), 1, 1),
]
FILLS = {"random": None, "all_min": (-128, -128), "min_max": (-128, 127), "max_min": (127, -128), "all_max": (127, 127)}


@pytest.mark.parametrize("fill", sorted(FILLS))
@pytest.mark.parametrize(
    ("x_shape", "w_shape", "stride", "padding", "pads", "dilation", "groups"),
    [c[1:] for c in CONFIGS],
    ids=[c[0] for c in CONFIGS],
)
def test_exact(x_shape, w_shape, stride, padding, pads, dilation, groups, fill):
    rng = np.random.default_rng(0)
    if FILLS[fill] is None:
        x = rng.integers(-128, 128, x_shape).astype(np.int8)
        w = rng.integers(-128, 128, w_shape).astype(np.int8)
    else:
        x = np.full(x_shape, FILLS[fill][0], np.int8)
        w = np.full(w_shape, FILLS[fill][1], np.int8)
    out_channels = w_shape[0]
    b = rng.integers(-(2**20), 2**20, out_channels).astype(np.int32)
    ratio = dyadic_ratios(out_channels, exponent=-16)
    op = IntConv2d(w, b, ratio, stride=stride, padding=padding, dilation=dilation, groups=groups)
    acc = numpy_conv(x, w, b, as_pair(stride), pads, as_pair(dilation), groups)
    np.testing.assert_array_equal(run_both(op, [x]), round_clip(acc * ratio.reshape(-1, 1, 1)))


def test_padding_means_zero():
    """An all -128 input: padded cells must count as 0, not as -128 (nor as the uint8 zero point)."""
    x = np.full((1, 1, 2, 2), -128, np.int8)
    w = np.ones((1, 1, 3, 3), np.int8)
    got = run_both(IntConv2d(w, None, 2.0**-9, padding=1), [x])
    # Every 3x3 window over the padded 4x4 input covers all four real cells: -512 / 512 = -1.
    np.testing.assert_array_equal(got, np.full((1, 1, 2, 2), -1))


def test_negative_and_zero_ratios_saturate():
    x = np.full((1, 2, 4, 4), 127, np.int8)
    w = np.full((3, 2, 2, 2), 127, np.int8)
    got = run_both(IntConv2d(w, None, np.array([-1.0, 0.0, 1.0])), [x])
    np.testing.assert_array_equal(got[0, :, 0, 0], [-128, 0, 127])


def test_function_named_per_configuration():
    w = np.ones((4, 2, 3, 3), np.int8)
    op = IntConv2d(w, None, 0.1, stride=2, padding=(0, 0, 1, 1), groups=2)
    assert op.op_type == "IntConv2d_s2x2_p0x0x1x1_d1x1_g2"
    assert op.function_proto().name == op.op_type
    assert IntConv2d(w, None, 0.1).op_type == "IntConv2d_s1x1_p0x0x0x0_d1x1_g1"


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_random_configs_torch_matches_onnxruntime(data):
    groups = data.draw(st.sampled_from([1, 2, 3]), label="groups")
    per_group = data.draw(st.integers(1, 3), label="C/groups")
    out_channels = groups * data.draw(st.integers(1, 3), label="O/groups")
    kh, kw = data.draw(st.integers(1, 4), label="kh"), data.draw(st.integers(1, 4), label="kw")
    stride = data.draw(st.tuples(st.integers(1, 3), st.integers(1, 3)), label="stride")
    dilation = data.draw(st.tuples(st.integers(1, 2), st.integers(1, 2)), label="dilation")
    pads = data.draw(st.tuples(*[st.integers(0, 2)] * 4), label="pads")
    height = dilation[0] * (kh - 1) + 1 + data.draw(st.integers(0, 6), label="extra_h")
    width = dilation[1] * (kw - 1) + 1 + data.draw(st.integers(0, 6), label="extra_w")
    x = data.draw(hnp.arrays(np.int8, (1, groups * per_group, height, width), elements=INT8), label="x")
    w = data.draw(hnp.arrays(np.int8, (out_channels, per_group, kh, kw), elements=INT8), label="w")
    ratio = data.draw(hnp.arrays(np.float64, (out_channels,), elements=st.floats(1e-5, 0.1)), label="ratio")
    op = IntConv2d(w, None, ratio, stride=stride, padding=pads, dilation=dilation, groups=groups)
    run_both(op, [x])


# --- (b) property against the float reference ---------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_close_to_float_reference(data):
    """``|y - clip(acc * r)| <= 1/2 + |acc * r| * 2**-24``, ``acc`` from the numpy convolution."""
    groups = data.draw(st.sampled_from([1, 2]), label="groups")
    channels, out_channels = 2 * groups, 3 * groups
    k = data.draw(st.integers(1, 3), label="k")
    stride = data.draw(st.integers(1, 2), label="stride")
    pads = data.draw(st.tuples(*[st.integers(0, 1)] * 4), label="pads")
    x = data.draw(hnp.arrays(np.int8, (1, channels, 6, 6), elements=INT8), label="x")
    w = data.draw(hnp.arrays(np.int8, (out_channels, 2, k, k), elements=INT8), label="w")
    b = data.draw(hnp.arrays(np.int32, (out_channels,), elements=st.integers(-(2**16), 2**16)), label="b")
    log2 = data.draw(hnp.arrays(np.float64, (out_channels,), elements=st.floats(-16, 0)), label="log2|r|")
    ratio = np.exp2(log2) * data.draw(st.sampled_from([-1.0, 1.0]), label="sign")
    op = IntConv2d(w, b, ratio, stride=stride, padding=pads, groups=groups)
    y = op(torch.from_numpy(x)).numpy().astype(np.float64)
    v = numpy_conv(x, w, b, (stride, stride), pads, (1, 1), groups) * ratio.reshape(-1, 1, 1)
    err = np.abs(y - np.clip(v, -128, 127))
    bound = 0.5 + np.abs(v) * 2.0**-24 + 1e-9
    assert np.all(err <= bound), f"max excess {np.max(err - bound)}"


# --- (c) refusals -------------------------------------------------------------------------------


def test_refuses_k_past_int32_accumulator():
    # 512 channels of a 16x16 kernel: K = 131072, and K * 128 * 128 = 2**31.
    w = np.zeros((1, 512, 16, 16), np.int8)
    with pytest.raises(ValueError, match=r"IntConv2d: reduction length K=131072.*int32 accumulator"):
        IntConv2d(w, None, 0.01)
    IntConv2d(w[:, :, :, :15], None, 0.01)  # K = 122880 fits


def test_refuses_ratio_past_requantize_margin():
    with pytest.raises(ValueError, match="IntConv2d: scale ratio too large"):
        IntConv2d(np.ones((1, 3, 3, 3), np.int8), None, 2.0**45)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"groups": 3}, "groups=3 must be a positive int dividing O=4"),
        ({"stride": 0}, "stride must be an int or a pair of ints >= 1"),
        ({"padding": (1, 2, 3)}, "padding must be an int, \\(ph, pw\\) or \\(top, left, bottom, right\\)"),
        ({"padding": -1}, "padding must be an int or a pair of ints >= 0"),
        ({"dilation": (1, 0)}, "dilation must be an int or a pair of ints >= 1"),
    ],
)
def test_refuses_bad_geometry(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IntConv2d(np.ones((4, 2, 3, 3), np.int8), None, 0.1, **kwargs)


def test_refuses_weight_out_of_int8():
    with pytest.raises(ValueError, match=r"IntConv2d: weight has values in \[-129, 1\]"):
        IntConv2d(np.array([[[[-129, 1]]]]), None, 0.1)


# --- (d) clamp ranges and 4-bit weights (issue 5) ------------------------------------------------

RANGES = [(-128, 127), (-8, 7), (0, 15), (0, 127)]


@pytest.mark.parametrize(("qmin", "qmax"), RANGES)
@pytest.mark.parametrize("weight_bits", [8, 4])
def test_clamp_range_and_int4_weights_exact(qmin, qmax, weight_bits):
    rng = np.random.default_rng(1)
    lo, hi = (-8, 7) if weight_bits == 4 else (-128, 127)
    x = rng.integers(-128, 128, (2, 4, 7, 6)).astype(np.int8)
    w = rng.integers(lo, hi + 1, (6, 4, 3, 3)).astype(np.int8)
    w[0], w[1] = lo, hi  # all-min and all-max channels
    b = rng.integers(-(2**12), 2**12, 6).astype(np.int32)
    ratio = dyadic_ratios(6, exponent=-7 if weight_bits == 4 else -11)
    op = IntConv2d(w, b, ratio, stride=2, padding=(0, 0, 1, 1), qmin=qmin, qmax=qmax, weight_bits=weight_bits)
    assert op.packed_int4 == (frozenset({"w"}) if weight_bits == 4 else frozenset())
    acc = numpy_conv(x, w, b, (2, 2), (0, 0, 1, 1))
    want = np.clip(np.floor(acc * ratio.reshape(-1, 1, 1) + 0.5), qmin, qmax)
    got = run_both(op, [x])
    np.testing.assert_array_equal(got, want)
    assert got.min() == qmin and got.max() == qmax  # both edges of the range are exercised


def test_clamped_function_named_with_the_range():
    w = np.ones((4, 2, 3, 3), np.int8)
    assert IntConv2d(w, None, 0.1, padding=1, qmin=0, qmax=15).op_type == "IntConv2d_s1x1_p1x1x1x1_d1x1_g1_c0x15"
    op = IntConv2d(w, None, 0.1, qmin=-8, qmax=7)
    assert op.function_proto().name == op.op_type == "IntConv2d_s1x1_p0x0x0x0_d1x1_g1_cm8x7"
    assert IntConv2d(w, None, 0.1, qmin=-128, qmax=127).op_type == "IntConv2d_s1x1_p0x0x0x0_d1x1_g1"


def test_int4_weights_stored_packed():
    """The INT4 initializer holds two weights per byte: the file shrinks by half the weight bytes."""
    rng = np.random.default_rng(2)
    w = rng.integers(-7, 8, (64, 64, 3, 3)).astype(np.int8)
    x = np.zeros((1, 64, 5, 5), np.int8)
    m8 = single_op_model(IntConv2d(w, None, 2.0**-10), [x])
    m4 = single_op_model(IntConv2d(w, None, 2.0**-10, weight_bits=4), [x])
    packed = next(t for t in m4.graph.initializer if t.name == "w.int4")
    assert packed.data_type == onnx.TensorProto.INT4 and len(packed.raw_data) == w.size // 2
    assert [n.op_type for n in m4.graph.node] == ["Cast", m4.graph.node[1].op_type]
    saved = len(m8.SerializeToString()) - len(m4.SerializeToString())
    # everything else (the function body, the other params) is the same, up to the Cast node and the names
    assert abs(saved - w.size // 2) < 100, saved


def test_refuses_int4_weight_out_of_range():
    with pytest.raises(ValueError, match=r"IntConv2d: weight has values in \[-9, 7\], outside .* \[-8, 7\]"):
        IntConv2d(np.array([[[[-9, 7]]]]), None, 0.1, weight_bits=4)
    with pytest.raises(ValueError, match="IntConv2d: weight_bits must be 4 or 8"):
        IntConv2d(np.ones((1, 1, 1, 1)), None, 0.1, weight_bits=2)
    with pytest.raises(ValueError, match=r"IntConv2d: clamp range \[-200, 0\]"):
        IntConv2d(np.ones((1, 1, 1, 1)), None, 0.1, qmin=-200, qmax=0)
