"""Clamp-range op types (``<op>_c<lo>x<hi>``) through TVM equal onnxruntime and the torch emulation bit for bit.

Every op that ends in a requantize and takes a range (``Requantize``,
``IntConv2d_<config>``, ``IntLinear``, ``IntAdd`` with its int8 variant) is
run at the ranges a CNN uses: unsigned 4 bits after a fused ReLU ``[0, 15]``,
signed 4 bits ``[-8, 7]``, unsigned 8 bits ``[0, 127]``.  Each is compiled
twice, as imported (the converters' kernels) and through ``compile_onnx``
(fusion passes and the x86 schedules, for an AVX2 CPU), and the outputs must
reach both ends of the range, so a kernel clamping to the default range
would fail.  Then the routing of suffixed op types and the refusals.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from intq.passes import compat
from intq.passes.build import build, run
from intq.passes.onnx_import import converter_for, import_onnx, unsupported_nodes
from intq.passes.ops import CONVERTERS, IntqLoweringError
from intq.passes.ops.base import split_range_suffix
from intq.passes.pipeline import compile_onnx
from intq.passes.schedules import ScheduleKernels
from intq.quantizer.ops.add import IntAdd
from intq.quantizer.ops.base import range_suffix
from intq.quantizer.ops.conv import IntConv2d
from intq.quantizer.ops.linear import IntLinear
from intq.quantizer.ops.onnx_fn import single_op_model
from intq.quantizer.ops.requantize import Requantize

TARGET = {"kind": "llvm", "mcpu": "znver3"}  # AVX2, no AVX-512: the x86 schedules' target
RANGES = [(0, 15), (-8, 7), (0, 127)]

pytestmark = pytest.mark.filterwarnings(
    "ignore:Field 'shape' of 'type' is required:UserWarning",
    "ignore:Renaming name:UserWarning",
    "ignore:Input .* has unknown dimension shapes:UserWarning",
)


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def int8s(rng, shape) -> np.ndarray:
    return rng.integers(-128, 127, size=shape, endpoint=True).astype(np.int8)


def assert_exact(op, model: onnx.ModelProto, feeds: dict[str, np.ndarray], qmin: int, qmax: int) -> ScheduleKernels:
    """TVM as imported, TVM through compile_onnx, onnxruntime and ``op`` agree, in int8, reaching qmin and qmax.

    Returns the ``ScheduleKernels`` pass run on the imported module (what the schedules did with the kernel).
    """
    want = ort_run(model, feeds)
    emulated = op(*(torch.from_numpy(feeds[name]) for name in op.data_inputs)).numpy()
    (plain,) = run(build(import_onnx(model)), feeds)
    compiled = compile_onnx(model, TARGET)
    vm = compat.VirtualMachine(compiled.executable, compat.tvm.cpu(0))
    scheduled = vm["main"](*(compat.tvm.runtime.tensor(feeds[name]) for name in compiled.input_names)).numpy()
    assert want.dtype == np.int8 and want.min() == qmin and want.max() == qmax, (want.dtype, want.min(), want.max())
    for got in (emulated, plain, scheduled):
        assert got.dtype == np.int8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    schedule = ScheduleKernels(compat.make_target(TARGET))
    schedule(import_onnx(model))
    return schedule


@pytest.mark.parametrize(("qmin", "qmax"), RANGES)
def test_requantize(qmin, qmax):
    rng = np.random.default_rng(qmax - qmin)
    op = Requantize(np.linspace(-2e-3, 3e-3, 24), qmin=qmin, qmax=qmax)
    assert op.op_type == f"Requantize{range_suffix(qmin, qmax)}"
    x = rng.integers(-(2**16), 2**16, size=(3, 5, 24)).astype(np.int32)
    assert assert_exact(op, single_op_model(op, [x]), {"x": x}, qmin, qmax).scheduled == {"intq_requantize": "rows"}


@pytest.mark.parametrize(("qmin", "qmax"), RANGES)
@pytest.mark.parametrize(
    "config", [{"padding": 1}, {"stride": 2, "padding": (0, 0, 1, 1)}, {"padding": 1, "groups": 8}]
)
def test_conv(qmin, qmax, config):
    rng = np.random.default_rng(qmax)
    groups = config.get("groups", 1)
    w = rng.integers(-127, 127, size=(8, 8 // groups, 3, 3), endpoint=True).astype(np.int8)
    op = IntConv2d(w, rng.integers(-500, 500, 8), np.geomspace(2e-4, 8e-2, 8), qmin=qmin, qmax=qmax, **config)
    assert op.op_type.endswith(range_suffix(qmin, qmax))
    x = int8s(rng, (2, 8, 9, 9))
    schedule = assert_exact(op, single_op_model(op, [x]), {"x": x}, qmin, qmax)
    assert schedule.scheduled == {"intq_conv2d": "conv"}
    # the dense convs take the GEMM call rewrite; the grouped one the direct schedule
    assert ("intq_conv2d" in schedule.skipped) == (groups > 1), schedule.skipped


@pytest.mark.parametrize(("qmin", "qmax"), RANGES)
def test_linear(qmin, qmax):
    rng = np.random.default_rng(qmax + 1)
    w = rng.integers(-127, 127, size=(40, 64), endpoint=True).astype(np.int8)
    op = IntLinear(w, rng.integers(-500, 500, 40), np.geomspace(1e-4, 3e-2, 40), qmin=qmin, qmax=qmax)
    x = int8s(rng, (7, 64))
    assert assert_exact(op, single_op_model(op, [x]), {"x": x}, qmin, qmax).scheduled == {"intq_intlinear": "gemm"}


@pytest.mark.parametrize(("qmin", "qmax"), RANGES)
def test_add_int8_variant(qmin, qmax):
    rng = np.random.default_rng(qmax + 2)
    op = IntAdd(0.81, 0.93, qmin=qmin, qmax=qmax)
    assert op.op_type == f"IntAdd{range_suffix(qmin, qmax, default=(-32768, 32767))}"
    a, b = int8s(rng, (2, 6, 5, 5)), int8s(rng, (2, 6, 5, 5))
    assert assert_exact(op, single_op_model(op, [a, b]), {"a": a, "b": b}, qmin, qmax).scheduled == {"intq_add": "rows"}


# --- routing and refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op_type", "expected"),
    [
        ("Requantize", ("Requantize", None, None)),
        ("Requantize_c0x15", ("Requantize", 0, 15)),
        ("IntAdd_cm8x7", ("IntAdd", -8, 7)),
        ("IntConv2d_s1x1_p1x1x1x1_d1x1_g1_cm128xm1", ("IntConv2d_s1x1_p1x1x1x1_d1x1_g1", -128, -1)),
        ("IntConv2d_s1x1_p1x1x1x1_d1x1_g1", ("IntConv2d_s1x1_p1x1x1x1_d1x1_g1", None, None)),
        ("Requantize_c0x15_extra", ("Requantize_c0x15_extra", None, None)),
    ],
)
def test_split_range_suffix_inverts_range_suffix(op_type, expected):
    assert split_range_suffix(op_type) == expected
    base, qmin, qmax = expected
    if qmin is not None:
        assert base + range_suffix(qmin, qmax) == op_type


def test_suffixed_op_types_reach_the_converter_with_their_range():
    cls = converter_for("IntConv2d_s2x2_p0x0x1x1_d1x1_g1_c0x15", CONVERTERS)
    assert cls.op_type == "IntConv2d_s2x2_p0x0x1x1_d1x1_g1_c0x15" and cls.clamp_range == (0, 15)
    assert converter_for("IntAdd_c0x127", CONVERTERS).output_range("n") == (0, 127, "int8")
    assert converter_for("IntAdd", CONVERTERS).output_range("n") == (-32768, 32767, "int16")
    assert converter_for("Requantize_cm8x7", CONVERTERS).output_range("n") == (-8, 7, "int8")
    for refused in ("IntLinear16_c0x15", "IntLinearAcc_c0x15", "Shiftmax_c0x15", "IntMatMul_c0x15"):
        assert converter_for(refused, CONVERTERS) is None, refused


def _renamed(op_type: str) -> onnx.ModelProto:
    op = Requantize(1e-2)
    model = single_op_model(op, [np.zeros((2, 3), np.int32)])
    model.graph.node[0].op_type = op_type
    model.graph.node[0].name = "head.requant"
    return model


def test_op_without_a_ranged_form_is_unsupported_naming_the_node():
    model = _renamed("Shiftmax_c0x15")
    assert unsupported_nodes(model) == {"intq.Shiftmax_c0x15": ["head.requant"]}


@pytest.mark.parametrize(
    ("op_type", "reason"),
    [("Requantize_c0x300", r"\[0, 300\] .* must lie inside int8"), ("Requantize_c7x7", r"\[7, 7\]")],
)
def test_range_outside_the_output_dtype_is_refused_naming_the_node(op_type, reason):
    with pytest.raises(IntqLoweringError, match=rf"intq\.{op_type} node 'head\.requant': the clamp range {reason}"):
        import_onnx(_renamed(op_type))


def test_int16_add_range_must_fit_int8():
    op = IntAdd(0.5, 0.5)
    model = single_op_model(op, [np.zeros((2, 3), np.int8), np.zeros((2, 3), np.int8)])
    model.graph.node[0].op_type = "IntAdd_cm200x200"
    model.graph.node[0].name = "res.add"
    with pytest.raises(IntqLoweringError, match=r"node 'res\.add': the clamp range \[-200, 200\] .* inside int8"):
        import_onnx(model)
