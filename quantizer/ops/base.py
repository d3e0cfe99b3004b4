"""The contract every integer operator follows.

An integer op is defined once, in its module docstring, and executed three
ways that must agree bit for bit: ``forward`` here (torch, integers carried
in int64 or exact float64), its ONNX function in the ``intq`` domain (run by
onnxruntime), and its TVM lowering in ``passes/ops/<same file name>.py``.

A subclass declares:

- ``op_type``: the ONNX function's name in the ``intq`` domain;
- ``data_inputs``: names of the tensor inputs (activations), in order;
- ``param_names``: names of the constant inputs (weights, multipliers,
  shifts), in order; each is a registered buffer of the module holding the
  exact integer array that the ONNX initializer will hold;
- ``output_dtype``: the torch dtype of the result (int8, int16 or int32);
- ``forward(*data)``: the torch integer emulation;
- ``function_proto()``: a classmethod building the ``onnx.FunctionProto``
  whose inputs are ``data_inputs + param_names`` and whose single output is
  ``y``; the body uses standard ONNX ops only (integer types).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx
import torch

INTQ_DOMAIN = "intq"
ONNX_OPSET = 21  # int16 QuantizeLinear/DequantizeLinear need 21


class IntegerOp(torch.nn.Module):
    op_type: ClassVar[str]
    data_inputs: ClassVar[tuple[str, ...]]
    param_names: ClassVar[tuple[str, ...]] = ()
    output_dtype: ClassVar[torch.dtype]

    def params(self) -> dict[str, np.ndarray]:
        """Constant inputs as numpy arrays, in ``param_names`` order."""
        return {name: getattr(self, name).detach().cpu().numpy() for name in self.param_names}

    @classmethod
    def function_proto(cls) -> onnx.FunctionProto:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(getattr(self, n).shape)}" for n in self.param_names)
        return f"{self.op_type}({shapes})"


def as_buffer(value, dtype: torch.dtype) -> torch.Tensor:
    """An exact integer tensor from a numpy array / scalar, for ``register_buffer``."""
    arr = np.asarray(value)
    return torch.from_numpy(np.array(arr, order="C")).to(dtype)
