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
- ``function_proto()``: builds the ``onnx.FunctionProto`` whose inputs are
  ``data_inputs + param_names`` and whose single output is ``y``; the body
  uses standard ONNX ops only (integer types).  An op whose configuration
  (a clamp range, a convolution geometry) is part of its ONNX function sets
  ``op_type`` per instance and declares ``function_proto`` with
  ``class_or_instance_method``: on the class it builds the default
  configuration, on an instance that instance's;
- ``packed_int4``: the params holding 4-bit values (in int8 buffers) that
  the ONNX writer stores as packed INT4 initializers, each followed by a
  ``Cast`` to INT8 (empty by default).

Activation ranges.  A narrow activation is an int8 tensor whose values lie
in ``[qmin, qmax]`` (``activation_range``):

- signed ``b`` bits: ``[-2**(b-1), 2**(b-1) - 1]``, scale ``clip / (2**(b-1) - 1)``;
- unsigned (after a ReLU-like clamp): ``[0, 2**b - 1]``, but at most
  ``[0, 127]`` since the carrier stays int8: ``b = 4`` gains a bit
  (``[0, 15]``, scale ``clip / 15``), ``b = 8`` keeps ``[0, 127]``.

An op that ends in a requantize takes the range as its clamp; a range other
than the op's default becomes part of its op type (``range_suffix``), so
each distinct ONNX function has its own name: ``Requantize_c0x15``,
``IntConv2d_s1x1_p1x1x1x1_d1x1_g1_cm8x7``.
"""

from __future__ import annotations

import functools
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
    packed_int4: frozenset[str] = frozenset()

    def params(self) -> dict[str, np.ndarray]:
        """Constant inputs as numpy arrays, in ``param_names`` order."""
        return {name: getattr(self, name).detach().cpu().numpy() for name in self.param_names}

    @classmethod
    def function_proto(cls) -> onnx.FunctionProto:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(getattr(self, n).shape)}" for n in self.param_names)
        return f"{self.op_type}({shapes})"


class class_or_instance_method:
    """A method bound to the instance when called on one, else to the class (the default configuration)."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj, cls=None):
        return functools.partial(self.fn, cls if obj is None else obj)


def activation_range(bits: int, unsigned: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of a ``bits``-bit activation carried in int8 (see the module docstring)."""
    if int(bits) != bits or not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be an int in [2, 8], got {bits!r}")
    if unsigned:
        return 0, min((1 << bits) - 1, 127)
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def range_suffix(qmin: int, qmax: int, default: tuple[int, int] = (-128, 127)) -> str:
    """``""`` for the default range, else ``_c{qmin}x{qmax}`` with a minus sign written ``m`` (``_cm8x7``)."""
    if (qmin, qmax) == tuple(default):
        return ""

    def fmt(v: int) -> str:
        return f"m{-v}" if v < 0 else str(v)

    return f"_c{fmt(int(qmin))}x{fmt(int(qmax))}"


def check_range(qmin, qmax, lo: int, hi: int, where: str) -> tuple[int, int]:
    """``(qmin, qmax)`` as ints, refusing an empty range or one outside the output dtype's ``[lo, hi]``."""
    if int(qmin) != qmin or int(qmax) != qmax or not lo <= qmin < qmax <= hi:
        raise ValueError(
            f"{where}: clamp range [{qmin}, {qmax}] must be integers with {lo} <= qmin < qmax <= {hi} "
            "(the output dtype's range); pick the range with activation_range(bits, unsigned)"
        )
    return int(qmin), int(qmax)


def as_buffer(value, dtype: torch.dtype) -> torch.Tensor:
    """An exact integer tensor from a numpy array / scalar, for ``register_buffer``."""
    arr = np.asarray(value)
    return torch.from_numpy(np.array(arr, order="C")).to(dtype)
