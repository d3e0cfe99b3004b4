"""TVM lowering of ``intq.IntLookup`` (spec: ``quantizer/ops/lookup.py``), and the table kernel ShiftGELU shares.

    y = table[int32(x) + offset]                         (int8)

``x``: int8, any rank, dims may be symbolic; ``table``: int8 ``[C * 256]``,
a constant; ``offset``: int32, the immediate ``128`` (one table) or a
constant ``256 c + 128`` per channel that broadcasts onto ``x``.  One
PrimFunc, one elementwise block named ``lookup`` (params ``x``, ``table``,
[``offset``,] ``y``), which ``schedules/rows.py`` schedules: rows in
parallel, and on AVX-512 VBMI the one-table kernel gathers 64 bytes per
``vpermi2b`` pair.

Bounds, checked at import: every offset lies in ``[128, 256 C - 128]`` and
is ``128`` modulo 256, so ``int32(x) + offset`` (``x`` in ``[-128, 127]``)
stays inside the table: the gather cannot read out of bounds, whatever the
input.  An input that is not int8 is refused (the table has 256 entries per
channel).
"""

from __future__ import annotations

import numpy as np

from intq.passes.compat import constant_value, relax, te, tirx
from intq.passes.ops.add import broadcast_index
from intq.passes.ops.base import IntqConverter, Operand, dtype_of, kernel_attrs, param_operand, static_shape

ENTRIES = 256
OFFSET = 128  # the index of x = 0 in a channel's table


def lookup_te(x: te.Tensor, table: te.Tensor, offset: Operand = OFFSET) -> te.Tensor:
    """``table[int32(x) + offset]`` elementwise; ``offset`` an immediate or an int32 tensor broadcast onto ``x``."""

    def body(*i):
        if isinstance(offset, int):
            shift = tirx.const(offset, "int32")
        else:
            shift = offset[broadcast_index(offset.shape, x.shape, i)].astype("int32")
        return table[x[i].astype("int32") + shift]

    return te.compute(x.shape, body, name="lookup")


class IntLookup(IntqConverter):
    op_type = "IntLookup"
    inputs = ("x", "table", "offset")

    @classmethod
    def convert(cls, bb: relax.BlockBuilder, node: str, args: dict[str, relax.Expr]) -> relax.Expr:
        x, table = args["x"], args["table"]
        if dtype_of(x) != "int8":
            raise cls.fail(node, f"x must be int8 (the table has {ENTRIES} entries per channel), got {dtype_of(x)}")
        entries = constant_value(table)
        if entries is None or dtype_of(table) != "int8" or entries.ndim != 1 or entries.size % ENTRIES:
            raise cls.fail(node, f"table must be a constant int8 [C * {ENTRIES}], got {dtype_of(table)}")
        channels = entries.size // ENTRIES
        offset = param_operand(args["offset"])
        raw = offset if isinstance(offset, int) else constant_value(offset)
        values = None if raw is None else np.asarray(raw)
        if values is None or values.dtype.kind not in "iu":
            raise cls.fail(node, "offset must be a constant int32 (256 * channel + 128)")
        if values.size and (
            values.min() < OFFSET or values.max() > ENTRIES * channels - OFFSET or (values % ENTRIES != OFFSET).any()
        ):
            raise cls.fail(
                node, f"offset values must be 256 * c + 128 for c < {channels}: the gather would leave the table"
            )
        if not isinstance(offset, int):
            shape, x_shape = static_shape(offset), static_shape(x)
            if len(shape) > len(x_shape) or any(
                p != 1 and p != o for p, o in zip(reversed(shape), reversed(x_shape), strict=False)
            ):
                raise cls.fail(node, f"offset {shape} does not broadcast onto x {x_shape} along static dims")
        return bb.call_te(
            lookup_te,
            x,
            table,
            offset,
            primfunc_name_hint="intq_lookup",
            primfunc_attrs=kernel_attrs(cls.op_type, offset=offset),
        )
