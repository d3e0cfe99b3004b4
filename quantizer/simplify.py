"""Simplify a float ONNX model before it is read: what a converter is expected to do with real exports.

Files exported by other tools carry a lot that is not the model: the torch
legacy exporter computes every reshape target and the attention scale
``(D // heads) ** -0.5`` from ``Shape`` at run time
(``Shape -> Gather -> Div -> Cast(to=float) -> Pow``), builds a class token
with ``ConstantOfShape / Equal / Where / Expand``, and leaves ``Identity``
nodes; a ViT may interpolate its position embeddings with ``Resize`` on a
constant.  None of it depends on the data.  ``simplify`` runs, on a copy:

1. onnxscript's optimizer (``onnxscript.optimizer.optimize_ir``, a
   dependency already: the torch dynamo exporter runs it): function
   inlining, node-level ONNX shape inference with the graph inputs'
   symbolic dims kept symbolic (``batch``, ``seq``), constant folding, its
   default rewrite rules (no-op removal, cast/reshape chains), dead-code
   removal and common-subexpression elimination.  A ``Shape`` of a value
   whose dims are static where they are read folds to a constant, so the
   attention scale, the head size and most reshape targets become
   constants, while the batch and sequence dims stay symbolic.
2. ``should_fold``: every node whose inputs are all constants is folded
   whatever its size (the optimizer's default skips inputs over 8192
   elements): a ``Resize`` of a ``[1, D, 14, 14]`` position table, a
   LayerScale vector, a pre-transposed weight.  ``QuantizeLinear`` /
   ``DequantizeLinear`` stay (the optimizer's own list).
3. ``fold_static_dims``, which the optimizer leaves: ``Gather(Shape(x),
   k)`` and ``Slice(Shape(x), a, b)`` (the legacy exporter's ``x.shape[k]``,
   ``x.size(-1)``, and SDPA's scale from ``q.shape[-1:]``) where shape
   inference gave ``x`` static dims there become constants; then the
   optimizer runs again, and ``C // heads``, its ``Cast`` to float and the
   ``Pow(-0.5)`` fold with it.  A gathered dim that is symbolic stays a
   run-time ``Shape``.

Contract: the result computes the same function as the input on every input
(the passes only fold and remove what does not depend on the data); graph
input and output names, types and dims are kept.  It is an ordinary ONNX
model: the reader checks it as it checks any file.  A failure inside the
optimizer is reported as ``SimplifyError`` naming the node it stopped at;
the caller may then read the unsimplified model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.optimizer import optimize_ir

#: no size limit on folding a node whose inputs are all constants (elements)
FOLD_SIZE_LIMIT = 1 << 31
#: optimizer runs at most, each after a round of ``fold_static_dims`` that changed something
MAX_ROUNDS = 8
DEFAULT_DOMAINS = ("", "ai.onnx")


class SimplifyError(ValueError):
    """The optimizer failed on the model; the message names the node where it stopped."""


def _fold_constant_inputs(node: ir.Node) -> bool | None:
    """Fold every all-constant node, whatever its size; None leaves the optimizer's rules in charge."""
    if all(value is None or value.const_value is not None for value in node.inputs):
        return True
    return None


def fold_static_dims(model: ir.Model) -> int:
    """Replace each ``Gather`` / ``Slice`` of a ``Shape(x)`` that reads only static dims of ``x`` by a constant.

    Returns how many were replaced.  The ``Gather`` index, or the ``Slice`` starts, ends, axes and steps,
    must be constants; a read that reaches a symbolic dim is left to run.
    """
    count = 0
    for node in list(model.graph):
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in ("Gather", "Slice") or not node.inputs:
            continue
        data = node.inputs[0]
        shape_node = data.producer() if data is not None else None
        if shape_node is None or shape_node.op_type != "Shape" or shape_node.domain not in DEFAULT_DOMAINS:
            continue
        source = shape_node.inputs[0]
        if source is None or source.shape is None:
            continue
        params = [_constant(v) for v in node.inputs[1:]]
        if any(p is None for p in params) or node.outputs[0].is_graph_output():
            continue
        dims = np.array(list(source.shape)[_shape_slice(shape_node, len(source.shape))], dtype=object)
        picked = _read_dims(node.op_type, dims, params)
        if picked is None or not all(isinstance(d, int) for d in picked.reshape(-1)):
            continue
        constant = ir.node(
            "Constant", [], attributes={"value": ir.tensor(picked.astype(np.int64))}, name=f"{node.name}_static"
        )
        model.graph.insert_before(node, constant)
        ir.convenience.replace_all_uses_with(node.outputs[0], constant.outputs[0])
        count += 1
    return count


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy().astype(np.int64)


def _read_dims(op_type: str, dims: np.ndarray, params: list[np.ndarray]) -> np.ndarray | None:
    """``Gather(dims, index)`` or ``Slice(dims, starts, ends[, axes, steps])`` of a 1-D dims array (object dtype)."""
    try:
        if op_type == "Gather":
            return np.array(np.take(dims, params[0]), dtype=object)
        starts, ends = params[0], params[1]
        steps = params[3] if len(params) > 3 else np.ones_like(starts)
        if starts.size != 1 or ends.size != 1 or steps.size != 1 or int(steps[0]) == 0:
            return None
        clip = np.iinfo(np.int64)  # ONNX's INT_MAX / INT_MIN sentinels: Python slicing clamps them the same way
        start, stop = int(max(min(starts[0], clip.max), clip.min)), int(max(min(ends[0], clip.max), clip.min))
        return np.array(dims[start : stop : int(steps[0])], dtype=object)
    except IndexError:
        return None  # out of range: left to fail at run time, as the model does


def _shape_slice(shape_node: ir.Node, rank: int) -> slice:
    """The dims a ``Shape`` node returns (its ``start`` / ``end`` attributes, opset 15+)."""
    start = shape_node.attributes.get("start")
    end = shape_node.attributes.get("end")
    return slice(start.as_int() if start is not None else 0, end.as_int() if end is not None else rank)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """A simplified copy of ``model`` (see the module docstring); ``model`` itself is not changed."""
    current = model
    try:
        for _ in range(MAX_ROUNDS):
            # ONNX's own inference with data propagation gives a Reshape whose target is computed from Shape
            # (the legacy exporter's reshapes) its static dims, which node-level inference leaves unknown
            ir_model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(current, data_prop=True))
            optimize_ir(
                ir_model,
                num_iterations=3,
                onnx_shape_inference=True,
                input_size_limit=FOLD_SIZE_LIMIT,
                output_size_limit=FOLD_SIZE_LIMIT,
                should_fold=_fold_constant_inputs,
            )
            folded = fold_static_dims(ir_model)
            before, current = len(current.graph.node), ir.serde.serialize_model(ir_model)
            if not folded and len(current.graph.node) == before:
                break  # a fixed point: the next inference can learn nothing new
    except Exception as exc:  # the optimizer raises RuntimeError naming the node; keep the one line
        cause = exc.__cause__ or exc
        raise SimplifyError(
            f"onnxscript's optimizer stopped on this model: {' '.join(str(exc).split())} "
            f"({type(cause).__name__}: {' '.join(str(cause).split())[:300]})"
        ) from exc
    out = current if current is not model else _copy(model)
    # the inferred intermediate types served the folding; the outputs keep the types the file declares
    del out.graph.value_info[:]
    declared = {o.name: o for o in model.graph.output}
    for output in out.graph.output:
        if output.name in declared:
            output.CopyFrom(declared[output.name])
    # keep the file's own identity for messages and reports
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    return out


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
