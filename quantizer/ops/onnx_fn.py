"""A small builder for the ``intq`` ONNX functions, and the integer idioms
every function shares (floor shift, rounding shift, clamp, cast).

ONNX has no signed arithmetic shift (``BitShift`` is defined on unsigned
types only).  ``floor_shift`` computes ``x >> s`` (floor) for int64 ``x``
with ``|x| < 2**62`` and ``0 <= s <= 62`` as::

    (int64) ((uint64)(x + 2**62) >>u s) - (2**62 >> s)

which is exact because ``2**62`` is a multiple of ``2**s``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from intq.quantizer.ops.base import INTQ_DOMAIN, ONNX_OPSET
from intq.quantizer.ops.dyadic import SHIFT_OFFSET

_ONNX_DTYPE = {
    "int8": TensorProto.INT8,
    "int16": TensorProto.INT16,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    "uint64": TensorProto.UINT64,
    "float32": TensorProto.FLOAT,
}


class FunctionBuilder:
    """Collects the nodes of one ONNX function; ``op`` returns the output name."""

    def __init__(self, name: str, inputs: list[str], outputs: list[str] | None = None, doc: str = ""):
        self.name = name
        self.inputs = list(inputs)
        self.outputs = outputs or ["y"]
        # The summary and the formula (the docstring's first two paragraphs) travel with the function, for a
        # reader in Netron; the rest of the spec stays in the source. Every configured instance (e.g. each conv
        # shape) is its own function, so the full docstring, repeated, would outweigh a small model's weights.
        self.doc = "\n\n".join(doc.strip().split("\n\n")[:2])
        self.nodes: list[onnx.NodeProto] = []
        self._counter = 0

    def _fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self._fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype: str = "int64", hint: str = "c") -> str:
        arr = np.asarray(value, dtype=np.dtype(dtype))
        out = self._fresh(hint)
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(arr, name=out)))
        return out

    def cast(self, x: str, dtype: str, out: str | None = None) -> str:
        return self.op("Cast", x, out=out, to=_ONNX_DTYPE[dtype])

    def floor_shift(self, x: str, s: str) -> str:
        """int64 ``x >> s`` (floor) for ``|x| < 2**62``, ``s`` int64 in [0, 62] (broadcasts)."""
        offset = self.const(SHIFT_OFFSET, "int64", "offset")
        shifted = self.op(
            "BitShift", self.cast(self.op("Add", x, offset), "uint64"), self.cast(s, "uint64"), direction="RIGHT"
        )
        offset_shifted = self.op(
            "BitShift", self.const(SHIFT_OFFSET, "uint64", "offset_u"), self.cast(s, "uint64"), direction="RIGHT"
        )
        return self.op("Sub", self.cast(shifted, "int64"), self.cast(offset_shifted, "int64"))

    def shift_left(self, x: str, s: str) -> str:
        """int64 ``x * 2**s`` for ``x >= 0`` and no overflow (``s`` int64 >= 0)."""
        return self.cast(self.op("BitShift", self.cast(x, "uint64"), self.cast(s, "uint64"), direction="LEFT"), "int64")

    def round_shift(self, x: str, m: str, s: str) -> str:
        """``(x*m + 2**(s-1)) >> s`` in int64 (see ``dyadic.shift_right_round``)."""
        one = self.const(1, "int64", "one")
        half = self.shift_left(one, self.op("Sub", s, one))
        return self.floor_shift(self.op("Add", self.op("Mul", x, m), half), s)

    def clamp(self, x: str, qmin: int, qmax: int) -> str:
        return self.op("Clip", x, self.const(qmin, "int64", "qmin"), self.const(qmax, "int64", "qmax"))

    def requantize(self, x: str, m: str, s: str, qmin: int, qmax: int, out_dtype: str, out: str | None = None) -> str:
        """``clamp((x*m + 2**(s-1)) >> s, qmin, qmax)`` cast to ``out_dtype``; ``x`` int64."""
        return self.cast(self.clamp(self.round_shift(x, m, s), qmin, qmax), out_dtype, out=out)

    def build(self) -> onnx.FunctionProto:
        return helper.make_function(
            INTQ_DOMAIN,
            self.name,
            self.inputs,
            self.outputs,
            self.nodes,
            opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
            doc_string=self.doc,
        )


def param_inputs(op, prefix: str = "") -> tuple[list[onnx.TensorProto], list[onnx.NodeProto], list[str]]:
    """Initializers, main-graph nodes and input names that feed ``op``'s params to its function node.

    A param is an initializer named ``<prefix><param>``.  One listed in
    ``op.packed_int4`` is stored as an ONNX INT4 initializer
    ``<prefix><param>.int4`` (two values per byte, the low nibble first, as
    ONNX packs them) followed by a standard ``Cast(to=INT8)`` whose output
    ``<prefix><param>`` feeds the function, so the file holds the 4-bit
    weights at half the size and the function body still sees int8.
    """
    inits, nodes, names = [], [], []
    packed = getattr(op, "packed_int4", frozenset())  # test doubles of an op may not declare it
    for pname, value in op.params().items():
        name = f"{prefix}{pname}"
        arr = np.array(value, order="C")
        if pname in packed:
            if arr.size and (arr.min() < -8 or arr.max() > 7):
                raise ValueError(f"{op.op_type}: param {pname} is in packed_int4 but holds values outside [-8, 7]")
            inits.append(numpy_helper.from_array(arr.astype(ml_dtypes.int4), name=f"{name}.int4"))
            nodes.append(helper.make_node("Cast", [f"{name}.int4"], [name], name=f"{name}.unpack", to=TensorProto.INT8))
        else:
            inits.append(numpy_helper.from_array(arr, name=name))
        names.append(name)
    return inits, nodes, names


def single_op_model(op, example_inputs: list[np.ndarray]) -> onnx.ModelProto:
    """A model holding one ``intq`` function node, its params as initializers (``param_inputs``).

    For tests: run ``op`` in onnxruntime on ``example_inputs`` (whose dtypes
    fix the graph's input types) and compare with ``op.forward``.
    """
    fn = op.function_proto()
    data_names = list(op.data_inputs)
    inits, unpack, param_names = param_inputs(op)
    ins = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
        for n, a in zip(data_names, example_inputs, strict=True)
    ]
    out_dtype = str(op.output_dtype).replace("torch.", "")
    outs = [helper.make_tensor_value_info("y", _ONNX_DTYPE[out_dtype], None)]
    node = helper.make_node(op.op_type, data_names + param_names, ["y"], domain=INTQ_DOMAIN)
    graph = helper.make_graph([*unpack, node], op.op_type, ins, outs, initializer=inits)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(INTQ_DOMAIN, 1)],
        functions=[fn],
    )
