"""Inputs that onnxruntime refuses are refused by the TVM build too, and nothing reads out of bounds.

Gather with data-dependent indices (``passes/checked_ops.py``): in range it
equals onnxruntime, negative indices included, on any axis; an index
outside ``[-n, n - 1]`` raises ``ValueError`` naming the node (onnxruntime
raises too).  A huge id runs in a child process, so that a regression to
TVM's fast ``take`` (SIGSEGV) fails the test instead of killing pytest.
Slice with a symbolic end past the axis has onnxruntime's clamped length.
IntAdd / IntMul whose symbolic dims turn out not to broadcast raise
``ValueError`` where onnxruntime raises, instead of reading past an operand.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from intq.passes.build import build, run
from intq.passes.onnx_import import import_onnx
from intq.quantizer.ops.add import IntAdd
from intq.quantizer.ops.mul import IntMul
from intq.quantizer.ops.onnx_fn import single_op_model

pytestmark = pytest.mark.filterwarnings(
    "ignore:Field 'shape' of 'type' is required:UserWarning", "ignore:Renaming name:UserWarning"
)


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def gather_model(table: np.ndarray, axis: int = 0, index_shape=("batch", "seq")) -> onnx.ModelProto:
    """``Gather(table, ids, axis)`` with ``table`` a constant and ``ids`` a graph input of symbolic shape."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="embed", axis=axis)],
        "gather",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, list(index_shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT8, None)],
        [numpy_helper.from_array(table, "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


TABLE = np.arange(-60, 60, dtype=np.int8).reshape(10, 12)


def test_gather_in_range_equals_onnxruntime_with_negative_ids():
    model = gather_model(TABLE)
    runnable = build(import_onnx(model))
    for ids in (np.array([[0, 9, -1, -10, 3]]), np.arange(-10, 10).reshape(4, 5), np.zeros((2, 0), np.int64)):
        (got,) = run(runnable, {"ids": ids})
        np.testing.assert_array_equal(got, ort_run(model, {"ids": ids})[0])
    np.testing.assert_array_equal(run(runnable, {"ids": np.array([[-1]])})[0], TABLE[[[9]]])


def test_gather_on_an_inner_axis_equals_onnxruntime():
    model = gather_model(TABLE, axis=1, index_shape=("n",))
    runnable = build(import_onnx(model))
    ids = np.array([11, 0, -12, 5])
    (got,) = run(runnable, {"ids": ids})
    np.testing.assert_array_equal(got, TABLE[:, [11, 0, 0, 5]])
    with pytest.raises(ValueError, match=r"Gather 'embed': an index is outside \[-12, 11\] \(axis 1"):
        run(runnable, {"ids": np.array([12])})


@pytest.mark.parametrize("bad", [10, -11, 2**40])
def test_gather_out_of_range_raises_like_onnxruntime(bad):
    model = gather_model(TABLE)
    ids = np.array([[1, 2, bad]])
    with pytest.raises(Exception, match="out of data bounds"):
        ort_run(model, {"ids": ids})
    runnable = build(import_onnx(model))
    with pytest.raises(ValueError, match=r"Gather 'embed': an index is outside \[-10, 9\]"):
        run(runnable, {"ids": ids})


def test_a_huge_id_cannot_crash_the_process(tmp_path):
    path = tmp_path / "gather.onnx"
    onnx.save(gather_model(TABLE), path)
    script = textwrap.dedent(
        f"""
        import numpy as np, onnx
        from intq.passes.build import build, run
        from intq.passes.onnx_import import import_onnx
        runnable = build(import_onnx(onnx.load({str(path)!r})))
        try:
            run(runnable, {{"ids": np.array([[3, 10**12, -10**12]])}})
        except ValueError as e:
            print("refused:", e)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "refused: Gather 'embed'" in done.stdout, done.stdout


def test_no_fast_take_on_data_dependent_indices():
    mod = import_onnx(gather_model(TABLE))
    text = mod["main"].script()
    assert 'mode="fast"' not in text and "intq_take" in text, text


def slice_model(rows: int) -> onnx.ModelProto:
    """``positions[:, 0:seq]`` of a constant ``[1, rows]`` table, ``seq`` the length of the input ``x``."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["seq"], axis=0),
        helper.make_node("Slice", ["positions", "zero", "seq", "one"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slice",
        [helper.make_tensor_value_info("x", TensorProto.INT8, [1, "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
        [
            numpy_helper.from_array(np.arange(rows, dtype=np.int64).reshape(1, rows) * 7, "positions"),
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_slice_past_the_axis_is_clamped_as_onnxruntime_does():
    model = slice_model(6)
    runnable = build(import_onnx(model))
    for seq in (1, 6, 9, 40):
        x = np.zeros((1, seq), np.int8)
        (got,) = run(runnable, {"x": x})
        want = ort_run(model, {"x": x})[0]
        assert got.shape == want.shape == (1, min(seq, 6)), (got.shape, want.shape)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("op", [IntAdd(0.5, 0.25), IntMul(0.01)], ids=["IntAdd", "IntMul"])
def test_symbolic_dims_that_do_not_broadcast_raise(op):
    example = [np.zeros((2, 5, 4), np.int8), np.zeros((1, 5, 4), np.int8)]
    model = single_op_model(op, example)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "seq"
    model.graph.input[1].type.tensor_type.shape.dim[1].dim_param = "rows"
    runnable = build(import_onnx(model))
    a, b = np.ones((2, 7, 4), np.int8), np.ones((1, 3, 4), np.int8)
    with pytest.raises(Exception, match="broadcast"):
        ort_run(model, {"a": a, "b": b})
    with pytest.raises(ValueError, match=rf"{op.op_type} .*axis 1 of input [ab] \((seq|rows)\) is neither 1"):
        run(runnable, {"a": a, "b": b})
    for b_rows in (1, 7):  # what broadcasts still runs, and equals onnxruntime
        b = np.full((1, b_rows, 4), 3, np.int8)
        np.testing.assert_array_equal(run(runnable, {"a": a, "b": b})[0], ort_run(model, {"a": a, "b": b})[0])


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "llvm", "mcpu": "nonsense"}, "mcpu 'nonsense' is not a CPU that LLVM knows"),
        ({"kind": "llvm", "mcpu": "znver"}, "did you mean znver"),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "znver3"}, "for aarch64-linux-gnu"),
    ],
)
def test_an_unknown_mcpu_is_refused_by_name(spec, message):
    from intq.passes.targets import resolve_target

    with pytest.raises(ValueError, match=message):
        resolve_target(spec)
    known = {**spec, "mcpu": "cortex-a76" if "mtriple" in spec else "znver3"}
    assert resolve_target(known).target.attrs["mcpu"] == known["mcpu"]
