"""Torch implementations of default-domain ONNX operators, opsets 13-21.

``IMPLS`` maps an ONNX ``op_type`` to ``fn(op, *inputs)``: ``op`` is the
``OnnxOp`` being run (attributes in ``op.attrs``, the model's opset in
``op.opset``, the number of requested outputs in ``len(op.output_names)``),
``inputs`` are torch tensors, or ``None`` for an omitted optional input. A
function returns one tensor, or a tuple when the node has several outputs.

The contract is ONNX's, not torch's:

- dtypes are kept: integer inputs give integer outputs, wrapping on overflow
  as the C kernels of onnxruntime do (``int8`` ``Mul`` wraps mod 2**8).
  Integer ``Div`` truncates toward zero; ``Mod`` follows ``fmod``.
- axes-as-attribute (before opset 18, ``ReduceSum`` before 13) and
  axes-as-input (from 18) are both accepted: a node carries one or the other.
- ``Slice``, ``Shape`` and ``Pad`` clamp and crop as the spec says, negative
  steps included; ``Reshape`` honours ``0`` (copy, unless ``allowzero``) and
  ``-1``; ``Expand`` broadcasts both ways.
- rounding: ``QuantizeLinear`` and ``Round`` round half to even, then
  saturate to the output type (``[-8, 7]`` / ``[0, 15]`` for int4 / uint4,
  which travel in int8 / uint8 tensors). ``Cast`` from float to integer
  truncates toward zero. ``Cast`` to float8 follows the spec's saturate table.
- exact integer arithmetic: ``MatMulInteger`` and ``ConvInteger`` subtract
  the zero points, then multiply in float64, where every product and partial
  sum of 8-bit operands is an integer below 2**53 (reduction length < 2**37),
  so the int32 result is exact whatever the summation order.

Unsigned 16/32/64-bit tensors. Torch stores ``uint16``/``uint32``/``uint64``
but has almost no kernels for them (no add, shift, compare, index_select).
Ops compute on an int64 *carrier* and convert back:

- ``uint16``/``uint32`` widen to int64 by value and narrow modulo 2**bits.
- ``uint64`` is reinterpreted bit for bit (``view(torch.int64)``): add, sub,
  mul, bitwise ops and data movement are the same on the bits; ordering
  (compare, min/max, clip, reductions) flips the sign bit first; ``Div`` and
  ``Mod`` use an unsigned long division; ``BitShift`` RIGHT is a logical
  shift (arithmetic shift, then mask off the copied sign bits).
- ``BitShift`` by a count >= the bit width gives 0, as ``onnx.reference``
  (numpy) does; the ONNX spec leaves it undefined and onnxruntime's C shift
  masks the count on x86.

Not covered: strings, sequences, optional types, control flow (``If``,
``Loop``, ``Scan``), training-mode ``Dropout``/``BatchNormalization``.
Float math (``Exp``, ``Erf``, matmul, conv, ...) is torch's and agrees with
onnxruntime to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from onnx import TensorProto

if TYPE_CHECKING:
    from intq.export.onnx_reader import OnnxOp

IMPLS: dict[str, Callable[..., Any]] = {}

# ONNX elem type -> torch dtype. INT4/UINT4 values travel in int8/uint8 tensors.
ONNX_TO_TORCH: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT8: torch.uint8,
    TensorProto.UINT16: torch.uint16,
    TensorProto.UINT32: torch.uint32,
    TensorProto.UINT64: torch.uint64,
    TensorProto.BOOL: torch.bool,
    TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
    TensorProto.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    TensorProto.FLOAT8E5M2: torch.float8_e5m2,
    TensorProto.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
    TensorProto.INT4: torch.int8,
    TensorProto.UINT4: torch.uint8,
}
TORCH_TO_ONNX: dict[torch.dtype, int] = {
    dt: t for t, dt in ONNX_TO_TORCH.items() if t not in (TensorProto.INT4, TensorProto.UINT4)
}
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)
_UNSIGNED_BITS = {torch.uint8: 8, torch.uint16: 16, torch.uint32: 32, torch.uint64: 64}
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
# (qmin, qmax) of the integer outputs of QuantizeLinear, by ONNX elem type
_QUANT_RANGE = {
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT8: (0, 255),
    TensorProto.INT16: (-32768, 32767),
    TensorProto.UINT16: (0, 65535),
    TensorProto.INT4: (-8, 7),
    TensorProto.UINT4: (0, 15),
}


def torch_dtype(elem_type: int) -> torch.dtype:
    """The torch dtype that carries ONNX ``elem_type``; ``ValueError`` if none does."""
    try:
        return ONNX_TO_TORCH[elem_type]
    except KeyError:
        name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else elem_type
        raise ValueError(f"ONNX element type {name} has no torch equivalent in intq") from None


def register(*op_types: str):
    def deco(fn):
        for name in op_types:
            IMPLS[name] = fn
        return fn

    return deco


# ---------------------------------------------------------------- helpers


def _attr(op: OnnxOp, name: str, default=None):
    return op.attrs.get(name, default)


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _n_outputs(op: OnnxOp) -> int:
    return len(op.output_names)


def _widen(t: torch.Tensor) -> torch.Tensor:
    """An int64 carrier for a uint16/32/64 tensor (by value; uint64 bit for bit)."""
    if t.dtype == torch.uint64:
        return t.view(torch.int64)
    if t.dtype in _WIDE_UNSIGNED:
        return t.to(torch.int64)
    return t


def _narrow(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Back from the int64 carrier, modulo 2**bits."""
    if dtype == torch.uint64:
        return t.view(torch.uint64)
    return t.to(dtype)  # torch integer conversion is modular


def _via_int64(fn):
    """Run ``fn`` on int64 carriers when the data is uint16/32/64, then convert back.

    For ops whose tensor outputs all have the data's dtype and whose result
    does not depend on the order of values (arithmetic mod 2**64, movement).
    """

    @functools.wraps(fn)
    def wrapper(op, *inputs):
        wide = [x.dtype for x in inputs if x is not None and x.dtype in _WIDE_UNSIGNED]
        if not wide:
            return fn(op, *inputs)
        dtype = wide[0]
        out = fn(op, *(_widen(x) if x is not None and x.dtype in _WIDE_UNSIGNED else x for x in inputs))
        if isinstance(out, tuple):
            return tuple(_narrow(y, dtype) if y.dtype == torch.int64 else y for y in out)
        return _narrow(out, dtype) if out.dtype == torch.int64 else out

    return wrapper


def _order_key(t: torch.Tensor) -> torch.Tensor:
    """A tensor whose signed order is the order of ``t``'s values (uint64: flip the sign bit)."""
    if t.dtype == torch.uint64:
        return t.view(torch.int64) ^ _INT64_MIN
    return _widen(t)


def _from_order_key(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint64:
        return (k ^ _INT64_MIN).view(torch.uint64)
    return _narrow(k, dtype) if dtype in _WIDE_UNSIGNED else k


def _ordered(fn):
    """Run an order-dependent op on order keys when the data is uint16/32/64."""

    @functools.wraps(fn)
    def wrapper(op, *inputs):
        wide = [x.dtype for x in inputs if x is not None and x.dtype in _WIDE_UNSIGNED]
        if not wide:
            return fn(op, *inputs)
        dtype = wide[0]
        out = fn(op, *(_order_key(x) if x is not None and x.dtype in _WIDE_UNSIGNED else x for x in inputs))
        return _from_order_key(out, dtype) if out.dtype == torch.int64 else out

    return wrapper


def _udiv64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unsigned 64-bit ``a // b`` on int64 carriers.

    For ``b < 2**63``: ``q = ((a >>u 1) // b) * 2`` leaves a remainder below
    ``2b``, fixed by at most one increment. For ``b >= 2**63``: ``q = a >=u b``.
    """
    a, b = torch.broadcast_tensors(a, b)
    ka, kb = a ^ _INT64_MIN, b ^ _INT64_MIN  # signed order == unsigned order
    half = (a >> 1) & _INT64_MAX
    big_b = b < 0
    safe_b = torch.where(big_b, torch.ones_like(b), b)
    q = torch.div(half, safe_b, rounding_mode="trunc") << 1
    r = a - q * safe_b
    q = q + ((r ^ _INT64_MIN) >= kb).to(torch.int64)
    return torch.where(big_b, (ka >= kb).to(torch.int64), q)


def _reduce_dims(op: OnnxOp, x: torch.Tensor, axes: torch.Tensor | None) -> tuple[int, ...] | None:
    """Dims to reduce, or ``None`` for the identity (empty axes with noop_with_empty_axes)."""
    listed = _ints(axes) if axes is not None else _attr(op, "axes")
    if not listed:
        if _attr(op, "noop_with_empty_axes", 0):
            return None
        return tuple(range(x.dim()))
    return tuple(sorted({_axis(a, x.dim()) for a in listed}))


def _unary(fn_torch):
    def impl(op, x):
        return fn_torch(x)

    return impl


# ---------------------------------------------------------------- elementwise arithmetic


@register("Add")
@_via_int64
def _add(op, a, b):
    return torch.add(a, b)


@register("Sub")
@_via_int64
def _sub(op, a, b):
    return torch.sub(a, b)


@register("Mul")
@_via_int64
def _mul(op, a, b):
    return torch.mul(a, b)


@register("Div")
def _div(op, a, b):
    if a.dtype.is_floating_point:
        return torch.div(a, b)
    if a.dtype == torch.uint64:
        return _udiv64(_widen(a), _widen(b)).view(torch.uint64)
    if a.dtype in _WIDE_UNSIGNED:
        return _narrow(torch.div(_widen(a), _widen(b), rounding_mode="trunc"), a.dtype)
    return torch.div(a, b, rounding_mode="trunc")


@register("Mod")
def _mod(op, a, b):
    if a.dtype.is_floating_point or _attr(op, "fmod", 0):
        return torch.fmod(a, b)
    if a.dtype == torch.uint64:
        wa, wb = _widen(a), _widen(b)
        return (wa - _udiv64(wa, wb) * wb).view(torch.uint64)
    if a.dtype in _WIDE_UNSIGNED:
        return _narrow(torch.remainder(_widen(a), _widen(b)), a.dtype)
    return torch.remainder(a, b)  # result takes the divisor's sign, as ONNX fmod=0


@register("Pow")
def _pow(op, x, y):
    if x.dtype.is_floating_point:
        return torch.pow(x, y.to(x.dtype) if y.dtype.is_floating_point else y).to(x.dtype)
    if y.dtype.is_floating_point or bool((y < 0).any()):
        # onnxruntime: static_cast<T>(std::pow(double, double)), truncating
        return torch.pow(x.to(torch.float64), y.to(torch.float64)).to(x.dtype)
    return torch.pow(x, y.to(x.dtype)).to(x.dtype)


@register("Sum")
@_via_int64
def _sum(op, *xs):
    return functools.reduce(torch.add, xs)


@register("Mean")
def _mean(op, *xs):
    return functools.reduce(torch.add, xs) / len(xs)


@register("Min")
@_ordered
def _min(op, *xs):
    return functools.reduce(torch.minimum, xs)


@register("Max")
@_ordered
def _max(op, *xs):
    return functools.reduce(torch.maximum, xs)


@register("Clip")
@_ordered
def _clip(op, x, lo=None, hi=None):
    if lo is not None:
        x = torch.maximum(x, lo.reshape(()))
    if hi is not None:
        x = torch.minimum(x, hi.reshape(()))  # lo > hi gives hi everywhere, as the spec says
    return x


@register("Neg")
def _neg(op, x):
    return torch.neg(x)


@register("Abs")
def _abs(op, x):
    if x.dtype in _UNSIGNED_BITS:
        return x
    return torch.abs(x)


@register("Sign")
def _sign(op, x):
    if x.dtype in _WIDE_UNSIGNED:
        return _narrow((_order_key(x) != _order_key(torch.zeros_like(x))).to(torch.int64), x.dtype)
    return torch.sign(x)


@register("Reciprocal")
def _reciprocal(op, x):
    return torch.reciprocal(x)


for _name, _fn in {
    "Sqrt": torch.sqrt,
    "Erf": torch.erf,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sigmoid": torch.sigmoid,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asinh": torch.asinh,
    "Acosh": torch.acosh,
    "Atanh": torch.atanh,
    "Softsign": F.softsign,
    "Mish": F.mish,
    "IsNaN": torch.isnan,
    "Not": torch.logical_not,
    "Identity": lambda x: x,
}.items():
    IMPLS[_name] = _unary(_fn)


@register("IsInf")
def _isinf(op, x):
    pos = torch.isposinf(x) if _attr(op, "detect_positive", 1) else torch.zeros_like(x, dtype=torch.bool)
    neg = torch.isneginf(x) if _attr(op, "detect_negative", 1) else torch.zeros_like(x, dtype=torch.bool)
    return pos | neg


# ---------------------------------------------------------------- activations


@register("Relu")
def _relu(op, x):
    return torch.where(x > 0, x, torch.zeros_like(x))


@register("LeakyRelu")
def _leaky_relu(op, x):
    return torch.where(x >= 0, x, x * _attr(op, "alpha", 0.01))


@register("PRelu")
def _prelu(op, x, slope):
    return torch.where(x >= 0, x, x * slope).to(x.dtype)


@register("Elu")
def _elu(op, x):
    alpha = _attr(op, "alpha", 1.0)
    return torch.where(x >= 0, x, alpha * (torch.exp(x) - 1))


@register("Selu")
def _selu(op, x):
    alpha = _attr(op, "alpha", 1.67326319217681884765625)
    gamma = _attr(op, "gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@register("HardSigmoid")
def _hard_sigmoid(op, x):
    return torch.clamp(_attr(op, "alpha", 0.2) * x + _attr(op, "beta", 0.5), 0, 1)


@register("HardSwish")
def _hard_swish(op, x):
    return x * torch.clamp(x / 6 + 0.5, 0, 1)


@register("Celu")
def _celu(op, x):
    alpha = _attr(op, "alpha", 1.0)
    return torch.clamp(x, min=0) + torch.clamp(alpha * torch.expm1(x / alpha), max=0)


@register("ThresholdedRelu")
def _thresholded_relu(op, x):
    return torch.where(x > _attr(op, "alpha", 1.0), x, torch.zeros_like(x))


@register("Shrink")
def _shrink(op, x):
    lambd, bias = _attr(op, "lambd", 0.5), _attr(op, "bias", 0.0)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x))).to(x.dtype)


@register("Softplus")
def _softplus(op, x):
    return torch.log1p(torch.exp(-x.abs())) + x.clamp_min(0)


@register("Gelu")
def _gelu(op, x):
    return F.gelu(x, approximate=_attr(op, "approximate", "none"))


@register("Softmax")
def _softmax(op, x):
    return torch.softmax(x, _attr(op, "axis", -1))


@register("LogSoftmax")
def _log_softmax(op, x):
    return torch.log_softmax(x, _attr(op, "axis", -1))


# ---------------------------------------------------------------- comparison and logic


def _compare(fn_torch):
    def impl(op, a, b):
        if a.dtype in _WIDE_UNSIGNED:
            a, b = _order_key(a), _order_key(b)
        return fn_torch(a, b)

    return impl


for _name, _fn in {
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}.items():
    IMPLS[_name] = _compare(_fn)


@register("Where")
@_via_int64
def _where(op, cond, x, y):
    return torch.where(cond, x, y)


@register("BitwiseAnd")
@_via_int64
def _bitwise_and(op, a, b):
    return torch.bitwise_and(a, b)


@register("BitwiseOr")
@_via_int64
def _bitwise_or(op, a, b):
    return torch.bitwise_or(a, b)


@register("BitwiseXor")
@_via_int64
def _bitwise_xor(op, a, b):
    return torch.bitwise_xor(a, b)


@register("BitwiseNot")
def _bitwise_not(op, x):
    if x.dtype in _WIDE_UNSIGNED:
        return _narrow(~_widen(x), x.dtype)
    return torch.bitwise_not(x)


@register("BitShift")
def _bitshift(op, x, s):
    """Unsigned shift; counts >= the bit width give 0 (see the module docstring)."""
    bits = _UNSIGNED_BITS[x.dtype]
    x, s = torch.broadcast_tensors(x, s)
    wx, ws = (x.to(torch.int64), s.to(torch.int64)) if bits < 64 else (_widen(x), _widen(s))
    too_far = (ws >= bits) | (ws < 0)  # a uint64 count >= 2**63 reads negative on the carrier
    count = torch.where(too_far, torch.zeros_like(ws), ws)
    if _attr(op, "direction") == "LEFT":
        y = wx << count
        if bits < 64:
            y = y & ((1 << bits) - 1)
    elif bits < 64:
        y = wx >> count  # non-negative carrier: arithmetic == logical
    else:
        # arithmetic shift then clear the copied sign bits: mask = 2**(64-count) - 1
        mask = torch.where(count == 0, torch.full_like(count, -1), _INT64_MAX >> (count - 1).clamp_min(0))
        y = (wx >> count) & mask
    y = torch.where(too_far, torch.zeros_like(y), y)
    return _narrow(y, x.dtype)


# ---------------------------------------------------------------- casts and constants


def _to_float8(x: torch.Tensor, dtype: torch.dtype, saturate: bool) -> torch.Tensor:
    """Cast to a float8 type, rounding half to even (Cast and QuantizeLinear, opset 19+).

    ``saturate``: out-of-range values and infinities become +-max, as
    onnxruntime and ``onnx.reference`` do (the spec's table says NaN for an
    infinity into a FNUZ type; both executors give max). Without it, values
    past the rounding range become NaN (Inf for E5M2, where onnxruntime
    gives NaN for the tie 61440 alone; torch and the reference give Inf). Torch's own cast
    saturates E4M3FN only, so that case is marked by hand: its max 448 has an
    even mantissa, so the tie 464 still rounds down to 448.
    """
    x = x.to(torch.float32)
    if saturate:
        fmax = torch.finfo(dtype).max
        return torch.clamp(x, -fmax, fmax).to(dtype)
    if dtype == torch.float8_e4m3fn:
        return torch.where(x.abs() > 464.0, torch.full_like(x, float("nan")), x).to(dtype)
    return x.to(dtype)


def cast(x: torch.Tensor, dtype: torch.dtype, saturate: bool = True) -> torch.Tensor:
    """ONNX ``Cast`` to ``dtype`` (float->int truncates, int->int wraps)."""
    if x.dtype == dtype:
        return x
    if dtype in _FLOAT8:
        return _to_float8(x, dtype, saturate)
    if x.dtype in _FLOAT8:
        x = x.to(torch.float32)
    if dtype == torch.bool:
        return x != 0
    if x.dtype in _WIDE_UNSIGNED and dtype not in (torch.uint64,) and not dtype.is_floating_point:
        return _widen(x).to(dtype)
    return x.to(dtype)


@register("Cast")
def _cast(op, x):
    return cast(x, torch_dtype(_attr(op, "to")), bool(_attr(op, "saturate", 1)))


@register("CastLike")
def _cast_like(op, x, like):
    return cast(x, like.dtype, bool(_attr(op, "saturate", 1)))


def constant_value(attrs: dict[str, Any]) -> torch.Tensor:
    """The tensor a ``Constant`` node holds (``value``, ``value_float(s)``, ``value_int(s)``)."""
    if "value" in attrs:
        return tensor_from_numpy(attrs["value"])
    if "value_float" in attrs:
        return torch.tensor(attrs["value_float"], dtype=torch.float32)
    if "value_floats" in attrs:
        return torch.tensor(list(attrs["value_floats"]), dtype=torch.float32)
    if "value_int" in attrs:
        return torch.tensor(attrs["value_int"], dtype=torch.int64)
    if "value_ints" in attrs:
        return torch.tensor(list(attrs["value_ints"]), dtype=torch.int64)
    raise ValueError(
        f"Constant with attributes {sorted(attrs)}: only value, value_float(s), value_int(s) are supported"
    )


def tensor_from_numpy(arr: np.ndarray) -> torch.Tensor:
    """A torch tensor owning a copy of ``arr``; ml_dtypes arrays (bfloat16, float8, int4) included."""
    arr = np.asarray(arr)
    name = arr.dtype.name
    if name == "bfloat16":
        return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
    if name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"):
        return torch.from_numpy(arr.view(np.uint8).copy()).view(getattr(torch, name))
    if name == "int4":
        return torch.from_numpy(arr.astype(np.int8))
    if name == "uint4":
        return torch.from_numpy(arr.astype(np.uint8))
    if arr.dtype.kind in "OSU":
        raise ValueError(f"string tensors are not supported (dtype {arr.dtype})")
    return torch.from_numpy(np.array(arr, copy=True))


@register("Constant")
def _constant(op):
    return constant_value(op.attrs)


@register("ConstantOfShape")
def _constant_of_shape(op, shape):
    value = _attr(op, "value")
    fill = torch.zeros((), dtype=torch.float32) if value is None else tensor_from_numpy(value).reshape(())
    return fill.expand(_ints(shape)).clone()


@register("Range")
def _range(op, start, limit, delta):
    s, lim, d = start.item(), limit.item(), delta.item()
    n = max(math.ceil((lim - s) / d), 0)
    if start.dtype.is_floating_point:
        return (s + torch.arange(n, dtype=torch.float64) * d).to(start.dtype)
    return (s + torch.arange(n, dtype=torch.int64) * d).to(start.dtype)


# ---------------------------------------------------------------- shape and movement


@register("Shape")
def _shape(op, x):
    r = x.dim()
    start = min(max(_axis(_attr(op, "start", 0), r), 0), r)
    end = min(max(_axis(_attr(op, "end", r), r), 0), r)
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


@register("Size")
def _size(op, x):
    return torch.tensor(x.numel(), dtype=torch.int64)


@register("Reshape")
def _reshape(op, x, shape):
    target = _ints(shape)
    if not _attr(op, "allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


@register("Flatten")
def _flatten(op, x):
    axis = _axis(_attr(op, "axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register("Transpose")
def _transpose(op, x):
    perm = _attr(op, "perm") or list(reversed(range(x.dim())))
    return x.permute(list(perm))


@register("Unsqueeze")
def _unsqueeze(op, x, axes=None):
    listed = _ints(axes) if axes is not None else list(_attr(op, "axes"))
    rank = x.dim() + len(listed)
    shape = list(x.shape)
    for a in sorted(_axis(a, rank) for a in listed):
        shape.insert(a, 1)
    return x.reshape(shape)


@register("Squeeze")
def _squeeze(op, x, axes=None):
    listed = _ints(axes) if axes is not None else _attr(op, "axes")
    if listed is None:
        drop = {i for i, d in enumerate(x.shape) if d == 1}
    else:
        drop = {_axis(a, x.dim()) for a in listed}
    return x.reshape([d for i, d in enumerate(x.shape) if i not in drop])


@register("Concat")
def _concat(op, *xs):
    return torch.cat(xs, dim=_attr(op, "axis"))


@register("Split")
def _split(op, x, split=None):
    axis = _axis(_attr(op, "axis", 0), x.dim())
    dim = x.shape[axis]
    if split is not None:
        sizes = _ints(split)
    else:
        n = _attr(op, "num_outputs") or _n_outputs(op)
        chunk = -(-dim // n)  # ceil: every part but the last has this size
        sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
    return tuple(torch.split(x, sizes, dim=axis))


@register("Slice")
@_via_int64
def _slice(op, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    backward = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, x.dim())
        n = x.shape[axis]
        start = start + n if start < 0 else start
        end = end + n if end < 0 else end
        if step > 0:
            index[axis] = slice(min(max(start, 0), n), min(max(end, 0), n), step)
        elif step < 0:
            backward.append((axis, min(max(start, 0), n - 1), min(max(end, -1), n - 1), step))
        else:
            raise ValueError("Slice: a step of 0 is invalid")
    x = x[tuple(index)]
    for axis, start, end, step in backward:  # torch slicing has no negative steps
        x = x.index_select(axis, torch.arange(start, end, step, dtype=torch.int64))
    return x


@register("Gather")
@_via_int64
def _gather(op, x, indices):
    axis = _axis(_attr(op, "axis", 0), x.dim())
    idx = indices.to(torch.int64)
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1 :]))


@register("GatherElements")
@_via_int64
def _gather_elements(op, x, indices):
    axis = _axis(_attr(op, "axis", 0), x.dim())
    idx = indices.to(torch.int64)
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


@register("GatherND")
@_via_int64
def _gather_nd(op, x, indices):
    """ONNX GatherND: ``out[b..., i...] = x[b..., *indices[b..., i..., :]]``, the first ``batch_dims`` dims shared."""
    b = int(_attr(op, "batch_dims", 0))
    idx = indices.to(torch.int64)
    depth = idx.shape[-1]
    batch, inner = tuple(x.shape[:b]), tuple(x.shape[b : b + depth])
    idx = torch.where(idx < 0, idx + torch.tensor(inner, dtype=torch.int64), idx)
    flat_x = x.reshape((math.prod(batch), math.prod(inner)) + tuple(x.shape[b + depth :]))
    strides = torch.tensor([math.prod(inner[k + 1 :]) for k in range(depth)], dtype=torch.int64)
    flat_idx = (idx * strides).sum(-1).reshape(math.prod(batch), -1)  # [batch, gathered]
    rows = torch.arange(flat_x.shape[0]).unsqueeze(1).expand_as(flat_idx)
    out = flat_x[rows, flat_idx]
    return out.reshape(tuple(idx.shape[:-1]) + tuple(x.shape[b + depth :]))


@register("Expand")
def _expand(op, x, shape):
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


@register("Tile")
def _tile(op, x, repeats):
    return x.repeat(_ints(repeats))


@register("Trilu")
@_via_int64
def _trilu(op, x, k=None):
    diagonal = 0 if k is None else int(k.item())
    if x.dtype == torch.bool:
        keep = torch.ones(x.shape[-2:], dtype=torch.bool)
        keep = torch.triu(keep, diagonal) if _attr(op, "upper", 1) else torch.tril(keep, diagonal)
        return x & keep
    return torch.triu(x, diagonal) if _attr(op, "upper", 1) else torch.tril(x, diagonal)


def _pad_indices(n: int, before: int, after: int, mode: str) -> torch.Tensor:
    i = torch.arange(-before, n + after, dtype=torch.int64)
    if mode == "edge":
        return i.clamp(0, n - 1)
    if mode == "wrap":
        return torch.remainder(i, n)
    if n == 1:  # reflect
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - i, i)


@register("Pad")
@_via_int64
def _pad(op, x, pads, value=None, axes=None):
    mode = _attr(op, "mode", "constant")
    rank = x.dim()
    axes_list = [_axis(a, rank) for a in _ints(axes)] if axes is not None else list(range(rank))
    p = _ints(pads)
    n = len(axes_list)
    for axis, before, after in zip(axes_list, p[:n], p[n:], strict=True):
        if before < 0:
            x = x.narrow(axis, -before, x.shape[axis] + before)
        if after < 0:
            x = x.narrow(axis, 0, x.shape[axis] + after)
        before, after = max(before, 0), max(after, 0)
        if before == after == 0:
            continue
        if mode == "constant":
            fill = torch.zeros((), dtype=x.dtype) if value is None else value.reshape(()).to(x.dtype)
            shape = list(x.shape)
            parts = []
            for count, is_data in ((before, False), (None, True), (after, False)):
                if is_data:
                    parts.append(x)
                elif count:
                    shape[axis] = count
                    parts.append(fill.expand(shape))
            x = torch.cat(parts, dim=axis)
        else:
            x = x.index_select(axis, _pad_indices(x.shape[axis], before, after, mode))
    return x


# ---------------------------------------------------------------- reductions


def _reduction(combine):
    def impl(op, x, axes=None):
        dims = _reduce_dims(op, x, axes)
        if dims is None:
            return x
        keep = bool(_attr(op, "keepdims", 1))
        if x.dim() == 0:
            return combine(x.reshape(1), (0,), False)
        return combine(x, dims, keep)

    return impl


def _int_sum(x, dims, keep):
    return torch.sum(_widen(x), dims, keepdim=keep).to(torch.int64)


def _sum_reduce(x, dims, keep):
    if x.dtype.is_floating_point:
        return torch.sum(x, dims, keepdim=keep)
    return _narrow(_int_sum(x, dims, keep), x.dtype)


def _mean_reduce(x, dims, keep):
    if x.dtype.is_floating_point:
        return torch.mean(x, dims, keepdim=keep)
    count = math.prod(x.shape[d] for d in dims)
    return _narrow(torch.div(_int_sum(x, dims, keep), count, rounding_mode="trunc"), x.dtype)


def _extreme_reduce(fn_torch):
    def combine(x, dims, keep):
        if x.dtype in _WIDE_UNSIGNED:
            return _from_order_key(fn_torch(_order_key(x), dims, keepdim=keep), x.dtype)
        return fn_torch(x, dims, keepdim=keep)

    return combine


def _prod_reduce(x, dims, keep):
    y = _widen(x) if x.dtype in _WIDE_UNSIGNED else x
    for d in sorted(dims, reverse=True):
        y = torch.prod(y, d, keepdim=keep)
    return _narrow(y, x.dtype) if x.dtype in _WIDE_UNSIGNED else y.to(x.dtype)


IMPLS["ReduceSum"] = _reduction(_sum_reduce)
IMPLS["ReduceMean"] = _reduction(_mean_reduce)
IMPLS["ReduceMax"] = _reduction(_extreme_reduce(torch.amax))
IMPLS["ReduceMin"] = _reduction(_extreme_reduce(torch.amin))
IMPLS["ReduceProd"] = _reduction(_prod_reduce)
IMPLS["ReduceL1"] = _reduction(lambda x, d, k: _sum_reduce(x.abs(), d, k))
IMPLS["ReduceL2"] = _reduction(lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)).to(x.dtype))
IMPLS["ReduceSumSquare"] = _reduction(lambda x, d, k: _sum_reduce(x * x, d, k))
IMPLS["ReduceLogSum"] = _reduction(lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)))
IMPLS["ReduceLogSumExp"] = _reduction(lambda x, d, k: torch.logsumexp(x, d, keepdim=k))


def _arg_extreme(fn_torch):
    def impl(op, x):
        axis = _axis(_attr(op, "axis", 0), x.dim())
        keep = bool(_attr(op, "keepdims", 1))
        key = _order_key(x) if x.dtype in _WIDE_UNSIGNED else x
        if _attr(op, "select_last_index", 0):
            flipped = fn_torch(key.flip(axis), axis, keepdim=keep)
            return x.shape[axis] - 1 - flipped
        return fn_torch(key, axis, keepdim=keep)  # torch returns the first index among ties

    return impl


IMPLS["ArgMax"] = _arg_extreme(torch.argmax)
IMPLS["ArgMin"] = _arg_extreme(torch.argmin)


# ---------------------------------------------------------------- linear algebra


@register("MatMul")
def _matmul(op, a, b):
    if a.dtype in _WIDE_UNSIGNED:
        return _narrow(torch.matmul(_widen(a), _widen(b)), a.dtype)
    return torch.matmul(a, b)


@register("Gemm")
def _gemm(op, a, b, c=None):
    if _attr(op, "transA", 0):
        a = a.transpose(0, 1)
    if _attr(op, "transB", 0):
        b = b.transpose(0, 1)
    y = torch.matmul(a, b)
    alpha, beta = _attr(op, "alpha", 1.0), _attr(op, "beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None and beta != 0.0:
        y = y + (c if beta == 1.0 else c * beta)
    return y.to(a.dtype)


@register("Einsum")
def _einsum(op, *xs):
    return torch.einsum(_attr(op, "equation").replace(" ", ""), *xs)


def _exact_int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Integer matmul via float64 (exact for 8-bit operands, see the module docstring) to int32."""
    return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int64).to(torch.int32)


@register("MatMulInteger")
def _matmul_integer(op, a, b, a_zero_point=None, b_zero_point=None):
    a = a.to(torch.int64)
    b = b.to(torch.int64)
    if a_zero_point is not None:
        azp = a_zero_point.to(torch.int64)
        if azp.dim() == 1 and azp.numel() > 1:  # per row of A: [M] -> [M, 1]
            azp = azp.reshape(-1, 1)
        a = a - azp
    if b_zero_point is not None:
        b = b - b_zero_point.to(torch.int64)  # scalar, [N] or [..., 1, N]: broadcasts along the columns
    return _exact_int_matmul(a, b)


# ---------------------------------------------------------------- convolution and pooling


def _resolve_pads(op, spatial, kernel, strides, dilations) -> list[tuple[int, int]]:
    """``(begin, end)`` padding per spatial axis from ``pads`` / ``auto_pad``."""
    auto_pad = _attr(op, "auto_pad", "NOTSET")
    n = len(spatial)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            out.append((small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small))
        return out
    if auto_pad == "VALID":
        return [(0, 0)] * n
    pads = list(_attr(op, "pads") or [0] * (2 * n))
    return list(zip(pads[:n], pads[n:], strict=True))


def _conv_geometry(op, x, kernel):
    n = x.dim() - 2
    strides = list(_attr(op, "strides") or [1] * n)
    dilations = list(_attr(op, "dilations") or [1] * n)
    pads = _resolve_pads(op, list(x.shape[2:]), kernel, strides, dilations)
    return strides, dilations, pads


def _torch_pad(pads: list[tuple[int, int]]) -> list[int]:
    """ONNX per-axis (begin, end) to F.pad's last-axis-first flat list."""
    flat: list[int] = []
    for begin, end in reversed(pads):
        flat += [begin, end]
    return flat


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_nd(x, w, b, strides, dilations, pads, group):
    if all(begin == end for begin, end in pads):
        padding = [begin for begin, _ in pads]
    else:
        x = F.pad(x, _torch_pad(pads))
        padding = [0] * len(pads)
    return _CONV[x.dim() - 2](x, w, b, stride=strides, padding=padding, dilation=dilations, groups=group)


@register("Conv")
def _conv(op, x, w, b=None):
    strides, dilations, pads = _conv_geometry(op, x, list(_attr(op, "kernel_shape") or w.shape[2:]))
    return _conv_nd(x, w, b, strides, dilations, pads, _attr(op, "group", 1))


@register("ConvInteger")
def _conv_integer(op, x, w, x_zero_point=None, w_zero_point=None):
    # Subtracting the zero point first makes the zero padding pad with x_zero_point, as onnxruntime does.
    xf = x.to(torch.float64)
    wf = w.to(torch.float64)
    if x_zero_point is not None:
        xf = xf - x_zero_point.to(torch.float64).reshape(())
    if w_zero_point is not None:
        wzp = w_zero_point.to(torch.float64)
        wf = wf - (wzp.reshape([-1] + [1] * (w.dim() - 1)) if wzp.numel() > 1 else wzp.reshape(()))
    strides, dilations, pads = _conv_geometry(op, x, list(_attr(op, "kernel_shape") or w.shape[2:]))
    y = _conv_nd(xf, wf, None, strides, dilations, pads, _attr(op, "group", 1))
    return y.to(torch.int64).to(torch.int32)


@register("BatchNormalization")
def _batch_norm(op, x, scale, bias, mean, var, *_):
    if _attr(op, "training_mode", 0):
        raise NotImplementedError("BatchNormalization with training_mode=1 is not supported (inference only)")
    shape = [1, -1] + [1] * (x.dim() - 2)
    eps = _attr(op, "epsilon", 1e-5)
    inv = scale.reshape(shape) / torch.sqrt(var.reshape(shape) + eps)
    return (x - mean.reshape(shape)) * inv + bias.reshape(shape)


def _pool_window(op, x):
    """Kernel, strides, dilations and the (begin, end) pad that yields exactly the ONNX output size.

    The end pad may exceed ``pads`` (ceil_mode) or be smaller (the window
    never reaches the last padded cells), so the caller pools with no
    padding and floor mode.
    """
    kernel = list(_attr(op, "kernel_shape"))
    n = len(kernel)
    strides = list(_attr(op, "strides") or [1] * n)
    dilations = list(_attr(op, "dilations") or [1] * n)
    spatial = list(x.shape[2:])
    pads = _resolve_pads(op, spatial, kernel, strides, dilations)
    ceil_mode = bool(_attr(op, "ceil_mode", 0))
    explicit = _attr(op, "auto_pad", "NOTSET") == "NOTSET"
    window = []
    for size, k, s, d, (begin, end) in zip(spatial, kernel, strides, dilations, pads, strict=True):
        extent = (k - 1) * d + 1
        span = size + begin + end - extent
        out = (-(-span // s) if ceil_mode and explicit else span // s) + 1
        if ceil_mode and explicit and (out - 1) * s >= size + begin:
            out -= 1  # the last window must start inside the input or the begin padding
        window.append((begin, (out - 1) * s + extent - size - begin))
    return kernel, strides, dilations, pads, window


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


@register("MaxPool")
def _max_pool(op, x):
    kernel, strides, dilations, _, window = _pool_window(op, x)
    dtype = x.dtype
    xf = x if dtype.is_floating_point else x.to(torch.float64)  # exact for int8/uint8
    xp = F.pad(xf, _torch_pad(window), value=float("-inf"))
    want_indices = _n_outputs(op) > 1
    out = _MAX_POOL[len(kernel)](
        xp, kernel, strides, padding=0, dilation=dilations, ceil_mode=False, return_indices=want_indices
    )
    if not want_indices:
        return out.to(dtype)
    y, flat = out
    return y.to(dtype), _onnx_pool_indices(flat, x.shape, [w[0] for w in window], list(xp.shape[2:]), op)


def _onnx_pool_indices(flat, shape, begins, padded, op) -> torch.Tensor:
    """Torch's per-plane indices into the padded input -> ONNX flat indices into the unpadded input."""
    spatial = list(shape[2:])
    coords = []
    rest = flat
    for size in reversed(padded):
        coords.append(rest % size)
        rest = rest // size
    coords = [c - b for c, b in zip(reversed(coords), begins, strict=True)]
    strides_order = spatial if not _attr(op, "storage_order", 0) else list(reversed(spatial))
    ordered = coords if not _attr(op, "storage_order", 0) else list(reversed(coords))
    index = torch.zeros_like(flat)
    for c, size in zip(ordered, strides_order, strict=True):
        index = index * size + c
    plane = math.prod(spatial)
    nc = torch.arange(shape[0] * shape[1], dtype=torch.int64).reshape([shape[0], shape[1]] + [1] * len(spatial))
    return index + nc * plane


@register("AveragePool")
def _average_pool(op, x):
    kernel, strides, dilations, pads, window = _pool_window(op, x)
    n = len(kernel)
    channels = x.shape[1]
    ones = torch.ones([channels, 1] + kernel, dtype=x.dtype)
    sums = _CONV[n](F.pad(x, _torch_pad(window)), ones, stride=strides, dilation=dilations, groups=channels)
    # Count the cells each window averages: input cells, plus the explicit padding if count_include_pad;
    # never the cells ceil_mode adds beyond the padding.
    mask = torch.ones([1, 1] + list(x.shape[2:]), dtype=x.dtype)
    if _attr(op, "count_include_pad", 0):
        mask = F.pad(mask, _torch_pad(pads), value=1.0)
        extra = [(0, w_end - p_end) for (_, p_end), (_, w_end) in zip(pads, window, strict=True)]
        mask = F.pad(mask, _torch_pad(extra), value=0.0)
    else:
        mask = F.pad(mask, _torch_pad(window), value=0.0)
    counts = _CONV[n](mask, torch.ones([1, 1] + kernel, dtype=x.dtype), stride=strides, dilation=dilations)
    return sums / counts


@register("GlobalAveragePool")
def _global_average_pool(op, x):
    return torch.mean(x, tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool")
def _global_max_pool(op, x):
    return torch.amax(x, tuple(range(2, x.dim())), keepdim=True)


# ---------------------------------------------------------------- normalization and regularization


@register("LayerNormalization")
def _layer_norm(op, x, scale, bias=None):
    axis = _axis(_attr(op, "axis", -1), x.dim())
    eps = _attr(op, "epsilon", 1e-5)
    stash = torch_dtype(_attr(op, "stash_type", TensorProto.FLOAT))
    dims = tuple(range(axis, x.dim()))
    xs = x.to(stash)
    mean = xs.mean(dims, keepdim=True)
    d = xs - mean
    inv_std = torch.reciprocal(torch.sqrt((d * d).mean(dims, keepdim=True) + eps))
    y = (d * inv_std).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return (y, mean, inv_std)[: _n_outputs(op)] if _n_outputs(op) > 1 else y


@register("InstanceNormalization")
def _instance_norm(op, x, scale, bias):
    dims = tuple(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + _attr(op, "epsilon", 1e-5)) * scale.reshape(shape) + bias.reshape(shape)


@register("Dropout")
def _dropout(op, x, ratio=None, training_mode=None):
    if training_mode is not None and bool(training_mode.item()) and (ratio is None or float(ratio.item()) > 0):
        raise NotImplementedError("Dropout with training_mode=True is not supported (inference only)")
    if _n_outputs(op) > 1:
        return x, torch.ones(x.shape, dtype=torch.bool)
    return x


# ---------------------------------------------------------------- quantization


def _quant_param(p: torch.Tensor, x: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    """Scale / zero point broadcast against ``x``: per tensor, per axis, or blocked (opset 21)."""
    if p.dim() == 0 or (p.numel() == 1 and not block_size):
        return p.reshape(())
    axis = _axis(axis, x.dim())
    if block_size:
        return p.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def _quant_type(op, zero_point) -> int:
    """The ONNX elem type of QuantizeLinear's output: the zero point's, else output_dtype, else uint8."""
    if zero_point is not None:
        declared = op.input_elem_types[2] if len(op.input_elem_types) > 2 else None
        if declared in (TensorProto.INT4, TensorProto.UINT4):
            return declared
        return TORCH_TO_ONNX[zero_point.dtype]
    return _attr(op, "output_dtype", 0) or TensorProto.UINT8


@register("QuantizeLinear")
def _quantize_linear(op, x, scale, zero_point=None):
    axis, block = _attr(op, "axis", 1), _attr(op, "block_size", 0)
    qtype = _quant_type(op, zero_point)
    xf = x if x.dtype == torch.float32 else x.to(torch.float32)
    ratio = xf / _quant_param(scale.to(torch.float32), x, axis, block)
    dtype = torch_dtype(qtype)
    if dtype in _FLOAT8:
        if zero_point is not None:
            ratio = ratio + _quant_param(zero_point.to(torch.float32), x, axis, block)
        return _to_float8(ratio, dtype, bool(_attr(op, "saturate", 1)))
    qmin, qmax = _QUANT_RANGE[qtype]
    # round half to even in float32 (as onnxruntime), then add the zero point exactly in float64
    y = torch.round(ratio).to(torch.float64)
    if zero_point is not None:
        y = y + _quant_param(zero_point.to(torch.int64), x, axis, block).to(torch.float64)
    return y.clamp(qmin, qmax).to(dtype)


@register("DequantizeLinear")
def _dequantize_linear(op, x, scale, zero_point=None):
    axis, block = _attr(op, "axis", 1), _attr(op, "block_size", 0)
    s = _quant_param(scale, x, axis, block)
    if x.dtype in _FLOAT8:
        return (x.to(torch.float32) * s.to(torch.float32)).to(scale.dtype)
    xi = x.to(torch.int64)
    if zero_point is not None:
        xi = xi - _quant_param(zero_point.to(torch.int64), x, axis, block)
    # onnxruntime: float(x - zp) * scale, in float32 whatever the scale's type
    return (xi.to(torch.float32) * s.to(torch.float32)).to(scale.dtype)
