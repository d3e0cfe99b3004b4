"""TVM lowering of ``intq.UnpackInt4``: 4-bit weights stored two per byte, unpacked at run time.

    y.flat[i] = sext4((p[i // 2] >> (4 * (i % 2))) & 15)         (int8, reshaped to ``shape``)
    sext4(v)  = (v ^ 8) - 8                                       (the nibble as a two's complement int4)

``p``: uint8 ``[ceil(n / 2)]``, ``n`` the product of ``shape``: element ``i``
(row-major) is the low nibble of byte ``i >> 1`` when ``i`` is even, the high
one when odd, the ONNX INT4 packing; a pad nibble of an odd ``n`` is never
read.  ``shape`` is the node's attribute.  Not an op of the exported ONNX
file: ``onnx_import`` makes one of each ``INT4 initializer -> Cast(to=INT8)``
the ONNX writer emits (see ``quantizer/ops/onnx_fn.param_inputs``), so the
compiled module keeps the packed bytes and unpacks them when it runs.

The kernel is one elementwise block ``unpack`` over the flat ``[n]``
(reshaped to ``shape`` in Relax, a view); tagged ``intq.op = UnpackInt4``.
It indexes with ``//`` and ``%`` (``i`` is never negative: the same as
``>> 1`` and ``& 1``) because TVM's simplifier reasons about those: the CPU
schedule (``schedules/unpack.py``) splits ``i = 2k + j`` and needs
``p[(2k + j) // 2]`` to become ``p[k]``, one byte read for two elements.
A GPU runs it as it is (``schedules``' generic CUDA fallback binds its loop
to threads).

TVM's ``FoldConstant`` evaluates any ``call_tir`` whose arguments are all
constants, which would store the unpacked int8 weights instead: the packed
constant is therefore bound through ``compat.opaque_constant``.  The conv
and linear schedules read the weight through this node (``schedules``:
``KernelCall.int4``) and keep their own packed layouts 4-bit as well.
"""

from __future__ import annotations

import math

import numpy as np

from intq.passes.compat import constant_value, opaque_constant, relax, te, tensor_type, tirx, tvm
from intq.passes.ops.base import IntqConverter, dtype_of, kernel_attrs, static_shape


def unpack_int4_te(packed: te.Tensor, size: int) -> te.Tensor:
    """The ``size`` signed nibbles of ``packed`` (uint8), low nibble first, as int8 ``[size]``."""

    def body(i):
        byte = packed[tirx.floordiv(i, 2)].astype("int32")
        nibble = (byte >> (tirx.floormod(i, 2) * 4).astype("int32")) & 15
        return ((nibble ^ 8) - 8).astype("int8")

    return te.compute((tirx.IntImm("int64", size),), body, name="unpack")


def emit_unpack_int4(bb: relax.BlockBuilder, packed: relax.Expr, shape: tuple[int, ...], op_type: str) -> relax.Expr:
    """Emit ``reshape(call_tir(unpack, (packed,)), shape)``; ``packed`` a uint8 constant or expression."""
    size = math.prod(shape)
    flat = bb.emit(
        bb.call_te(
            unpack_int4_te,
            opaque_constant(bb, packed),
            size,
            primfunc_name_hint="intq_unpack_int4",
            primfunc_attrs=kernel_attrs(op_type),
        )
    )
    return relax.op.reshape(flat, list(shape))


class UnpackInt4(IntqConverter):
    op_type = "UnpackInt4"
    inputs = ("packed",)
    attributes = ("shape",)

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr], shape=()) -> relax.Expr:
        packed = args["packed"]
        dims = [int(d) for d in shape]
        if not dims or min(dims) < 1:
            raise cls.fail(node, f"shape must list the positive dims of the weight, got {list(shape)}")
        size = math.prod(dims)
        if dtype_of(packed) != "uint8" or static_shape(packed) != [(size + 1) // 2]:
            raise cls.fail(
                node,
                f"packed must be uint8 [{(size + 1) // 2}] (two nibbles per byte for shape {dims}), "
                f"got {dtype_of(packed)} {static_shape(packed)}",
            )
        return emit_unpack_int4(bb, packed, tuple(dims), cls.op_type)


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Signed values in ``[-8, 7]`` as ONNX packs INT4: two per byte, element ``2k`` in the low nibble of byte ``k``."""
    nibbles = (np.asarray(values).reshape(-1).astype(np.int64) & 15).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of ``pack_int4``: the int8 values of ``shape`` (the kernel's formula, in numpy)."""
    size = math.prod(shape)
    nibbles = np.stack([packed & 15, packed >> 4], axis=-1).reshape(-1)[:size].astype(np.int8)
    return ((nibbles ^ 8) - 8).astype(np.int8).reshape(shape)


def unpacked_constant(expr: relax.Expr, value_of, is_unpack) -> np.ndarray | None:
    """The int8 value of ``expr`` when it is ``reshape(call_tir(UnpackInt4 kernel, (constant,)), shape)``, else None.

    ``value_of(var)`` is what a variable is bound to (itself when unbound);
    ``is_unpack(call)`` whether a ``call_tir`` runs an ``UnpackInt4`` kernel.
    """
    reshape = value_of(expr)
    if not (isinstance(reshape, relax.Call) and reshape.op.same_as(tvm.ir.Op.get("relax.reshape"))):
        return None
    call = value_of(reshape.args[0])
    if not (isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.call_tir")) and is_unpack(call)):
        return None
    (packed,) = call.args[1].fields
    value = constant_value(value_of(packed))
    if value is None:
        return None
    return unpack_int4(value, tuple(int(d) for d in tensor_type(expr).shape.values))
