"""Import an integer-only ``intq`` ONNX model into a TVM Relax module.

Contract: the model's default-domain nodes are converted by TVM's own ONNX
frontend; each node of the ``intq`` domain becomes a ``call_tir`` of one
PrimFunc built by our converter (``passes/ops/``).  The model-local
functions (``model.functions``, the ONNX bodies onnxruntime runs) are not
imported: the frontend never reads them, neither to inline nor to call.

How the converters reach the frontend (TVM 0.27): ``from_onnx`` dispatches a
node on its ``op_type`` only, through the module-level ``_get_convert_map()``;
a node's domain is ignored, so an ``intq`` node named like a standard op
would silently take the standard converter.  We therefore work on a copy of
the model in which

1. every ``intq`` node's ``op_type`` becomes ``"intq::<op_type>"`` (a key
   no standard op can have; its domain field stays ``intq``),
2. ``model.functions`` is emptied (nothing references the renamed types),
3. every unnamed ``intq`` node is named after its first output, so that
   errors name it,

and import it while ``compat.extended_convert_map`` serves those keys.  An op
family whose instances carry their configuration in the op type
(``IntConv2d_s2x2_p0x0x1x1_d1x1_g1``, see ``quantizer/ops/conv.py``) is
registered once under its family name with ``configured_by_name = True``;
``converter_for`` routes every ``<family>_<config>`` op type to a subclass of
it whose ``op_type`` is the node's, which the converter parses.  A node
of any other non-default domain, an ``intq`` op without a converter, or a
standard op the frontend lacks is refused before import, all of them named
in one error.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from intq.passes import compat
from intq.passes.ops import CONVERTERS, INTQ_DOMAIN, IntqConverter

DEFAULT_DOMAINS = ("", "ai.onnx")
SUPPORTED_INTQ_VERSION = 1
INPUT_NAMES_ATTR = "intq.onnx_input_names"  # attr of main: the ONNX graph input names, in parameter order
_FRONTEND_OWN_OPS = frozenset({"If", "Constant"})  # handled by the importer outside the convert map


class OnnxImportError(NotImplementedError):
    """The model holds nodes that the TVM import cannot convert; the message lists them."""


def converter_key(op_type: str) -> str:
    """The convert-map key of an ``intq`` op type (``"intq::IntLinear"``)."""
    return f"{INTQ_DOMAIN}::{op_type}"


def converter_for(op_type: str, converters: Mapping[str, type[IntqConverter]]) -> type[IntqConverter] | None:
    """The converter of an ``intq`` op type: its own entry, else its family's bound to it, else None."""
    if op_type in converters:
        return converters[op_type]
    family, sep, _ = op_type.partition("_")
    cls = converters.get(family)
    if not sep or cls is None or not getattr(cls, "configured_by_name", False):
        return None
    return type(cls.__name__, (cls,), {"op_type": op_type, "__module__": cls.__module__})


def unsupported_nodes(
    model: onnx.ModelProto, converters: Mapping[str, type[IntqConverter]] = CONVERTERS
) -> dict[str, list[str]]:
    """``{"<domain>.<op_type>": [node names]}`` for every node the import would refuse."""
    standard = set(compat.frontend_convert_map()) | _FRONTEND_OWN_OPS
    missing: dict[str, list[str]] = {}
    for node in model.graph.node:
        domain = node.domain or ""
        if domain == INTQ_DOMAIN:
            ok = converter_for(node.op_type, converters) is not None
        elif domain in DEFAULT_DOMAINS:
            ok = node.op_type in standard
        else:
            ok = False
        if not ok:
            missing.setdefault(f"{domain or 'ai.onnx'}.{node.op_type}", []).append(node.name or node.output[0])
    return missing


def import_onnx(
    model: onnx.ModelProto, converters: Mapping[str, type[IntqConverter]] | None = None
) -> compat.tvm.IRModule:
    """A Relax ``IRModule`` whose ``main`` computes ``model``; graph inputs keep their symbolic dims.

    ``converters`` maps ``intq`` op types to converter classes (default: every
    lowering in ``passes/ops``).
    """
    converters = CONVERTERS if converters is None else converters
    _check_opsets(model)
    missing = unsupported_nodes(model, converters)
    if missing:
        listing = "; ".join(f"{op} ({len(names)}x: {', '.join(names[:3])})" for op, names in sorted(missing.items()))
        raise OnnxImportError(
            f"cannot import ONNX graph {model.graph.name!r} into TVM: no conversion for {listing}. "
            "intq ops need a lowering in passes/ops/; other ops need TVM's ONNX frontend to support them"
        )

    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    del prepared.functions[:]
    for node in prepared.graph.node:
        if node.domain == INTQ_DOMAIN:
            node.name = node.name or node.output[0]
            node.op_type = converter_key(node.op_type)

    intq_types = {node.op_type for node in model.graph.node if node.domain == INTQ_DOMAIN}
    extra = {converter_key(op): converter_for(op, converters) for op in intq_types}
    with compat.extended_convert_map(extra):
        mod = compat.from_onnx(prepared)
    # The frontend sanitizes parameter names ("input.1" -> "input_1"); keep the ONNX ones for feeding.
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    mod["main"] = mod["main"].with_attrs({INPUT_NAMES_ATTR: names})
    return mod


def _check_opsets(model: onnx.ModelProto) -> None:
    for opset in model.opset_import:
        if opset.domain == INTQ_DOMAIN and opset.version != SUPPORTED_INTQ_VERSION:
            raise OnnxImportError(
                f"ONNX graph {model.graph.name!r} imports the {INTQ_DOMAIN!r} domain at version {opset.version}; "
                f"this TVM lowering implements version {SUPPORTED_INTQ_VERSION} only: re-export the model"
            )
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) and any(
                n.domain == INTQ_DOMAIN for g in (list(attr.graphs) + [attr.g]) for n in g.node
            ):
                raise OnnxImportError(
                    f"node {node.name or node.output[0]!r} ({node.op_type}) holds {INTQ_DOMAIN} ops in a subgraph; "
                    "only top-level intq nodes are lowered"
                )
