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
   k)`` (the legacy exporter's ``x.shape[k]``, ``x.size(-1)``) where shape
   inference gave ``x`` a static dim ``k`` becomes that constant; then the
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
MAX_ROUNDS = 4
DEFAULT_DOMAINS = ("", "ai.onnx")


class SimplifyError(ValueError):
    """The optimizer failed on the model; the message names the node where it stopped."""


def _fold_constant_inputs(node: ir.Node) -> bool | None:
    """Fold every all-constant node, whatever its size; None leaves the optimizer's rules in charge."""
    if all(value is None or value.const_value is not None for value in node.inputs):
        return True
    return None


def fold_static_dims(model: ir.Model) -> int:
    """Replace each ``Gather(Shape(x), k)`` whose gathered dims of ``x`` are static by a constant; how many."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Gather" or node.domain not in DEFAULT_DOMAINS or len(node.inputs) != 2:
            continue
        data, index = node.inputs
        shape_node = data.producer() if data is not None else None
        if shape_node is None or shape_node.op_type != "Shape" or shape_node.domain not in DEFAULT_DOMAINS:
            continue
        source = shape_node.inputs[0]
        if source is None or source.shape is None or index is None or index.const_value is None:
            continue
        dims = list(source.shape)[_shape_slice(shape_node, len(source.shape))]
        try:
            picked = np.array(np.take(np.array(dims, dtype=object), index.const_value.numpy().astype(np.int64)), object)
        except IndexError:
            continue  # out of range: leave it to fail at run time, as the model does
        if not all(isinstance(d, int) for d in picked.reshape(-1)):
            continue
        value = ir.tensor(picked.astype(np.int64))
        constant = ir.node("Constant", [], attributes={"value": value}, name=f"{node.name}_static")
        model.graph.insert_before(node, constant)
        ir.convenience.replace_all_uses_with(node.outputs[0], constant.outputs[0])
        if node.outputs[0].is_graph_output():
            continue  # kept: a graph output's name must stay
        count += 1
    return count


def _shape_slice(shape_node: ir.Node, rank: int) -> slice:
    """The dims a ``Shape`` node returns (its ``start`` / ``end`` attributes, opset 15+)."""
    start = shape_node.attributes.get("start")
    end = shape_node.attributes.get("end")
    return slice(start.as_int() if start is not None else 0, end.as_int() if end is not None else rank)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """A simplified copy of ``model`` (see the module docstring); ``model`` itself is not changed."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    ir_model = ir.serde.deserialize_model(copy)
    try:
        for _ in range(MAX_ROUNDS):
            optimize_ir(
                ir_model,
                num_iterations=3,
                onnx_shape_inference=True,
                input_size_limit=FOLD_SIZE_LIMIT,
                output_size_limit=FOLD_SIZE_LIMIT,
                should_fold=_fold_constant_inputs,
            )
            if not fold_static_dims(ir_model):
                break
    except Exception as exc:  # the optimizer raises RuntimeError naming the node; keep the one line
        cause = exc.__cause__ or exc
        raise SimplifyError(
            f"onnxscript's optimizer stopped on this model: {' '.join(str(exc).split())} "
            f"({type(cause).__name__}: {' '.join(str(cause).split())[:300]})"
        ) from exc
    out = ir.serde.serialize_model(ir_model)
    # keep the file's own identity for messages and reports
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    return out
