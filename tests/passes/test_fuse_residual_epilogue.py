"""FuseResidualEpilogue: IntLinear16 -> IntAdd becomes one kernel computing the same integers.

The models are two ``intq`` nodes, ``y = IntAdd(r, IntLinear16(x))`` (or the
linear first), whose weights and per-channel requantize params are graph
inputs (so that the Relax module holds no constants) and whose add
multipliers are initializers (baked into the kernel).  ``Before`` is what
``import_onnx`` makes of it, ``Expected`` the module after the pass.
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
from intq.passes.fuse_residual_epilogue import FuseResidualEpilogue
from intq.passes.onnx_import import import_onnx
from intq.quantizer.ops.add import IntAdd
from intq.quantizer.ops.base import ONNX_OPSET
from intq.quantizer.ops.linear import IntLinear16
from intq.quantizer.ops.requantize import Requantize

pytestmark = pytest.mark.filterwarnings(
    "ignore:Field 'shape' of 'type' is required:UserWarning",
    "ignore:Renaming name:UserWarning",
)

I16 = np.iinfo(np.int16)
ADD_PARAMS = {"m_a": 3, "m_b": 5, "s_a": 2}  # y = (3 a + 5 b + 2) >> 2: ties, and saturation near the int16 ends


def residual_model(linear_at: int = 1, x_rows="n", consumer: str = "IntAdd", lin_is_output: bool = False):
    """``y = IntAdd(r, IntLinear16(x, w, b, m, s))`` (``linear_at=0``: the linear is ``a``)."""
    lin_node = helper.make_node("IntLinear16", ["x", "w", "b", "m", "s"], ["lin"], domain="intq")
    if consumer == "IntAdd":
        operands = ["lin", "r"] if linear_at == 0 else ["r", "lin"]
        use = helper.make_node("IntAdd", [*operands, "m_a", "m_b", "s_a"], ["y"], domain="intq")
    else:
        use = helper.make_node("Requantize", ["lin", "m_a", "s_a"], ["y"], domain="intq")
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.INT8, [x_rows, 4]),
        helper.make_tensor_value_info("w", TensorProto.INT8, [3, 4]),
        helper.make_tensor_value_info("b", TensorProto.INT32, [3]),
        helper.make_tensor_value_info("m", TensorProto.INT64, [3]),
        helper.make_tensor_value_info("s", TensorProto.INT64, [3]),
    ]
    if consumer == "IntAdd":
        inputs.append(helper.make_tensor_value_info("r", TensorProto.INT16, ["n", 3]))
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.INT16, None) for name in ["y", "lin"][: 1 + lin_is_output]
    ]
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ADD_PARAMS.items()]
    graph = helper.make_graph([lin_node, use], "residual", inputs, outputs, initializer=inits)
    functions = [IntLinear16.function_proto(), IntAdd.function_proto(), Requantize.function_proto()]
    opsets = [helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid("intq", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=functions)


# fmt: off
@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def intq_add(r_h: T.handle, lin_h: T.handle, add_h: T.handle):
        T.func_attr({"intq.immediates": {"m_a": 3, "m_b": 5, "s": 2}, "intq.op": "IntAdd", "tirx.noalias": True})
        n = T.int64()
        r = T.match_buffer(r_h, (n, T.int64(3)), "int16")
        lin = T.match_buffer(lin_h, (n, T.int64(3)), "int16")
        add = T.match_buffer(add_h, (n, T.int64(3)), "int16")
        for i0, i1 in T.grid(n, T.int64(3)):
            with T.sblock("add"):
                v_i0, v_i1 = T.axis.remap("SS", [i0, i1])
                T.reads(lin[v_i0, v_i1], r[v_i0, v_i1])
                T.writes(add[v_i0, v_i1])
                add[v_i0, v_i1] = T.Cast("int16", T.max(T.min(
                    T.Cast("int64", lin[v_i0, v_i1]) * T.int64(5) + T.Cast("int64", r[v_i0, v_i1]) * T.int64(3)
                    + T.int64(2) >> T.int64(2), T.int64(32767)), T.int64(-32768)))

    @T.prim_func(private=True, s_tir=True)
    def intq_intlinear16(
        x_h: T.handle, w: T.Buffer((T.int64(3), T.int64(4)), "int8"), b: T.Buffer((T.int64(3),), "int32"),
        m: T.Buffer((T.int64(3),), "int64"), s: T.Buffer((T.int64(3),), "int64"), out_h: T.handle,
    ):
        T.func_attr({"intq.immediates": {}, "intq.op": "IntLinear16", "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(x_h, (n, T.int64(4)), "int8")
        requantize = T.match_buffer(out_h, (n, T.int64(3)), "int16")
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
                T.reads(acc[v_i0, v_i1], b[v_i1], m[v_i1], s[v_i1])
                T.writes(requantize[v_i0, v_i1])
                requantize[v_i0, v_i1] = T.Cast("int16", T.max(T.min(
                    (T.Cast("int64", acc[v_i0, v_i1]) + T.Cast("int64", b[v_i1])) * m[v_i1]
                    + (T.int64(1) << s[v_i1] - T.int64(1)) >> s[v_i1], T.int64(32767)), T.int64(-32768)))

    @R.function
    def main(
        x: R.Tensor(("n", 4), dtype="int8"), w: R.Tensor((3, 4), dtype="int8"), b: R.Tensor((3,), dtype="int32"),
        m: R.Tensor((3,), dtype="int64"), s: R.Tensor((3,), dtype="int64"), r: R.Tensor(("n", 3), dtype="int16"),
    ) -> R.Tensor(("n", 3), dtype="int16"):
        R.func_attr({"intq.onnx_input_names": ["x", "w", "b", "m", "s", "r"], "num_input": 6})
        n = T.int64()
        cls = Before
        with R.dataflow():
            lv = R.call_tir(cls.intq_intlinear16, (x, w, b, m, s), out_ty=R.Tensor((n, 3), dtype="int16"))
            gv = R.call_tir(cls.intq_add, (r, lv), out_ty=R.Tensor((n, 3), dtype="int16"))
            R.output(gv)
        return gv


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def intq_linear16_add(
        x_h: T.handle, w: T.Buffer((T.int64(3), T.int64(4)), "int8"), b: T.Buffer((T.int64(3),), "int32"),
        m: T.Buffer((T.int64(3),), "int64"), s: T.Buffer((T.int64(3),), "int64"), r_h: T.handle, add_h: T.handle,
    ):
        T.func_attr({"intq.op": "IntLinear16+IntAdd", "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(x_h, (n, T.int64(4)), "int8")
        r = T.match_buffer(r_h, (n, T.int64(3)), "int16")
        add = T.match_buffer(add_h, (n, T.int64(3)), "int16")
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
            with T.sblock("add"):
                v_i0, v_i1 = T.axis.remap("SS", [i0, i1])
                T.reads(acc[v_i0, v_i1], b[v_i1], m[v_i1], s[v_i1], r[v_i0, v_i1])
                T.writes(add[v_i0, v_i1])
                # the linear's int16 clamp stays, in a register, before the add widens it again
                add[v_i0, v_i1] = T.Cast("int16", T.max(T.min(
                    T.Cast("int64", T.Cast("int16", T.max(T.min(
                        (T.Cast("int64", acc[v_i0, v_i1]) + T.Cast("int64", b[v_i1])) * m[v_i1]
                        + (T.int64(1) << s[v_i1] - T.int64(1)) >> s[v_i1], T.int64(32767)), T.int64(-32768)))
                    ) * T.int64(5)
                    + T.Cast("int64", r[v_i0, v_i1]) * T.int64(3) + T.int64(2) >> T.int64(2),
                    T.int64(32767)), T.int64(-32768)))

    @R.function
    def main(
        x: R.Tensor(("n", 4), dtype="int8"), w: R.Tensor((3, 4), dtype="int8"), b: R.Tensor((3,), dtype="int32"),
        m: R.Tensor((3,), dtype="int64"), s: R.Tensor((3,), dtype="int64"), r: R.Tensor(("n", 3), dtype="int16"),
    ) -> R.Tensor(("n", 3), dtype="int16"):
        R.func_attr({"intq.onnx_input_names": ["x", "w", "b", "m", "s", "r"], "num_input": 6})
        n = T.int64()
        cls = Expected
        with R.dataflow():
            gv = R.call_tir(cls.intq_linear16_add, (x, w, b, m, s, r), out_ty=R.Tensor((n, 3), dtype="int16"))
            R.output(gv)
        return gv
# fmt: on


def test_before_is_what_the_importer_makes():
    compat.tvm.ir.assert_structural_equal(import_onnx(residual_model()), Before)


def test_linear16_and_add_become_one_kernel():
    fuse = FuseResidualEpilogue()
    after = fuse(Before)
    compat.tvm.ir.assert_structural_equal(after, Expected)
    assert fuse.fused == ["lv"] and fuse.skipped == {}


@pytest.mark.parametrize(
    "model, reason",
    [
        (residual_model(lin_is_output=True), "the linear's output is used 2 times"),
        (residual_model(consumer="Requantize"), "its consumer intq_requantize (Requantize) is not an IntAdd"),
        (residual_model(x_rows=1), "the IntAdd broadcasts the linear's output [1, 3] to [n, 3]"),
    ],
    ids=["another_use", "not_an_add", "broadcast_linear"],
)
def test_guard_leaves_the_module_unchanged(model, reason):
    before = import_onnx(model)
    fuse = FuseResidualEpilogue()
    after = fuse(before)
    compat.tvm.ir.assert_structural_equal(after, before)
    assert fuse.fused == [] and fuse.skipped == {"lv": reason}


def adversarial_feeds(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Extreme and random int8 rows, biases at the int32 accumulator bound, requantizes that saturate int16."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (rows, 4)).astype(np.int8)
    x[0], x[-1] = -128, 127
    w = np.array([[-128, -128, -128, -128], [127, -128, 127, -128], [1, -1, 0, 127]], np.int8)
    bound = 2**31 - 1 - 4 * 128 * 128  # |acc + b| < 2**31 for every x
    b = np.array([bound, -bound, 12345], np.int32)
    m = np.array([1, 2**30, 3], np.int64)  # (acc + b) * m + 2**(s-1) < 2**62: the IntLinear16 margin
    s = np.array([1, 40, 62], np.int64)  # halving (saturates), /1024 (saturates), ~0 (rounds to 0)
    r = rng.integers(I16.min, I16.max, (rows, 3), endpoint=True).astype(np.int16)
    r[0], r[-1] = I16.min, I16.max
    return {"x": x, "w": w, "b": b, "m": m, "s": s, "r": r}


@pytest.mark.parametrize("linear_at", [0, 1], ids=["linear_is_a", "linear_is_b"])
def test_fused_kernel_is_bit_exact_on_saturating_integers(linear_at):
    model = residual_model(linear_at)
    before = import_onnx(model)
    fuse = FuseResidualEpilogue()
    after = fuse(before)
    assert len(fuse.fused) == 1
    separate, fused = build(before), build(after)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = []
    for rows, seed in ((1, 0), (2, 1), (37, 2)):
        feeds = adversarial_feeds(rows, seed)
        total = feeds["x"].astype(np.int64) @ feeds["w"].T.astype(np.int64) + feeds["b"]
        unclamped = (total * feeds["m"] + (1 << (feeds["s"] - 1))) >> feeds["s"]
        assert np.abs(unclamped).max() > I16.max  # the linear's own int16 clamp is exercised
        (want,) = run(separate, feeds)
        (got,) = run(fused, feeds)
        assert got.dtype == np.int16
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, session.run(None, feeds)[0])
        outputs.append(got)
    assert {I16.min, I16.max} <= set(np.concatenate(outputs).ravel().tolist())  # the add saturated both ways


def test_ranged_int8_add_is_left_unfused():
    """``IntAdd_c0x127`` (a residual add with its ReLU) clamps in int8: the int16 fused kernel must not take it."""
    model = residual_model()
    ranged = IntAdd(0.5, 0.5, qmin=0, qmax=127)
    model.graph.node[1].op_type = ranged.op_type
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT8
    model.functions.append(ranged.function_proto())
    before = import_onnx(model)
    fuse = FuseResidualEpilogue()
    compat.tvm.ir.assert_structural_equal(fuse(before), before)
    reason = "its consumer IntAdd_c0x127 clamps to [0, 127] in int8; the fused kernel computes the int16 IntAdd"
    assert fuse.fused == [] and fuse.skipped == {"lv": reason}
    feeds = adversarial_feeds(5, 3)
    (got,) = run(build(before), feeds)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, feeds)[0]
    assert got.dtype == want.dtype == np.int8
    np.testing.assert_array_equal(got, want)
    assert {0, 127} <= set(got.ravel().tolist())
