"""FuseRequantizeEpilogue: IntLinearAcc / IntMatMulAcc -> Requantize becomes the IntLinear / IntMatMul kernel.

The models are two ``intq`` nodes, an accumulating op and the ``Requantize``
of its int32 output, with weights as graph inputs (so that the Relax module
holds no constants) and the requantize ``m``, ``s`` either scalar
initializers (baked into the kernel) or per-channel graph inputs (buffers).
``Before`` is what ``import_onnx`` makes of the linear pair; ``Expected`` is
the module after the pass, which is also what the importer makes of the one
``IntLinear`` node with the same params.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from intq.passes import compat
from intq.passes.build import build, run
from intq.passes.fuse_requantize_epilogue import FuseRequantizeEpilogue
from intq.passes.onnx_import import import_onnx
from intq.quantizer.ops.base import ONNX_OPSET
from intq.quantizer.ops.linear import IntLinear, IntLinearAcc
from intq.quantizer.ops.matmul import IntMatMul, IntMatMulAcc
from intq.quantizer.ops.requantize import Requantize
from intq.quantizer.ops.shiftmax import Shiftmax

pytestmark = pytest.mark.filterwarnings(
    "ignore:Field 'shape' of 'type' is required:UserWarning",
    "ignore:Renaming name:UserWarning",
)

I8 = np.iinfo(np.int8)
SCALAR = {"m": 12345, "s": 20}  # baked-in requantize params of the scalar variant
FUNCTIONS = [op.function_proto() for op in (IntLinear, IntLinearAcc, IntMatMul, IntMatMulAcc, Requantize, Shiftmax)]
DATA = {  # the graph inputs of each producer
    "IntLinearAcc": [("x", TensorProto.INT8, ["n", 4]), ("w", TensorProto.INT8, [3, 4]), ("b", TensorProto.INT32, [3])],
    "IntMatMulAcc": [("a", TensorProto.INT8, ["n", 2, 16]), ("b", TensorProto.INT8, [16, 3])],
}
FUSED = {"IntLinearAcc": "IntLinear", "IntMatMulAcc": "IntMatMul"}


def accumulator_model(producer: str, params: str = "scalar", consumer: str = "Requantize", fused: bool = False):
    """``y = Requantize(producer(...), m, s)``, or the one requantizing op (``fused``), or a Shiftmax of it."""
    data = [name for name, _, _ in DATA[producer]]
    inputs = [helper.make_tensor_value_info(*spec) for spec in DATA[producer]]
    outputs = [helper.make_tensor_value_info("y", TensorProto.INT8, None)]
    if consumer == "Shiftmax":
        nodes = [helper.make_node("Shiftmax", ["acc", "D"], ["y"], domain="intq")]
        inits = [numpy_helper.from_array(np.array(Shiftmax(1e-3).D.numpy(), np.int64), "D")]
    else:
        nodes = [helper.make_node("Requantize", ["acc", "m", "s"], ["y"], domain="intq")]
        if params == "scalar":
            inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in SCALAR.items()]
        else:
            inits = []
            inputs += [helper.make_tensor_value_info(k, TensorProto.INT64, [3]) for k in ("m", "s")]
    if consumer == "Requantize and output":
        outputs.append(helper.make_tensor_value_info("acc", TensorProto.INT32, None))
    if fused:
        nodes = [helper.make_node(FUSED[producer], [*data, "m", "s"], ["y"], domain="intq")]
    else:
        nodes.insert(0, helper.make_node(producer, data, ["acc"], domain="intq"))
    graph = helper.make_graph(nodes, producer, inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid("intq", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=FUNCTIONS)


# fmt: off
@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def intq_linear_acc(
        x_h: T.handle, w: T.Buffer((T.int64(3), T.int64(4)), "int8"), b: T.Buffer((T.int64(3),), "int32"),
        bias_h: T.handle,
    ):
        T.func_attr({"intq.immediates": {}, "intq.op": "IntLinearAcc", "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(x_h, (n, T.int64(4)), "int8")
        bias = T.match_buffer(bias_h, (n, T.int64(3)), "int32")
        acc = T.sblock_alloc_buffer((n, T.int64(3)), "int32")
        for i0, i1, k in T.grid(n, T.int64(3), T.int64(4)):
            with T.sblock("acc"):
                v_i0, v_i1, v_k = T.axis.remap("SSR", [i0, i1, k])
                T.reads(x[v_i0, v_k], w[v_i1, v_k])
                T.writes(acc[v_i0, v_i1])
                with T.init():
                    acc[v_i0, v_i1] = 0
                acc[v_i0, v_i1] = acc[v_i0, v_i1] + T.Cast("int32", x[v_i0, v_k]) * T.Cast("int32", w[v_i1, v_k])
        for i0, i1 in T.grid(n, T.int64(3)):
            with T.sblock("bias"):
                v_i0, v_i1 = T.axis.remap("SS", [i0, i1])
                T.reads(acc[v_i0, v_i1], b[v_i1])
                T.writes(bias[v_i0, v_i1])
                bias[v_i0, v_i1] = acc[v_i0, v_i1] + b[v_i1]

    @T.prim_func(private=True, s_tir=True)
    def intq_requantize(x_h: T.handle, requantize_h: T.handle):
        T.func_attr({"intq.immediates": {"m": 12345, "s": 20}, "intq.op": "Requantize", "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(x_h, (n, T.int64(3)), "int32")
        requantize = T.match_buffer(requantize_h, (n, T.int64(3)), "int8")
        for i0, i1 in T.grid(n, T.int64(3)):
            with T.sblock("requantize"):
                v_i0, v_i1 = T.axis.remap("SS", [i0, i1])
                T.reads(x[v_i0, v_i1])
                T.writes(requantize[v_i0, v_i1])
                requantize[v_i0, v_i1] = T.Cast("int8", T.max(T.min(
                    T.Cast("int64", x[v_i0, v_i1]) * T.int64(12345) + T.int64(524288) >> T.int64(20),
                    T.int64(127)), T.int64(-128)))

    @R.function
    def main(
        x: R.Tensor(("n", 4), dtype="int8"), w: R.Tensor((3, 4), dtype="int8"), b: R.Tensor((3,), dtype="int32"),
    ) -> R.Tensor(("n", 3), dtype="int8"):
        R.func_attr({"intq.onnx_input_names": ["x", "w", "b"], "num_input": 3})
        n = T.int64()
        cls = Before
        with R.dataflow():
            lv = R.call_tir(cls.intq_linear_acc, (x, w, b), out_ty=R.Tensor((n, 3), dtype="int32"))
            gv = R.call_tir(cls.intq_requantize, (lv,), out_ty=R.Tensor((n, 3), dtype="int8"))
            R.output(gv)
        return gv


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def intq_intlinear(
        x_h: T.handle, w: T.Buffer((T.int64(3), T.int64(4)), "int8"), b: T.Buffer((T.int64(3),), "int32"),
        requantize_h: T.handle,
    ):
        T.func_attr({"intq.immediates": {"m": 12345, "s": 20}, "intq.op": "IntLinear", "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(x_h, (n, T.int64(4)), "int8")
        requantize = T.match_buffer(requantize_h, (n, T.int64(3)), "int8")
        acc = T.sblock_alloc_buffer((n, T.int64(3)), "int32")
        for i0, i1, k in T.grid(n, T.int64(3), T.int64(4)):
            with T.sblock("acc"):
                v_i0, v_i1, v_k = T.axis.remap("SSR", [i0, i1, k])
                T.reads(x[v_i0, v_k], w[v_i1, v_k])
                T.writes(acc[v_i0, v_i1])
                with T.init():
                    acc[v_i0, v_i1] = 0
                acc[v_i0, v_i1] = acc[v_i0, v_i1] + T.Cast("int32", x[v_i0, v_k]) * T.Cast("int32", w[v_i1, v_k])
        for i0, i1 in T.grid(n, T.int64(3)):
            with T.sblock("requantize"):
                v_i0, v_i1 = T.axis.remap("SS", [i0, i1])
                T.reads(acc[v_i0, v_i1], b[v_i1])
                T.writes(requantize[v_i0, v_i1])
                # bias added after widening (IntLinear), equal to the int32 add since |acc + b| < 2**31
                requantize[v_i0, v_i1] = T.Cast("int8", T.max(T.min(
                    T.Cast("int64", acc[v_i0, v_i1]) * T.int64(12345) + T.Cast("int64", b[v_i1]) * T.int64(12345)
                    + T.int64(524288) >> T.int64(20), T.int64(127)), T.int64(-128)))

    @R.function
    def main(
        x: R.Tensor(("n", 4), dtype="int8"), w: R.Tensor((3, 4), dtype="int8"), b: R.Tensor((3,), dtype="int32"),
    ) -> R.Tensor(("n", 3), dtype="int8"):
        R.func_attr({"intq.onnx_input_names": ["x", "w", "b"], "num_input": 3})
        n = T.int64()
        cls = Expected
        with R.dataflow():
            gv = R.call_tir(cls.intq_intlinear, (x, w, b), out_ty=R.Tensor((n, 3), dtype="int8"))
            R.output(gv)
        return gv
# fmt: on


def test_before_and_expected_are_what_the_importer_makes():
    compat.tvm.ir.assert_structural_equal(import_onnx(accumulator_model("IntLinearAcc")), Before)
    compat.tvm.ir.assert_structural_equal(import_onnx(accumulator_model("IntLinearAcc", fused=True)), Expected)


def test_linear_acc_and_requantize_become_the_intlinear_kernel():
    fuse = FuseRequantizeEpilogue()
    compat.tvm.ir.assert_structural_equal(fuse(Before), Expected)
    assert fuse.fused == ["lv"] and fuse.skipped == {}


@pytest.mark.parametrize("params", ["scalar", "per_channel"])
@pytest.mark.parametrize("producer", ["IntLinearAcc", "IntMatMulAcc"])
def test_fused_module_is_the_one_op_module(producer, params):
    fuse = FuseRequantizeEpilogue()
    after = fuse(import_onnx(accumulator_model(producer, params)))
    compat.tvm.ir.assert_structural_equal(after, import_onnx(accumulator_model(producer, params, fused=True)))
    assert fuse.fused == ["lv"] and fuse.skipped == {}


@pytest.mark.parametrize(
    "model, reason",
    [
        (accumulator_model("IntLinearAcc", consumer="Requantize and output"), "the accumulator is used 2 times"),
        (
            accumulator_model("IntMatMulAcc", consumer="Shiftmax"),
            "its consumer intq_shiftmax (Shiftmax) is not a Requantize",
        ),
    ],
    ids=["another_use", "not_a_requantize"],
)
def test_guard_leaves_the_module_unchanged(model, reason):
    before = import_onnx(model)
    fuse = FuseRequantizeEpilogue()
    after = fuse(before)
    compat.tvm.ir.assert_structural_equal(after, before)
    assert fuse.fused == [] and fuse.skipped == {"lv": reason}


def adversarial_feeds(producer: str, params: str, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Extreme and random int8 operands; linear biases at the int32 accumulator bound; saturating ratios."""
    rng = np.random.default_rng(seed)
    if producer == "IntLinearAcc":
        x = rng.integers(-128, 128, (rows, 4)).astype(np.int8)
        x[0], x[-1] = -128, 127
        w = np.array([[-128, -128, -128, -128], [127, -128, 127, -128], [1, -1, 0, 127]], np.int8)
        bound = 2**31 - 1 - 4 * 128 * 128  # |acc + b| < 2**31 for every x: the exporter's accumulator bound
        feeds = {"x": x, "w": w, "b": np.array([bound, -bound, 7], np.int32)}
    else:
        a = rng.integers(-128, 128, (rows, 2, 16)).astype(np.int8)
        a[0, 0], a[-1, -1] = -128, 127
        b = rng.integers(-128, 128, (16, 3)).astype(np.int8)
        b[:, 0], b[:, 1] = -128, 127
        feeds = {"a": a, "b": b}
    if params == "per_channel":  # /2**24 near the int8 ends, 2**30/2**62 (ties at 1/2), 3/2 (saturates)
        feeds |= {"m": np.array([1, 2**30, 3], np.int64), "s": np.array([24, 62, 1], np.int64)}
    return feeds


@pytest.mark.parametrize("params", ["scalar", "per_channel"])
@pytest.mark.parametrize("producer", ["IntLinearAcc", "IntMatMulAcc"])
def test_fused_kernel_is_bit_exact_on_saturating_integers(producer, params):
    model = accumulator_model(producer, params)
    before = import_onnx(model)
    fuse = FuseRequantizeEpilogue()
    after = fuse(before)
    assert len(fuse.fused) == 1
    separate, fused = build(before), build(after)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = []
    for rows, seed in ((1, 0), (2, 1), (23, 2)):
        feeds = adversarial_feeds(producer, params, rows, seed)
        (want,) = run(separate, feeds)
        (got,) = run(fused, feeds)
        assert got.dtype == np.int8
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, session.run(None, feeds)[0])
        outputs.append(got.ravel())
    assert {I8.min, I8.max} <= set(np.concatenate(outputs).tolist())  # the requantize saturated both ways


# --- clamp ranges: Requantize_c<lo>x<hi> ---------------------------------------------------------------

RANGED_REQUANTIZE = Requantize(1e-3, qmin=0, qmax=15)  # a fused ReLU into 4 bits
RANGED_LINEAR = IntLinear(np.ones((1, 1), np.int8), np.zeros(1, np.int32), 1e-3, qmin=0, qmax=15)


def ranged(model, fused: bool = False):
    """``model`` with its requantizing node clamping to [0, 15] (``Requantize_c0x15`` / ``IntLinear_c0x15``)."""
    op = RANGED_LINEAR if fused else RANGED_REQUANTIZE
    node = model.graph.node[-1]
    node.op_type = op.op_type
    model.functions.append(op.function_proto())
    return model


@pytest.mark.parametrize("params", ["scalar", "per_channel"])
def test_ranged_requantize_fuses_into_the_ranged_intlinear(params):
    model = ranged(accumulator_model("IntLinearAcc", params))
    before = import_onnx(model)
    fuse = FuseRequantizeEpilogue()
    after = fuse(before)
    assert fuse.fused == ["lv"] and fuse.skipped == {}
    expected = import_onnx(ranged(accumulator_model("IntLinearAcc", params, fused=True), fused=True))
    compat.tvm.ir.assert_structural_equal(after, expected)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fused = build(after)
    outputs = []
    for rows, seed in ((2, 1), (23, 2)):
        feeds = adversarial_feeds("IntLinearAcc", params, rows, seed)
        (got,) = run(fused, feeds)
        np.testing.assert_array_equal(got, session.run(None, feeds)[0])
        outputs.append(got.ravel())
    assert {0, 15} <= set(np.concatenate(outputs).tolist()) <= set(range(16))


def test_ranged_requantize_of_a_matmul_is_left_unfused():
    before = import_onnx(ranged(accumulator_model("IntMatMulAcc")))
    fuse = FuseRequantizeEpilogue()
    compat.tvm.ir.assert_structural_equal(fuse(before), before)
    reason = "its consumer Requantize_c0x15 clamps to [0, 15]; the IntMatMul kernel clamps to [-128, 127] only"
    assert fuse.fused == [] and fuse.skipped == {"lv": reason}
