"""TVM lowering of ``intq.Shiftmax`` (spec: ``quantizer/ops/shiftmax.py``).

    t      = x - max(x, axis=-1)                       (int64, t <= 0)
    e      = shift_exp(t, D)                           (int64 in [D, D * 2**15])
    factor = 2**62 // sum(e, axis=-1)                  (int64, operands > 0)
    y      = clamp((e * factor + 2**54) >>u 55, 0, 127)  (int8)

``x``: an integer tensor ``[..., L]`` (leading dims and ``L`` may be
symbolic), widened to int64 first; ``D``: int64, a scalar (baked in as an
immediate when it is a constant) or a buffer that broadcasts onto ``x``.

One PrimFunc per node, five blocks: the row maximum, ``e`` (kept in a
buffer, so each element's exp is computed once), the row sum, the row's
``factor`` (one 64-bit division per row, not per element) and the output.

Exactness against the ONNX function:

- ``Div`` truncates; every division here has non-negative operands, so
  ``truncdiv`` (see ``shift_exp`` for the exp's own division).
- The final shift is unsigned (``uint64`` cast, shift, cast back) exactly as
  ``normalize_onnx`` does.  Within the spec's bounds (``max - min < 2**32``
  per row, ``L * D * 2**15 < 2**62``) ``0 <= e * factor + 2**54 < 2**63``
  and a signed shift would give the same value; the unsigned one costs
  nothing and keeps the two forms identical.
``MaskedShiftmax(x, keep, D)``: the same five blocks over the kept elements
(``keep != 0``, read at the output index under numpy broadcasting,
``add.broadcast_index``): the row maximum of ``k ? x : -2**40``, ``e = k ?
shift_exp(x - max, D) : 0``, the row sum clamped to at least 1, so a row
with no kept element is all 0, exactly as ``quantizer/ops/shiftmax.py``
computes it; the block names are Shiftmax's, so its schedule applies.

- An int8/int16/int32 (or uint8/16/32) ``x`` meets the row bound for every
  value; an int64 ``x`` must be kept inside it by its producer (nothing at
  compile time can check it).  ``L * D`` is checked when both are known.
"""

from __future__ import annotations

from intq.passes.compat import relax, te, tensor_type, tirx
from intq.passes.ops import dyadic
from intq.passes.ops.add import broadcast_index, broadcast_shape
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
from intq.passes.ops.shift_exp import EXP_BITS, check_divisor, shift_exp

NORM_SHIFT = 62  # factor = 2**62 // sum
OUT_SHIFT = 55  # y = (e * factor + 2**54) >> 55, scale 1/128
INPUT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")


def row_factor(total: tirx.PrimExpr) -> tirx.PrimExpr:
    """``2**62 // total`` for an int64 ``total >= 1``."""
    return tirx.truncdiv(tirx.const(1 << NORM_SHIFT, "int64"), total)


def normalize(e: tirx.PrimExpr, factor: tirx.PrimExpr) -> tirx.PrimExpr:
    """``clamp((e * factor + 2**54) >>u 55, 0, 127)`` (int64); ``factor = 2**62 // total``, ``0 <= e <= total``."""
    rounded = e * factor + tirx.const(1 << (OUT_SHIFT - 1), "int64")
    shifted = (rounded.astype("uint64") >> tirx.const(OUT_SHIFT, "uint64")).astype("int64")
    return dyadic.clamp(shifted, 0, 127)


def shiftmax_te(x: te.Tensor, D: Operand) -> te.Tensor:
    lead, length = x.shape[:-1], x.shape[-1]
    k = te.reduce_axis((0, length), name="k")
    row_max = te.compute(lead, lambda *i: te.max(x[(*i, k)].astype("int64"), axis=k), name="row_max")

    def exp(*i):
        return shift_exp(x[i].astype("int64") - row_max[i[:-1]], read_param(D, i))

    e = te.compute(x.shape, exp, name="exp")
    j = te.reduce_axis((0, length), name="j")
    total = te.compute(lead, lambda *i: te.sum(e[(*i, j)], axis=j), name="row_sum")
    factor = te.compute(lead, lambda *i: row_factor(total[i]), name="factor")
    return te.compute(x.shape, lambda *i: normalize(e[i], factor[i[:-1]]).astype("int8"), name="shiftmax")


def check_scores(cls, node: str, x: relax.Expr, D: relax.Expr) -> Operand:
    """Refuse scores ``x`` or a divisor ``D`` outside the spec's bounds; ``D`` as an immediate or a buffer."""
    if dtype_of(x) not in INPUT_DTYPES:
        raise cls.fail(node, f"x must be int8/16/32/64 or uint8/16/32, got {dtype_of(x)}")
    shape = static_shape(x)
    if not shape:
        raise cls.fail(node, "x must have at least one axis (the softmax runs over the last one)")
    D = param_operand(D)
    if isinstance(D, int):
        check_divisor(cls, node, D)
        check_row_sum(cls, node, shape[-1], D)
    else:
        check_trailing_broadcast(cls, node, "D", D, shape)
    return D


def check_row_sum(cls, node: str, length: int | None, D: int) -> None:
    """Refuse a static row length for which ``L * D * 2**15`` reaches ``2**62`` (the row sum would overflow)."""
    if length is not None and length * D << EXP_BITS >= 1 << NORM_SHIFT:
        raise cls.fail(
            node,
            f"L * D * 2**15 = {length} * {D} * 2**15 reaches 2**62, where the row sum overflows; "
            "shorten the rows or calibrate a larger input scale",
        )


MASKED_SENTINEL = -(1 << 40)  # below every int32: masked elements never raise the row maximum
KEEP_DTYPES = ("bool", "int8", "uint8", "int16", "int32", "int64")


def masked_shiftmax_te(x: te.Tensor, keep: te.Tensor, D: Operand) -> te.Tensor:
    lead, length = x.shape[:-1], x.shape[-1]
    zero = tirx.const(0, "int64")

    def kept(i):
        value = keep[broadcast_index(keep.shape, x.shape, i)]
        return value if keep.dtype == "bool" else value != tirx.const(0, keep.dtype)

    k = te.reduce_axis((0, length), name="k")
    sentinel = tirx.const(MASKED_SENTINEL, "int64")
    row_max = te.compute(
        lead,
        lambda *i: te.max(tirx.Select(kept((*i, k)), x[(*i, k)].astype("int64"), sentinel), axis=k),
        name="row_max",
    )

    def exp(*i):
        t = tirx.Select(kept(i), x[i].astype("int64") - row_max[i[:-1]], zero)
        return tirx.Select(kept(i), shift_exp(t, read_param(D, i)), zero)

    e = te.compute(x.shape, exp, name="exp")
    j = te.reduce_axis((0, length), name="j")
    total = te.compute(lead, lambda *i: te.sum(e[(*i, j)], axis=j), name="row_sum")
    factor = te.compute(lead, lambda *i: row_factor(te.max(total[i], tirx.const(1, "int64"))), name="factor")
    return te.compute(x.shape, lambda *i: normalize(e[i], factor[i[:-1]]).astype("int8"), name="shiftmax")


class Shiftmax(IntqConverter):
    op_type = "Shiftmax"
    inputs = ("x", "D")

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr]) -> relax.Expr:
        D = check_scores(cls, node, args["x"], args["D"])
        return bb.call_te(
            shiftmax_te, args["x"], D, primfunc_name_hint="intq_shiftmax", primfunc_attrs=kernel_attrs(cls.op_type)
        )


class MaskedShiftmax(IntqConverter):
    op_type = "MaskedShiftmax"
    inputs = ("x", "keep", "D")

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr]) -> relax.Expr:
        x, keep = args["x"], args["keep"]
        D = check_scores(cls, node, x, args["D"])
        if dtype_of(keep) not in KEEP_DTYPES:
            raise cls.fail(node, f"keep must be bool or an integer tensor, got {dtype_of(keep)}")
        keep_dims, x_dims = tensor_type(keep).shape.values, tensor_type(x).shape.values
        try:
            out = broadcast_shape(x_dims, keep_dims)
        except ValueError as err:
            raise cls.fail(node, f"keep {list(keep_dims)} does not broadcast onto x {list(x_dims)}: {err}") from None
        grows = len(out) != len(x_dims) or any(
            isinstance(o, tirx.IntImm) and (not isinstance(d, tirx.IntImm) or int(d) != int(o))
            for d, o in zip(x_dims, out, strict=True)
        )
        if grows:
            raise cls.fail(node, f"keep {list(keep_dims)} would grow x {list(x_dims)}; it must broadcast onto x")
        return bb.call_te(
            masked_shiftmax_te,
            x,
            keep,
            D,
            primfunc_name_hint="intq_masked_shiftmax",
            primfunc_attrs=kernel_attrs(cls.op_type),
        )
