"""QuantizedModel: float inputs in, float outputs out, integers in between."""

from __future__ import annotations

import torch
import torch.fx as fx

from intq.quantizer.canonicalize import annotate
from intq.quantizer.ops.boundary import Dequantize


class QuantizedModel(torch.nn.Module):
    """The integer-only model as a torch module (the torch integer emulation).

    ``forward`` takes the original model's inputs (float tensors, token ids)
    and returns its outputs as float tensors; ``integer_forward`` returns the
    integers that the output dequantizers scale.  ``to_onnx`` writes the same
    computation as integer-only ONNX.
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        inputs: list[dict],
        outputs: list[dict],
        layers,
        config,
        example,
        float_graph: fx.GraphModule | None = None,
        observers: dict | None = None,
    ):
        super().__init__()
        # the calibrated float graph (fidelity reports) and its observers by fx node name (QAT starts from their
        # clips); kept out of the module tree and the state dict
        self.__dict__["float_graph"] = float_graph
        self.__dict__["observers"] = observers
        self.__dict__["example"] = example  # one calibration batch: shapes for re-annotation after QAT
        self.graph_module = graph_module
        self.inputs = inputs
        self.outputs = outputs
        self.layers = layers
        self.config = config
        annotate(graph_module, example)

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]

    def forward(self, *inputs):
        with torch.no_grad():
            outs = self.graph_module(*inputs)
        return outs[0] if len(outs) == 1 else outs

    def integer_forward(self, *inputs) -> tuple[torch.Tensor, ...]:
        """The integer outputs (before dequantization)."""
        deq_inputs = {}
        gm = self.graph_module

        class _Grab(fx.Interpreter):
            def call_module(self, target, args, kwargs):
                if isinstance(gm.get_submodule(target), Dequantize):
                    deq_inputs[target] = args[0]
                return super().call_module(target, args, kwargs)

        with torch.no_grad():
            _Grab(gm).run(*inputs)
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        result = []
        for arg in out_node.args[0]:
            if arg.op == "call_module" and isinstance(gm.get_submodule(arg.target), Dequantize):
                result.append(deq_inputs[arg.target])
            else:
                result.append(None)
        return tuple(result)

    def to_onnx(self, integer_outputs: bool = False):
        from intq.export.onnx_writer import write_onnx

        return write_onnx(self.graph_module, self.inputs, self.outputs, integer_outputs=integer_outputs)
