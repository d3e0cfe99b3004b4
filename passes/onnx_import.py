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
it whose ``op_type`` is the node's, which the converter parses.  Likewise an
op type with a clamp range suffix (``Requantize_c0x15``, ``IntConv2d_..._cm8x7``,
``passes/ops/base.py``) reaches its op's converter, bound to the range, when
that converter takes one (``ranged_dtype``).  A node of any other
non-default domain, an ``intq`` op without a converter, or a standard op the
frontend lacks is refused before import, all of them named in one error.

Packed 4-bit weights: the ONNX writer stores a 4-bit param as an INT4
initializer (two per byte, low nibble first) read through a standard
``Cast(to=INT8)``.  The copy replaces each such pair by a UINT8 initializer
``<name>.packed`` holding the same bytes and an ``intq`` node
``UnpackInt4(shape=...)`` (``passes/ops/unpack_int4.py``) with the Cast's
output (``unpack_int4_initializers``), so the compiled module stores the
packed bytes and unpacks them at run time.  An INT4 / UINT4 initializer read
any other way is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from intq.passes import checked_ops, compat
from intq.passes.ops import CONVERTERS, INTQ_DOMAIN, IntqConverter
from intq.passes.ops.base import split_range_suffix
from intq.passes.ops.unpack_int4 import pack_int4

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
    """The converter of an ``intq`` op type, else None.

    Its own entry; else, for ``<op>_c<lo>x<hi>``, the converter of ``<op>``
    if it takes a clamp range (``ranged_dtype``), bound to the range; else
    its family's (``configured_by_name``).  A converter reached other than
    by its own entry is a subclass whose ``op_type`` is the node's.
    """
    if op_type in converters:
        return converters[op_type]
    base, qmin, qmax = split_range_suffix(op_type)
    if qmin is not None:
        cls = converter_for(base, converters)
        if cls is None or getattr(cls, "ranged_dtype", None) is None:
            return None
        return type(
            cls.__name__, (cls,), {"op_type": op_type, "clamp_range": (qmin, qmax), "__module__": cls.__module__}
        )
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
    unpack_int4_initializers(prepared)
    intq_types = {node.op_type for node in prepared.graph.node if node.domain == INTQ_DOMAIN}
    for node in prepared.graph.node:
        if node.domain == INTQ_DOMAIN:
            node.name = node.name or node.output[0]
            node.op_type = converter_key(node.op_type)

    extra = {converter_key(op): converter_for(op, converters) for op in intq_types}
    with compat.extended_convert_map(extra, overrides=checked_ops.OVERRIDES):
        mod = compat.from_onnx(prepared)
    # The frontend sanitizes parameter names ("input.1" -> "input_1"); keep the ONNX ones for feeding.
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    mod["main"] = mod["main"].with_attrs({INPUT_NAMES_ATTR: names})
    return mod


def unpack_int4_initializers(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each ``INT4 initializer -> Cast(to=INT8)`` into ``UINT8 initializer -> UnpackInt4``.

    Returns how many Casts were rewritten; ``OnnxImportError`` names an INT4
    / UINT4 initializer that is read other than by such a Cast.
    """
    graph = model.graph
    narrow = {t.name: t for t in graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)}
    if not narrow:
        return 0
    rewritten: dict[str, str] = {}  # INT4 initializer -> its packed UINT8 initializer
    others: dict[str, str] = {}  # INT4 initializer -> a node reading it otherwise
    nodes, casts = [], 0
    for node in graph.node:
        sources = [name for name in node.input if name in narrow]
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if sources and (
            node.op_type != "Cast"
            or (node.domain or "") not in DEFAULT_DOMAINS
            or to != onnx.TensorProto.INT8
            or narrow[sources[0]].data_type != onnx.TensorProto.INT4
            or not narrow[sources[0]].dims
        ):
            others.setdefault(sources[0], node.name or node.output[0])
        if not sources or sources[0] in others:
            nodes.append(onnx.NodeProto())
            nodes[-1].CopyFrom(node)
            continue
        source = sources[0]
        if source not in rewritten:
            values = numpy_helper.to_array(narrow[source]).astype(np.int8)
            rewritten[source] = f"{source}.packed"
            graph.initializer.append(numpy_helper.from_array(pack_int4(values), rewritten[source]))
        casts += 1
        nodes.append(
            helper.make_node(
                "UnpackInt4",
                [rewritten[source]],
                list(node.output),
                name=node.name or node.output[0],
                domain=INTQ_DOMAIN,
                shape=list(narrow[source].dims),
            )
        )
    if others:
        listing = ", ".join(f"{init!r} (read by {node!r})" for init, node in sorted(others.items()))
        raise OnnxImportError(
            f"ONNX graph {graph.name!r}: the packed 4-bit initializers {listing} are read other than by a "
            "Cast(to=INT8) of an INT4 tensor of rank >= 1, the only form the TVM import unpacks: re-export the model"
        )
    del graph.node[:]
    graph.node.extend(nodes)
    for name in rewritten:
        graph.initializer.remove(narrow[name])
    if not any(op.domain == INTQ_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(INTQ_DOMAIN, SUPPORTED_INTQ_VERSION))
    return casts


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
