"""Integer-only verifier for ONNX models.

The integer region of a graph is every node reachable from a
``QuantizeLinear`` output or from an integer-typed graph input, stopping at
``DequantizeLinear``.  Functions (the ``intq`` ops) are inlined first, so
their bodies are checked too.  Inside the region every value must have an
integer (or boolean) type; a node that produces a floating-point value there
is a violation, reported with its name and op type.  Shape computations on
float inputs (``Shape(x)``) lie outside the region: they start from a float
input, not from a quantizer.
"""

from __future__ import annotations

import onnx
import onnx.inliner  # a submodule: `import onnx` alone does not load it
from onnx import TensorProto

FLOAT_TYPES = {
    TensorProto.FLOAT,
    TensorProto.DOUBLE,
    TensorProto.FLOAT16,
    TensorProto.BFLOAT16,
}
INTEGER_TYPES = {
    TensorProto.INT4,  # packed 4-bit weights, cast to int8 before use
    TensorProto.UINT4,
    TensorProto.INT8,
    TensorProto.UINT8,
    TensorProto.INT16,
    TensorProto.UINT16,
    TensorProto.INT32,
    TensorProto.UINT32,
    TensorProto.INT64,
    TensorProto.UINT64,
    TensorProto.BOOL,
}


class IntegerOnlyError(ValueError):
    """A float operation sits between the input quantizer and the output dequantizer."""


def float_ops_in_integer_region(model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """``(node name, op type, value)`` for every float-producing node in the integer region."""
    inlined = onnx.inliner.inline_local_functions(model)
    inferred = onnx.shape_inference.infer_shapes(inlined)
    g = inferred.graph
    types = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    tainted = {i.name for i in g.input if types.get(i.name) in INTEGER_TYPES}
    violations = []
    for node in g.node:
        if node.op_type == "QuantizeLinear":
            tainted.update(node.output)
            continue
        if node.op_type == "DequantizeLinear":
            continue
        if not any(i in tainted for i in node.input if i):
            continue
        for out in node.output:
            if not out:
                continue
            t = types.get(out)
            if t in (None, TensorProto.UNDEFINED):
                t = types[out] = _fallback_type(node, types)
            if t in FLOAT_TYPES or t is None or t == TensorProto.UNDEFINED:
                kind = "unknown type" if t in (None, TensorProto.UNDEFINED) else TensorProto.DataType.Name(t)
                violations.append((node.name or "(unnamed)", node.op_type, f"{out}: {kind}"))
            tainted.add(out)  # keep following the value: every float op downstream is reported too
    return violations


_INT32_OUT = {"MatMulInteger", "ConvInteger"}
_BOOL_OUT = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"}


def _fallback_type(node, types) -> int | None:
    """Element type where shape inference gave none (e.g. inside inlined functions with unknown ranks)."""
    if node.op_type in _INT32_OUT:
        return TensorProto.INT32
    if node.op_type in _BOOL_OUT:
        return TensorProto.BOOL
    if node.op_type in ("Shape", "Size"):
        return TensorProto.INT64
    if node.op_type == "Cast":
        return next(a.i for a in node.attribute if a.name == "to")
    if node.op_type == "Where":
        return types.get(node.input[1])
    first = next((i for i in node.input if i), None)
    return types.get(first) if first else None


def verify_integer_only(model: onnx.ModelProto) -> None:
    """Raise ``IntegerOnlyError`` naming every float op inside the integer region."""
    bad = float_ops_in_integer_region(model)
    if bad:
        lines = "\n".join(f"  - node {n!r} ({op}) produces {v}" for n, op, v in bad)
        raise IntegerOnlyError(
            f"The model is not integer-only: {len(bad)} node(s) between the input quantizer and the output "
            f"dequantizer produce floating-point values:\n{lines}"
        )
