"""Capture: a torch module or an ONNX file → the fx graph of ONNX nodes.

A torch module is exported with ``torch.onnx.export(dynamo=True)`` (the
exporter that matched transformers' BERT to 3e-6 here), with the batch axis
dynamic — and the sequence axis too for token ids and [B, L, C] inputs — then
read back with ``intq.export.onnx_reader.read_onnx``.  One path then serves
both kinds of input, and the shapes the graph computes stay symbolic.
"""

from __future__ import annotations

import os
import warnings

import onnx
import torch
import torch.fx as fx

from intq.export.onnx_reader import read_onnx


def default_dynamic_shapes(example_inputs) -> tuple:
    dims = []
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=4096)
    for x in example_inputs:
        d = {0: batch}
        if x.dim() >= 2 and (not x.is_floating_point() or x.dim() == 3):
            d[1] = seq
        dims.append(d)
    return tuple(dims)


def export_torch(model: torch.nn.Module, example_inputs: tuple, dynamic_shapes=None) -> onnx.ModelProto:
    """The float model as an ONNX ModelProto (dynamo exporter)."""
    model = model.eval()
    dynamic_shapes = default_dynamic_shapes(example_inputs) if dynamic_shapes is None else dynamic_shapes
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, tuple(example_inputs), dynamo=True, dynamic_shapes=dynamic_shapes, optimize=True, verbose=False
        )
    return program.model_proto


def capture(model, example_inputs: tuple | None = None, dynamic_shapes=None) -> fx.GraphModule:
    """An fx GraphModule of ONNX nodes for ``model`` (torch module, path or ModelProto)."""
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise ValueError("capturing a torch module needs example inputs (one calibration batch).")
        proto = export_torch(model, example_inputs, dynamic_shapes)
        return read_onnx(proto, simplify=True)
    if isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        return read_onnx(model, simplify=True)
    raise TypeError(
        f"intq.quantize takes a torch.nn.Module, an ONNX file path or an onnx.ModelProto, not {type(model).__name__}"
    )
