"""Write an integer fx graph (``quantizer.convert``) as an integer-only ONNX model.

- ``OnnxOp`` nodes (shape and movement ops kept from the source model) are
  written back as the same ONNX node, attributes unchanged;
- ``IntegerOp`` modules become nodes of the ``intq`` domain whose
  definitions ship in the model as ONNX functions (so onnxruntime runs the
  file as is and Netron shows each op as one box), their constant inputs as
  initializers named ``<layer>.<param>`` (a 4-bit param: a packed INT4
  initializer ``<layer>.<param>.int4`` and a ``Cast`` to INT8 in the main
  graph, see ``quantizer.ops.onnx_fn.param_inputs``);
- ``Quantize`` / ``Dequantize`` become ``QuantizeLinear`` /
  ``DequantizeLinear``, the only float ops, at the graph's edges; the
  quantizer is preceded by ``IsNaN -> Where`` (NaN -> 0, see
  ``quantizer.ops.boundary``), on the float side.

With ``integer_outputs=True`` the output dequantizers are left out and the
graph returns the integers themselves (for bit-exact comparisons).
"""

from __future__ import annotations

import operator

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper

from intq.export.onnx_reader import OnnxOp
from intq.quantizer.ops.base import INTQ_DOMAIN, ONNX_OPSET, IntegerOp
from intq.quantizer.ops.boundary import Dequantize, Quantize
from intq.quantizer.ops.onnx_fn import param_inputs

IR_VERSION = 10

_TORCH_TO_ONNX = {
    torch.float32: TensorProto.FLOAT,
    torch.float64: TensorProto.DOUBLE,
    torch.int8: TensorProto.INT8,
    torch.int16: TensorProto.INT16,
    torch.int32: TensorProto.INT32,
    torch.int64: TensorProto.INT64,
    torch.uint8: TensorProto.UINT8,
    torch.bool: TensorProto.BOOL,
}


def _array(t: torch.Tensor) -> np.ndarray:
    return np.array(t.detach().cpu().numpy(), order="C")


def write_onnx(
    gm: fx.GraphModule,
    inputs: list[dict],
    outputs: list[dict],
    integer_outputs: bool = False,
    doc: str = "",
) -> onnx.ModelProto:
    """Build the ModelProto.

    ``inputs`` / ``outputs``: ``[{name, elem_type, shape}]`` of the source
    model; the integer model keeps its input and output names and declared
    shapes (an output without a declared shape gets symbolic dims of the
    rank the graph computes).
    """
    names: dict[fx.Node, str] = {}
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, onnx.TensorProto] = {}
    functions: dict[str, onnx.FunctionProto] = {}
    graph_inputs = []
    out_types: list[int] = []
    placeholder_i = 0

    def name_of(arg):
        if arg is None:
            return ""
        return names[arg]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            info = inputs[placeholder_i]
            placeholder_i += 1
            names[node] = info["name"]
            graph_inputs.append(helper.make_tensor_value_info(info["name"], info["elem_type"], info.get("shape")))
        elif node.op == "get_attr":
            names[node] = node.target
            inits[node.target] = numpy_helper.from_array(_array(_fetch(gm, node.target)), name=node.target)
        elif node.op == "call_function" and node.target is operator.getitem:
            names[node] = f"{names[node.args[0]]}__{node.args[1]}"
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            out = node.name
            names[node] = out
            if isinstance(mod, OnnxOp):
                n_out = len(mod.output_names)
                outs = [out] if n_out == 1 else [f"{out}__{k}" for k in range(n_out)]
                nodes.append(
                    helper.make_node(
                        mod.op_type,
                        [name_of(a) for a in node.args],
                        outs,
                        name=mod.onnx_name,
                        domain=mod.domain or None,
                    )
                )
                nodes[-1].attribute.extend(mod.attribute_protos)
            elif isinstance(mod, IntegerOp):
                fn = mod.function_proto()
                functions.setdefault(fn.name, fn)
                param_inits, unpack, param_names = param_inputs(mod, prefix=f"{node.target}.")
                inits.update((t.name, t) for t in param_inits)
                nodes.extend(unpack)
                data = [name_of(a) for a in node.args]
                nodes.append(helper.make_node(fn.name, data + param_names, [out], name=node.target, domain=INTQ_DOMAIN))
            elif isinstance(mod, Quantize):
                p = mod.onnx_params()
                s_name, z_name = f"{node.target}.scale", f"{node.target}.zero_point"
                inits[s_name] = numpy_helper.from_array(p["scale"], name=s_name)
                inits[z_name] = numpy_helper.from_array(p["zero_point"], name=z_name)
                # NaN -> 0 before the quantizer (QuantizeLinear leaves NaN unspecified); +-Inf saturate in it
                fill_name, isnan, filled = f"{node.target}.nan_fill", f"{out}__isnan", f"{out}__nan_to_zero"
                inits[fill_name] = numpy_helper.from_array(np.array(0.0, dtype=np.float32), name=fill_name)
                nodes.append(helper.make_node("IsNaN", [name_of(node.args[0])], [isnan], name=f"{node.target}.isnan"))
                nodes.append(
                    helper.make_node(
                        "Where", [isnan, fill_name, name_of(node.args[0])], [filled], name=f"{node.target}.nan_to_zero"
                    )
                )
                nodes.append(helper.make_node("QuantizeLinear", [filled, s_name, z_name], [out], name=node.target))
            elif isinstance(mod, Dequantize):
                if integer_outputs:
                    names[node] = names[node.args[0]]
                    continue
                p = mod.onnx_params()
                s_name = f"{node.target}.scale"
                inits[s_name] = numpy_helper.from_array(p["scale"], name=s_name)
                attrs = {"axis": -1} if mod.per_channel else {}
                nodes.append(
                    helper.make_node(
                        "DequantizeLinear", [name_of(node.args[0]), s_name], [out], name=node.target, **attrs
                    )
                )
            else:
                raise TypeError(f"cannot write module {type(mod).__name__} at node {node.name} to ONNX")
        elif node.op == "output":
            graph_outputs = []
            for i, arg in enumerate(node.args[0]):
                dtype = _output_dtype(gm, arg, integer_outputs)
                out_name = outputs[i]["name"]
                nodes.append(helper.make_node("Identity", [names[arg]], [out_name], name=f"output_{i}"))
                shape = outputs[i].get("shape")
                if shape is None and arg.meta.get("shape") is not None:
                    shape = [f"{out_name}_d{k}" for k in range(len(arg.meta["shape"]))]
                graph_outputs.append(helper.make_tensor_value_info(out_name, dtype, shape))
                out_types.append(dtype)
        else:
            raise TypeError(f"cannot write fx node {node.name} ({node.op} {node.target}) to ONNX")

    graph = helper.make_graph(
        nodes, "intq_integer_model", graph_inputs, graph_outputs, initializer=list(inits.values())
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(INTQ_DOMAIN, 1)],
        functions=list(functions.values()),
        producer_name="intq",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    return model


def _fetch(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _output_dtype(gm, arg: fx.Node, integer_outputs: bool) -> int:
    if arg.op == "call_module":
        mod = gm.get_submodule(arg.target)
        if isinstance(mod, Dequantize):
            if not integer_outputs:
                return TensorProto.FLOAT
            return _output_dtype(gm, arg.args[0], integer_outputs)
        if isinstance(mod, IntegerOp):
            return _TORCH_TO_ONNX[mod.output_dtype]
    dtype = arg.meta.get("dtype")
    return _TORCH_TO_ONNX.get(dtype, TensorProto.UNDEFINED)
