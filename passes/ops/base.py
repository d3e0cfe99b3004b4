"""The contract every ``intq`` op lowering follows.

One ONNX node of the ``intq`` domain becomes one ``call_tir`` of one fused
TIR PrimFunc, built with ``te.compute`` through ``BlockBuilder.call_te``.
The PrimFunc computes exactly the integer formula of the op's docstring in
``quantizer/ops/<same file name>.py``: same intermediate widths, same
rounding, same clamps; that file's ONNX function (run by onnxruntime) is the
reference the TVM result must equal bit for bit.

A converter subclasses ``IntqConverter`` and declares:

- ``op_type``: the ``intq`` function name it converts;
- ``inputs``: the names of the node's inputs, in order (data inputs first,
  then the constant params, exactly as the ONNX function declares them);
- ``convert(bb, node, args)``: returns the Relax expression of the output,
  ``args`` mapping each input name to its Relax expression.

Why ``te.compute`` rather than hand-written TVMScript PrimFuncs: the ops
take tensors of any rank whose leading dims are symbolic (batch, sequence);
``call_te`` creates the PrimFunc's shape variables from the caller's types,
so one Python function serves every rank and every dynamic dim, and the
multi-stage compute (reduction, then requantize) lands in a single
PrimFunc.  The blocks are plain ``T.sblock``s that later schedules can
transform.

Constant params: a param that is an ONNX initializer of a single element
(per-tensor ``m``, ``s``) is baked into the kernel as an immediate, so LLVM
sees a constant multiplier and shift; larger ones (per-channel) stay buffer
arguments of the PrimFunc.

Clamp ranges: an op that ends in a requantize may clamp to a range other
than its default (a 4-bit activation ``[-8, 7]``, an unsigned one after a
fused ReLU ``[0, 15]``); the range is then part of the op type, as the suffix
``_c<lo>x<hi>`` with a minus sign written ``m`` (``Requantize_c0x15``,
``IntConv2d_s1x1_p1x1x1x1_d1x1_g1_cm8x7``; ``quantizer/ops/base.py``
``range_suffix`` writes it, ``split_range_suffix`` reads it back).  A
converter that takes one declares ``ranged_dtype`` (the output dtype of a
ranged instance); ``onnx_import.converter_for`` binds ``clamp_range`` on a
subclass for a suffixed node, and ``output_range`` gives the kernel its
``(qmin, qmax, dtype)``.

Kernel attributes: the converters of the ops that the epilogue fusion passes
(``passes/fuse_*_epilogue.py``) combine tag their PrimFunc with
``kernel_attrs``: ``intq.op`` (the op type) and ``intq.immediates`` (the
params baked in, by name).  With the ``call_tir`` arguments, which are the
op's remaining inputs in ``inputs`` order, they give back every operand of
the te helper that built the kernel (``kernel_operands``), so a pass can
rebuild a combined kernel from the same helpers.
"""

from __future__ import annotations

import re
from typing import ClassVar

import numpy as np

from intq.passes.compat import OnnxOpConverter, constant_value, relax, te, tensor_type, tirx, tvm

INTQ_DOMAIN = "intq"  # the ONNX domain of our functions (quantizer.ops.base.INTQ_DOMAIN; no torch here)
OP_ATTR = "intq.op"  # PrimFunc attr: the intq op type the kernel computes
IMMEDIATES_ATTR = "intq.immediates"  # PrimFunc attr: {param name: value} of the params baked in
_RANGE_SUFFIX = re.compile(r"_c(m?)(\d+)x(m?)(\d+)$")
_DTYPE_RANGES = {"int8": (-128, 127), "int16": (-32768, 32767), "int32": (-(2**31), 2**31 - 1)}

#: A param as a kernel sees it: a TE tensor (buffer argument) or a Python int (immediate).
Operand = te.Tensor | int


class IntqLoweringError(ValueError):
    """An ``intq`` node that the TVM lowering cannot convert; the message names the node."""


class IntqConverter(OnnxOpConverter):
    """Base of the ``intq`` converters, in the ONNX frontend's converter protocol."""

    op_type: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]]
    #: the output clamp range and dtype without a range suffix
    qmin: ClassVar[int] = -128
    qmax: ClassVar[int] = 127
    out_dtype: ClassVar[str] = "int8"
    #: the output dtype of an instance whose op type carries a range suffix; None: the op takes no range
    ranged_dtype: ClassVar[str | None] = None
    #: the range of the node's suffix, bound by ``onnx_import.converter_for``; None: the default range
    clamp_range: ClassVar[tuple[int, int] | None] = None
    #: the node attributes ``convert`` reads, passed to it as keyword arguments (all required)
    attributes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _impl_v1(cls, bb: relax.BlockBuilder, inputs, attr: dict, params) -> relax.Expr:
        # The frontend picks the largest _impl_v<k> with k <= the *default* domain's
        # opset; v1 is the only one, so every model opset reaches it.
        node = attr.get("tvm_custom", {}).get("name") or cls.op_type
        if len(inputs) != len(cls.inputs) or any(x is None for x in inputs):
            raise IntqLoweringError(
                f"{INTQ_DOMAIN}.{cls.op_type} node {node!r}: expected inputs {list(cls.inputs)}, got {len(inputs)}"
            )
        args = dict(zip(cls.inputs, inputs, strict=True))
        for name, expr in args.items():
            ty = tensor_type(expr)
            if ty.ndim < 0 or not isinstance(ty.shape, relax.ShapeExpr):
                raise IntqLoweringError(
                    f"{INTQ_DOMAIN}.{cls.op_type} node {node!r}: input {name!r} has unknown rank; "
                    "give the ONNX graph input a shape (dims may be symbolic)"
                )
        missing = [name for name in cls.attributes if name not in attr]
        if missing:
            raise IntqLoweringError(f"{INTQ_DOMAIN}.{cls.op_type} node {node!r}: missing attributes {missing}")
        return cls.convert(bb, node, args, **{name: attr[name] for name in cls.attributes})

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr], **attributes) -> relax.Expr:
        raise NotImplementedError

    @classmethod
    def fail(cls, node: str, message: str) -> IntqLoweringError:
        return IntqLoweringError(f"{INTQ_DOMAIN}.{cls.op_type} node {node!r}: {message}")

    @classmethod
    def output_range(cls, node: str) -> tuple[int, int, str]:
        """``(qmin, qmax, out_dtype)`` of the kernel: the default, or the suffix's range in ``ranged_dtype``."""
        if cls.clamp_range is None:
            return cls.qmin, cls.qmax, cls.out_dtype
        qmin, qmax = cls.clamp_range
        dtype = cls.ranged_dtype
        if dtype is None:
            raise cls.fail(node, "this op takes no clamp range suffix (_c<lo>x<hi>): re-export the model")
        lo, hi = _DTYPE_RANGES[dtype]
        if not lo <= qmin < qmax <= hi:
            raise cls.fail(
                node, f"the clamp range [{qmin}, {qmax}] of its op type must lie inside {dtype} [{lo}, {hi}]: re-export"
            )
        return qmin, qmax, dtype


def split_range_suffix(op_type: str) -> tuple[str, int | None, int | None]:
    """``op_type`` without its clamp range suffix, and the range: ``"Requantize_cm8x7"`` -> ``("Requantize", -8, 7)``.

    ``(op_type, None, None)`` when it has no suffix.
    """
    match = _RANGE_SUFFIX.search(op_type)
    if match is None:
        return op_type, None, None
    lo_neg, lo, hi_neg, hi = match.groups()
    return op_type[: match.start()], -int(lo) if lo_neg else int(lo), -int(hi) if hi_neg else int(hi)


def dtype_of(expr: relax.Expr) -> str:
    return str(tensor_type(expr).dtype)


def static_shape(expr: relax.Expr) -> list[int | None]:
    """The dims of a tensor expression: ints where static, None where symbolic."""
    return [int(d) if isinstance(d, tirx.IntImm) else None for d in tensor_type(expr).shape.values]


def param_operand(expr: relax.Expr) -> relax.Expr | int:
    """A single-element constant as a Python int (baked in), anything else unchanged (a buffer)."""
    value = constant_value(expr)
    if value is not None and value.size == 1 and np.issubdtype(value.dtype, np.integer):
        return int(value.reshape(()))
    return expr


def check_trailing_broadcast(cls, node: str, name: str, param: relax.Expr, out_shape: list[int | None]) -> None:
    """Refuse a param that does not broadcast (numpy rules) onto the output shape without growing it."""
    shape = static_shape(param)
    if len(shape) > len(out_shape):
        raise cls.fail(node, f"param {name!r} of shape {shape} has a higher rank than the output {out_shape}")
    for p, o in zip(reversed(shape), reversed(out_shape), strict=False):
        if p is None or (p != 1 and p != o):
            raise cls.fail(
                node,
                f"param {name!r} of shape {shape} does not broadcast onto the output shape {out_shape} "
                "(a dim must be 1 or equal a static output dim)",
            )


def read_param(param: Operand, index: tuple, dtype: str = "int64") -> tirx.PrimExpr:
    """``param`` at the output ``index`` under numpy broadcasting (trailing dims aligned)."""
    if isinstance(param, int):
        return tirx.const(param, dtype)
    shape = [int(d) for d in param.shape]
    tail = index[len(index) - len(shape) :] if shape else ()
    sub = tuple(0 if d == 1 else i for d, i in zip(shape, tail, strict=True))
    return param[sub].astype(dtype)


def kernel_attrs(op_type: str, **params: Operand | relax.Expr) -> dict:
    """The PrimFunc attrs of an ``op_type`` kernel whose params are ``params`` (ints are baked in)."""
    return {OP_ATTR: op_type, IMMEDIATES_ATTR: {k: v for k, v in params.items() if isinstance(v, int)}}


def kernel_op(mod: tvm.IRModule, call: relax.Expr) -> str | None:
    """The ``intq.op`` of the kernel that ``call`` runs when it is a ``call_tir`` of a tagged PrimFunc, else None."""
    if not (isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.call_tir"))):
        return None
    func = mod.functions.get(call.args[0])
    attrs = func.attrs if isinstance(func, tirx.PrimFunc) and func.attrs else {}
    return str(attrs[OP_ATTR]) if OP_ATTR in attrs else None


def kernel_operands(
    func: tirx.PrimFunc, call: relax.Call, inputs: tuple[str, ...]
) -> dict[str, relax.Expr | int] | None:
    """Each input of the op that ``call = call_tir(func, ...)`` runs: its baked-in int or its call argument.

    None when the call's arguments are not the op's non-immediate inputs, one each.
    """
    immediates = func.attrs.get(IMMEDIATES_ATTR, {}) if func.attrs else {}
    names = [name for name in inputs if name not in immediates]
    args = call.args[1]
    if len(call.args) != 2 or not isinstance(args, relax.Tuple) or len(args.fields) != len(names):
        return None
    operands = dict(zip(names, args.fields, strict=True))
    return {name: int(immediates[name]) if name in immediates else operands[name] for name in inputs}
