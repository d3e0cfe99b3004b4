"""Read an ONNX model into a torch.fx GraphModule: one fx node per ONNX node.

This is intq's front door for ONNX files and for what
``torch.onnx.export(..., dynamo=True)`` produces. Every fx node stands for
exactly one ONNX node or value, so passes can match ONNX patterns on it, run
it in torch (each node's ``OnnxOp`` executes the ONNX semantics from
``onnx_torch_ops.IMPLS``), and the writer can turn each node back into the
same ONNX node.

The GraphModule contract:

- ``placeholder``: one per graph input, in order (graph inputs that also have
  an initializer are defaults, read as constants, not placeholders). Target
  is the input name made an identifier; ``meta["onnx_name"]`` the original.
- ``get_attr``: one per initializer or ``Constant`` value that something
  reads, created at its first use; the target is a registered buffer of the
  GraphModule (every initializer and Constant is registered, used or not).
  ``meta["onnx_name"]`` is the value name, ``meta["onnx_source"]`` is
  ``"initializer"`` or ``"Constant"`` (then ``meta["onnx_node"]`` is the
  Constant node's name). ``gm.meta["constants"]`` maps buffer name -> value
  name for all of them.
- ``call_module``: one per other ONNX node, its target an ``OnnxOp``
  submodule; args are the node's inputs in order, ``None`` for an empty
  optional input. ``meta["onnx_node"]`` is the node name. A node with one
  output is the value itself (``meta["onnx_name"]`` = the output name); a
  node with several outputs returns a tuple (``meta["onnx_name"]`` is None)
  read by one ``operator.getitem`` node per non-empty output name.
- every value node carries ``meta["onnx_type"]`` = ``{"elem_type", "shape"}``
  when the model declares the value's type (graph inputs and outputs,
  ``value_info``, initializers, Constants), else no such key.
- ``output``: a tuple of the graph outputs in order, even for one output.
- ``gm.meta``: ``inputs`` / ``outputs`` (lists of ``{"name", "elem_type",
  "shape"}``, shape a list of int, str for a symbolic dim, or None for an
  unknown dim; None for an unknown shape), ``opset`` (default domain),
  ``opset_imports`` (domain -> version), ``ir_version``, ``producer_name``,
  ``producer_version``, ``graph_name``, ``source`` (the path, or
  ``"<ModelProto>"``), ``constants``.

Reading checks, in order: the file exists and parses as an ONNX model;
external data is present; default-domain opset 13-21; nodes topologically
sorted and every input defined; ``onnx.checker.check_model``; every op
supported (one error lists them all). Model-local functions are inlined
first, so a node of the ``intq`` domain reads as its standard-op body.
With ``simplify=True`` (what ``quantize`` reads with) the model is first
simplified (``quantizer/simplify.py``: shape arithmetic and constant
subgraphs folded, dead nodes removed), so an op that only computed a
constant is not refused. Every
failure is an ``OnnxReadError`` with one paragraph that names the file, the
node or tensor, and what to do.
"""

from __future__ import annotations

import builtins
import keyword
import operator
import os
import re
import warnings
from typing import Any

import onnx
import onnx.inliner
import torch
import torch.fx
from onnx import AttributeProto, external_data_helper, helper, numpy_helper

from intq.export.onnx_torch_ops import IMPLS, constant_value, tensor_from_numpy

MIN_OPSET = 13
MAX_OPSET = 21
DEFAULT_DOMAINS = ("", "ai.onnx")
CONTROL_FLOW = ("If", "Loop", "Scan")
_TWO_GB = 2**31


class OnnxReadError(ValueError):
    """An ONNX model intq cannot read; the message says which part and what to do."""


class OnnxOp(torch.nn.Module):
    """One ONNX node, run in torch with ONNX semantics.

    Attributes: ``op_type``, ``domain``, ``onnx_name`` (node name),
    ``input_names`` / ``output_names`` (ONNX value names, ``""`` for an
    omitted optional one), ``attrs`` (name -> Python value; strings decoded,
    tensors as numpy), ``attribute_protos`` (copies of the original
    AttributeProtos, for writing the node back unchanged), ``opset`` (the
    model's default-domain opset), ``input_elem_types`` (ONNX elem type per
    input where the model declares it, else None), ``metadata_props``.
    """

    def __init__(self, node: onnx.NodeProto, opset: int = MAX_OPSET, input_elem_types: list[int | None] | None = None):
        super().__init__()
        self.op_type = node.op_type
        self.domain = node.domain
        self.onnx_name = node.name
        self.input_names = list(node.input)
        self.output_names = list(node.output)
        self.opset = opset
        self.attribute_protos = [_copy_attribute(a) for a in node.attribute]
        self.attrs = {a.name: attribute_value(a) for a in node.attribute}
        self.metadata_props = {p.key: p.value for p in node.metadata_props}
        self.input_elem_types = list(input_elem_types) if input_elem_types else [None] * len(self.input_names)

    def forward(self, *inputs):
        impl = IMPLS.get(self.op_type) if self.domain in DEFAULT_DOMAINS else None
        if impl is None:
            raise NotImplementedError(f"ONNX node {self.onnx_name!r}: no torch implementation of {self._what()}")
        try:
            out = impl(self, *inputs)
        except Exception as exc:
            exc.add_note(f"while running ONNX node {self.onnx_name!r}: {self._what()}")
            raise
        if len(self.output_names) > 1:
            out = out if isinstance(out, tuple) else (out,)
            return tuple(out) + (None,) * (len(self.output_names) - len(out))
        return out[0] if isinstance(out, tuple) else out

    def _what(self) -> str:
        return f"{self.op_type} (domain {self.domain or 'ai.onnx'!r})"

    def extra_repr(self) -> str:
        return f"{self.op_type}, name={self.onnx_name!r}, opset={self.opset}"


def attribute_value(attr: AttributeProto) -> Any:
    """A node attribute as a Python value: str for strings, numpy for tensors."""
    value = helper.get_attribute_value(attr)
    if attr.type == AttributeProto.STRING:
        return value.decode("utf-8", errors="replace")
    if attr.type == AttributeProto.STRINGS:
        return [v.decode("utf-8", errors="replace") for v in value]
    if attr.type == AttributeProto.TENSOR:
        return numpy_helper.to_array(value)
    if attr.type == AttributeProto.TENSORS:
        return [numpy_helper.to_array(v) for v in value]
    if attr.type in (AttributeProto.INTS, AttributeProto.FLOATS):
        return list(value)
    return value


def _copy_attribute(attr: AttributeProto) -> AttributeProto:
    out = AttributeProto()
    out.CopyFrom(attr)
    return out


def read_onnx(model: str | os.PathLike | onnx.ModelProto, simplify: bool = False) -> torch.fx.GraphModule:
    """Read ``model`` (a path or a ModelProto) into a GraphModule; see the module docstring.

    ``simplify``: first fold what does not depend on the data (``quantizer/simplify.py``); the graph
    then has one fx node per node of the simplified model.
    """
    proto, source, path = _load(model)
    opset = _default_opset(proto, source)
    _check_topology(proto.graph, source)
    _run_checker(proto, source, path)
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    if simplify:
        proto = _simplified(proto, source)
    _check_supported(proto.graph, source)
    return _Builder(proto, source, opset).build()


# ---------------------------------------------------------------- loading and checks


def _load(model) -> tuple[onnx.ModelProto, str, str | None]:
    if isinstance(model, onnx.ModelProto):
        _require_external_data(model, "<ModelProto>", None)
        return model, "<ModelProto>", None
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"read_onnx takes a path or an onnx.ModelProto, not {type(model).__name__}")
    path = os.fspath(model)
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        raise OnnxReadError(
            f"cannot read ONNX model {path!r}: the path {what}. "
            f"Check the path (a relative path is taken from {os.getcwd()!r})."
        )
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-like errors or OSError
        raise OnnxReadError(
            f"{path!r} could not be parsed as ONNX ({type(exc).__name__}: {_one_line(exc)}). "
            "The file is corrupt or is not an ONNX model; export or download it again."
        ) from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise OnnxReadError(
            f"{path!r} could not be parsed as ONNX: it decodes as a protobuf message but has no IR version, "
            "graph or opset import, so it is not an ONNX model. Export or download it again."
        )
    _require_external_data(proto, path, os.path.dirname(os.path.abspath(path)))
    return proto, path, path


def _external_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                yield attr.t


def _require_external_data(model: onnx.ModelProto, source: str, base_dir: str | None) -> None:
    """Load tensors stored outside the model file, or say which ones are missing."""
    external = [t for t in _external_tensors(model.graph) if external_data_helper.uses_external_data(t)]
    if not external:
        return
    if base_dir is None:
        names = ", ".join(repr(t.name) for t in external[:10]) + (" ..." if len(external) > 10 else "")
        raise OnnxReadError(
            f"{source}: {len(external)} tensor(s) keep their data in external files that were not loaded "
            f"({names}), and a ModelProto does not say where they are. Pass the .onnx file's path to "
            "read_onnx instead, or load the model with onnx.load(path), which loads the external data."
        )
    missing = []
    for t in external:
        location = external_data_helper.ExternalDataInfo(t).location
        if not os.path.isfile(os.path.join(base_dir, location)):
            missing.append(f"{t.name!r} (expected in {os.path.join(base_dir, location)!r})")
    if missing:
        raise OnnxReadError(
            f"{source}: {len(missing)} tensor(s) keep their data in external files that cannot be found: "
            f"{', '.join(missing)}. Put the data file(s) next to the model, at the relative location recorded "
            "in it, or save the model with its data inside (onnx.save(model, path, save_as_external_data=False))."
        )
    try:
        external_data_helper.load_external_data_for_model(model, base_dir)
    except Exception as exc:
        raise OnnxReadError(
            f"{source}: the external tensor data could not be loaded ({type(exc).__name__}: {_one_line(exc)}). "
            "The data file is truncated or does not match the model; save the model and its data again."
        ) from None


def _default_opset(model: onnx.ModelProto, source: str) -> int:
    versions = {imp.domain: imp.version for imp in model.opset_import}
    opset = versions.get("", versions.get("ai.onnx"))
    if opset is None:
        raise OnnxReadError(
            f"{source}: the model imports no opset for the default ONNX domain, so its standard operators "
            "have no defined semantics. Re-export it with a default-domain opset between "
            f"{MIN_OPSET} and {MAX_OPSET}."
        )
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxReadError(
            f"{source}: the model uses default-domain opset {opset}; intq reads opsets {MIN_OPSET} to "
            f"{MAX_OPSET}. Re-export it with opset_version={MAX_OPSET} (torch.onnx.export(..., "
            f"opset_version={MAX_OPSET})), or convert it with onnx.version_converter.convert_version(model, "
            f"{MAX_OPSET})."
        )
    return opset


def _node_label(node: onnx.NodeProto, index: int) -> str:
    if node.name:
        return repr(node.name)
    return f"#{index} (unnamed, output {node.output[0]!r})" if node.output else f"#{index} (unnamed)"


def _check_topology(graph: onnx.GraphProto, source: str) -> None:
    defined = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in defined:
                if name in producer:
                    raise OnnxReadError(
                        f"{source}: node {_node_label(node, i)} ({node.op_type}) reads {name!r}, which node "
                        f"{_node_label(graph.node[producer[name]], producer[name])} produces later: the nodes are "
                        "not in topological order, as ONNX requires. Re-export the model, or sort its nodes "
                        "topologically before reading it."
                    )
                raise OnnxReadError(
                    f"{source}: node {_node_label(node, i)} ({node.op_type}) reads {name!r}, which no graph input, "
                    "initializer or node produces. The model is incomplete; re-export it."
                )
        defined.update(out for out in node.output if out)
    for vi in graph.output:
        if vi.name not in defined:
            raise OnnxReadError(
                f"{source}: graph output {vi.name!r} is produced by no node, input or initializer. "
                "The model is incomplete; re-export it."
            )


def _run_checker(model: onnx.ModelProto, source: str, path: str | None) -> None:
    try:
        if path is not None and model.ByteSize() >= _TWO_GB:
            onnx.checker.check_model(path)  # the path form handles models past the 2 GB protobuf limit
        else:
            onnx.checker.check_model(model.SerializeToString())  # a copy: the caller's model is not touched
    except Exception as exc:
        raise OnnxReadError(
            f"{source}: onnx.checker.check_model rejects the model: {_one_line(exc)}. "
            "Fix or re-export the model so that the ONNX checker accepts it."
        ) from None


def _check_supported(graph: onnx.GraphProto, source: str) -> None:
    bad = []
    control_flow = False
    for i, node in enumerate(graph.node):
        subgraph = any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute)
        if node.domain in DEFAULT_DOMAINS and node.op_type in IMPLS and not subgraph:
            continue
        control_flow = control_flow or subgraph or node.op_type in CONTROL_FLOW
        bad.append(f"{_node_label(node, i)} ({node.op_type}, domain {node.domain or 'ai.onnx'!r})")
    if not bad:
        return
    hint = (
        " Control flow (If, Loop, Scan and other ops with subgraphs) is not read: export the model with "
        "its loops unrolled and branches resolved."
        if control_flow
        else ""
    )
    raise OnnxReadError(
        f"{source}: {len(bad)} node(s) use operators that intq cannot read: {', '.join(bad)}.{hint} "
        f"Re-export the model with standard ONNX operators (default domain, opset {MIN_OPSET}-{MAX_OPSET}; "
        "for a torch model, torch.onnx.export(..., dynamo=True) without custom translations), or file an "
        "issue naming each operator listed above (op type and domain) so that intq can support it."
    )


def _simplified(proto: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """``simplify(proto)``, or ``proto`` itself with a warning when the optimizer fails on it."""
    from intq.quantizer.simplify import SimplifyError, simplify

    try:
        return simplify(proto)
    except SimplifyError as exc:
        warnings.warn(f"{source}: reading the model unsimplified: {exc}", stacklevel=3)
        return proto


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------- building the GraphModule


def _value_type(vi: onnx.ValueInfoProto) -> dict[str, Any] | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    shape = None
    if tt.HasField("shape"):
        shape = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
            for d in tt.shape.dim
        ]
    return {"elem_type": tt.elem_type, "shape": shape}


class _Namer:
    """Unique Python identifiers derived from ONNX names, avoiding GraphModule attributes and builtins."""

    RESERVED = set(dir(torch.fx.GraphModule)) | set(dir(builtins)) | {"self", "torch", "getitem", "operator"}

    def __init__(self):
        self.used = set(self.RESERVED)

    def __call__(self, hint: str) -> str:
        base = re.sub(r"\W", "_", hint).strip("_") or "v"
        if base[0].isdigit() or keyword.iskeyword(base):
            base = f"v_{base}"
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


class _Builder:
    def __init__(self, model: onnx.ModelProto, source: str, opset: int):
        self.model = model
        self.graph_proto = model.graph
        self.source = source
        self.opset = opset
        self.graph = torch.fx.Graph()
        self.root = torch.nn.Module()
        self.namer = _Namer()
        self.env: dict[str, torch.fx.Node] = {}
        self.pending: dict[str, tuple[str, dict[str, Any]]] = {}  # value name -> (buffer name, get_attr meta)
        self.constants: dict[str, str] = {}
        self.types: dict[str, dict[str, Any]] = {}
        for vi in [*self.graph_proto.input, *self.graph_proto.value_info, *self.graph_proto.output]:
            declared = _value_type(vi)
            if declared is not None:
                self.types[vi.name] = declared

    def build(self) -> torch.fx.GraphModule:
        g = self.graph_proto
        initializer_names = {t.name for t in g.initializer}
        for t in g.initializer:
            self._add_constant(
                t.name, self._tensor(t, f"initializer {t.name!r}"), t.data_type, {"onnx_source": "initializer"}
            )
        inputs = []
        for vi in g.input:
            if vi.name in initializer_names:
                continue  # an input with a default value: read as the constant, as onnxruntime's get_inputs() does
            declared = _value_type(vi)
            if declared is None:
                raise OnnxReadError(
                    f"{self.source}: graph input {vi.name!r} is not a tensor (sequence, map or optional types are "
                    "not supported). Re-export the model with tensor inputs."
                )
            node = self.graph.placeholder(self.namer(vi.name))
            self._annotate(node, vi.name)
            inputs.append({"name": vi.name, **declared})
        for i, node in enumerate(g.node):
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                self._add_constant_node(node, i)
            else:
                self._add_op(node, i)
        self.graph.output(tuple(self._value(vi.name) for vi in g.output))
        self.graph.lint()
        gm = torch.fx.GraphModule(self.root, self.graph, class_name="OnnxGraphModule")
        for name, buf in self.root.named_buffers():
            if not hasattr(gm, name):  # unused constants: GraphModule copies only what the graph reads
                gm.register_buffer(name, buf)
        gm.meta.update(
            inputs=inputs,
            outputs=[{"name": vi.name, **(_value_type(vi) or {"elem_type": None, "shape": None})} for vi in g.output],
            opset=self.opset,
            opset_imports={imp.domain: imp.version for imp in self.model.opset_import},
            ir_version=self.model.ir_version,
            producer_name=self.model.producer_name,
            producer_version=self.model.producer_version,
            graph_name=g.name,
            source=self.source,
            constants=dict(self.constants),
        )
        return gm

    def _tensor(self, proto: onnx.TensorProto, what: str) -> torch.Tensor:
        try:
            return tensor_from_numpy(numpy_helper.to_array(proto))
        except Exception as exc:
            raise OnnxReadError(
                f"{self.source}: {what} cannot be read as a torch tensor ({_one_line(exc)}). intq reads numeric "
                "and boolean tensors; re-export the model without it."
            ) from None

    def _add_constant(self, value_name: str, tensor: torch.Tensor, elem_type: int, meta: dict[str, Any]) -> None:
        buffer = self.namer(value_name)
        self.root.register_buffer(buffer, tensor)
        self.constants[buffer] = value_name
        self.types.setdefault(value_name, {"elem_type": elem_type, "shape": list(tensor.shape)})
        self.pending[value_name] = (buffer, meta)

    def _add_constant_node(self, node: onnx.NodeProto, index: int) -> None:
        attrs = {a.name: a for a in node.attribute}
        label = f"Constant node {_node_label(node, index)}"
        if "value" in attrs:
            tensor = self._tensor(attrs["value"].t, label)
            elem_type = attrs["value"].t.data_type
        else:
            try:
                tensor = constant_value({k: attribute_value(a) for k, a in attrs.items()})
            except ValueError as exc:
                raise OnnxReadError(f"{self.source}: {label}: {exc}. Re-export the model without it.") from None
            elem_type = onnx.TensorProto.FLOAT if tensor.dtype == torch.float32 else onnx.TensorProto.INT64
        self._add_constant(node.output[0], tensor, elem_type, {"onnx_source": "Constant", "onnx_node": node.name})

    def _value(self, name: str) -> torch.fx.Node:
        if name not in self.env:
            buffer, meta = self.pending[name]  # _check_topology guarantees every read is defined
            node = self.graph.create_node("get_attr", buffer, name=name)
            node.meta.update(meta)
            self._annotate(node, name)
        return self.env[name]

    def _annotate(self, node: torch.fx.Node, value_name: str) -> None:
        node.meta["onnx_name"] = value_name
        if value_name in self.types:
            node.meta["onnx_type"] = self.types[value_name]
        self.env[value_name] = node

    def _add_op(self, node: onnx.NodeProto, index: int) -> None:
        args = tuple(self._value(name) if name else None for name in node.input)
        elem_types = [self.types.get(name, {}).get("elem_type") if name else None for name in node.input]
        module = self.namer(node.name or node.op_type)
        self.root.add_module(module, OnnxOp(node, self.opset, elem_types))
        outputs = list(node.output)
        if len(outputs) == 1:
            call = self.graph.create_node("call_module", module, args, name=outputs[0])
            call.meta["onnx_node"] = node.name
            self._annotate(call, outputs[0])
            return
        call = self.graph.create_node("call_module", module, args, name=module)
        call.meta["onnx_node"] = node.name
        call.meta["onnx_name"] = None
        for i, out in enumerate(outputs):
            if out:
                item = self.graph.create_node("call_function", operator.getitem, (call, i), name=out)
                self._annotate(item, out)
