"""TVM lowering of ``intq.ShiftGELU`` (spec: ``quantizer/ops/shiftgelu.py``).

Elementwise, in int64::

    mx  = max(x, 0)
    ea  = shift_exp(x - mx, D);  eb = shift_exp(-mx, D)
    sig = clamp((ea * (2**62 // (ea + eb)) + 2**54) >>u 55, 0, 127)
    y   = clamp((x * sig * m + 2**(s-1)) >> s, -128, 127)         (int8)

``x``: int8 or int16, any rank, dims may be symbolic; ``D``, ``m``, ``s``:
int64 scalars (immediates when constant) or buffers that broadcast onto
``x``.  One PrimFunc, one elementwise block.  ``sig`` is Shiftmax's
``normalize`` (same truncating division, same unsigned shift as the ONNX
``normalize_onnx``); ``y`` is the dyadic requantize, whose signed shift
equals the ONNX ``floor_shift`` because ``|x * sig * m| < 2**15 * 2**7 *
2**24 = 2**46`` stays inside its ``2**62`` margin.  That bound is why int32
inputs are refused: the ONNX form would leave its margin.

Lookup table.  An int8 ``x`` has 256 values; when ``D``, ``m`` and ``s``
are all constants (immediates), the converter evaluates the formula above
for every one of them at compile time (``shiftgelu_table``, numpy int64)
and the kernel becomes a gather::

    T[v + 128] = ShiftGELU(v) for v in [-128, 127]      (int8[256], a relax constant)
    y          = T[int32(x) + 128]

The kernel (``passes/ops/lookup.py``'s ``lookup_te``: block ``lookup``,
params ``x``, ``T``, ``y``) replaces a
per-element 64-bit division with one byte load; it carries the same
``intq.op`` tag and immediates.  The table path needs the formula to be
defined for every int8 ``x``: ``1 <= s <= 62`` and ``|128 * 127 * m| +
2**(s-1) < 2**62`` (the requantize contract; ``dyadic`` gives ``|m| <
2**24``).  An int16 ``x``, a buffer ``D``, ``m`` or ``s``, or a constant
``m`` outside that contract keep the formula kernel above; a constant ``s``
outside ``[1, 62]`` is refused, as a constant ``D`` outside ``[1, 2**20]``.
"""

from __future__ import annotations

import numpy as np

from intq.passes.compat import relax, te, tirx
from intq.passes.ops import dyadic
from intq.passes.ops.base import (
    IntqConverter,
    Operand,
    check_trailing_broadcast,
    dtype_of,
    kernel_attrs,
    param_operand,
    read_param,
    static_shape,
)
from intq.passes.ops.lookup import OFFSET as TABLE_OFFSET
from intq.passes.ops.lookup import lookup_te
from intq.passes.ops.shift_exp import EXP_BITS, MAX_DIVISOR, check_divisor, shift_exp
from intq.passes.ops.shiftmax import NORM_SHIFT, OUT_SHIFT, normalize, row_factor

QMIN, QMAX = -128, 127
INPUT_DTYPES = ("int8", "int16")
MAX_PRODUCT = 128 * 127  # max |x * sig| for an int8 x, sig in [0, 127]
MIN_SHIFT, MAX_SHIFT = 1, 62  # s, as quantizer.ops.dyadic makes it


def shift_sigmoid(x: tirx.PrimExpr, D: tirx.PrimExpr) -> tirx.PrimExpr:
    """``sig`` in ``[0, 127]`` (int64, scale 1/128) ``~ sigmoid(x / D)`` of an int64 expression ``x``."""
    mx = te.max(x, tirx.const(0, "int64"))
    ea = shift_exp(x - mx, D)
    eb = shift_exp(-mx, D)
    return normalize(ea, row_factor(ea + eb))


def shiftgelu_te(x: te.Tensor, D: Operand, m: Operand, s: Operand) -> te.Tensor:
    def body(*i):
        xi = x[i].astype("int64")
        sig = shift_sigmoid(xi, read_param(D, i))
        return dyadic.requantize(xi * sig, read_param(m, i), read_param(s, i), QMIN, QMAX, "int8")

    return te.compute(x.shape, body, name="shiftgelu")


def table_applies(D: int, m: int, s: int) -> bool:
    """Whether constant params keep every int8 ``x`` inside the formula's contract (module docstring)."""
    return 1 <= D <= MAX_DIVISOR and MIN_SHIFT <= s <= MAX_SHIFT and abs(m) * MAX_PRODUCT + (1 << (s - 1)) < 1 << 62


def shiftgelu_table(D: int, m: int, s: int) -> np.ndarray:
    """``T`` (int8 ``[256]``): ``T[v + 128] = ShiftGELU(v)`` for ``v`` in ``[-128, 127]``, in numpy int64.

    The kernel's formula step for step (``shift_exp``, ``normalize``, ``dyadic.requantize``)::

        mx  = max(x, 0)
        t2  = max(t + (t >> 1) - (t >> 4), -15 D);  q = (-t2) // D;  r = -t2 - q D
        e   = (D - (r >> 1)) << (15 - q)            for t = x - mx (ea) and t = -mx (eb)
        sig = clamp((ea * (2**62 // (ea + eb)) + 2**54) >>u 55, 0, 127)
        y   = clamp((x * sig * m + 2**(s-1)) >> s, -128, 127)

    numpy's ``>>`` on int64 is arithmetic (TIR's ``ashr``); ``//`` floors, which
    equals the kernel's ``truncdiv`` because both operands are non-negative.
    ``ValueError`` unless ``table_applies(D, m, s)``: outside it the formula
    overflows int64 and the kernel's result is not defined.
    """
    if not table_applies(D, m, s):
        raise ValueError(f"ShiftGELU table: D = {D}, m = {m}, s = {s} lie outside the requantize contract")
    x = np.arange(-TABLE_OFFSET, 256 - TABLE_OFFSET, dtype=np.int64)
    mx = np.maximum(x, 0)
    ea, eb = _shift_exp(x - mx, D), _shift_exp(-mx, D)
    factor = np.int64(1 << NORM_SHIFT) // (ea + eb)
    rounded = (ea * factor + np.int64(1 << (OUT_SHIFT - 1))).view(np.uint64)
    sig = np.clip((rounded >> np.uint64(OUT_SHIFT)).view(np.int64), 0, 127)
    y = (x * sig * np.int64(m) + (np.int64(1) << np.int64(s - 1))) >> np.int64(s)
    return np.clip(y, QMIN, QMAX).astype(np.int8)


def _shift_exp(t: np.ndarray, D: int) -> np.ndarray:
    """``passes/ops/shift_exp.shift_exp`` on an int64 array ``t <= 0``."""
    D64 = np.int64(D)
    t2 = np.maximum(t + (t >> 1) - (t >> 4), -EXP_BITS * D64)
    neg = -t2
    q = neg // D64
    return (D64 - ((neg - q * D64) >> 1)) << (EXP_BITS - q)


class ShiftGELU(IntqConverter):
    op_type = "ShiftGELU"
    inputs = ("x", "D", "m", "s")

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr]) -> relax.Expr:
        x = args["x"]
        if dtype_of(x) not in INPUT_DTYPES:
            raise cls.fail(node, f"x must be int8 or int16, got {dtype_of(x)}; requantize it first")
        shape = static_shape(x)
        params = {name: param_operand(args[name]) for name in ("D", "m", "s")}
        for name, value in params.items():
            if not isinstance(value, int):
                check_trailing_broadcast(cls, node, name, value, shape)
        if isinstance(params["D"], int):
            check_divisor(cls, node, params["D"])
        if isinstance(params["s"], int) and not MIN_SHIFT <= params["s"] <= MAX_SHIFT:
            raise cls.fail(node, f"s = {params['s']} lies outside [1, 62]; re-export the model (dyadic computes s)")
        if dtype_of(x) == "int8" and all(isinstance(v, int) for v in params.values()) and table_applies(**params):
            table = relax.const(shiftgelu_table(**params), "int8")
            attrs = kernel_attrs(cls.op_type, **params)  # the params the table was built from
            return bb.call_te(
                lookup_te, x, table, TABLE_OFFSET, primfunc_name_hint="intq_shiftgelu", primfunc_attrs=attrs
            )
        return bb.call_te(
            shiftgelu_te,
            x,
            *params.values(),
            primfunc_name_hint="intq_shiftgelu",
            primfunc_attrs=kernel_attrs(cls.op_type),
        )
