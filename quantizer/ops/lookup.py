"""IntLookup: an elementwise function of an int8 activation, as a table of 256 entries per channel.

    y = table[int32(x) + offset]                         (int8)

``x``: int8, any shape; ``table``: int8 ``[C * 256]`` (``C`` tables of 256
entries, one after the other); ``offset``: int32, a scalar ``128`` (one
table) or ``256 * c + 128`` for channel ``c``, shaped to broadcast onto
``x`` along its channel axis (``[C, 1, 1]`` for NCHW, ``[C]`` for the last
axis).  Every index lies in ``[256 c, 256 c + 255]``: an int8 ``x`` cannot
read outside its channel's table, in onnxruntime or in the TVM kernel.

Construction (``from_function``), at conversion time, in float64: for the
input scale ``S_in``, output scale ``S_out`` and integer range ``[qmin,
qmax]``::

    table[256 c + q + 128] = clamp(floor(f_c(q * S_in) / S_out + 1/2), qmin, qmax)   q in [-128, 127]

rounded half up like every requantize here; ``+inf`` clamps to ``qmax``,
``-inf`` to ``qmin``, NaN gives 0.  The float function is evaluated only
while converting: the integer graph reads the table and computes nothing.
``f`` is any elementwise function of one activation (``Sigmoid``,
``HardSwish``, SiLU ``x * sigmoid(x)``, ``Tanh``, ``Exp``, ``Erf``, ``LeakyRelu``,
``PRelu`` with one slope per channel: ``f_c``), so the table is exact for
it: ``|y * S_out - clip(f(x * S_in))| <= S_out / 2`` for every int8 ``x``,
the rounding of the output alone.

Why GELU and Softmax keep their shift-based forms (ShiftGELU, Shiftmax):
Softmax is a row-wise reduction, not elementwise; GELU follows the I-ViT
formula so that the integer model computes what the paper specifies, for
int16 inputs too (a table of an int16 input would hold 65536 entries).  On
an int8 input TVM evaluates ShiftGELU's formula into this same table kind
(``passes/ops/shiftgelu.py``).

ONNX body: ``Gather(table, Add(Cast(x, int32), offset))``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from intq.quantizer.ops.base import IntegerOp, as_buffer, check_range
from intq.quantizer.ops.onnx_fn import FunctionBuilder

ENTRIES = 256
OFFSET = 128  # table index of x = 0 within a channel's 256 entries


def table_values(f: Callable[[torch.Tensor], torch.Tensor], scale_in: float, channels: int, axis: int, rank: int):
    """``f`` at every int8 grid point ``q * scale_in`` of each channel: float64 ``[channels, 256]``.

    ``f`` takes a float64 tensor of rank ``rank`` whose ``axis`` holds the
    channels (constants of ``f`` broadcast along it) and broadcasts it
    elementwise; the 256 grid points run along another axis.
    """
    grid = torch.arange(-OFFSET, ENTRIES - OFFSET, dtype=torch.float64) * float(scale_in)
    if channels == 1:
        return f(grid.reshape((1,) * (rank - 1) + (ENTRIES,))).reshape(1, ENTRIES).double()
    axis = axis % rank
    along = 0 if axis != 0 else 1  # the grid's axis: any other than the channels'
    shape = [1] * rank
    shape[along] = ENTRIES
    values = f(grid.reshape(shape))
    values = torch.broadcast_to(
        values, [channels if i == axis else (ENTRIES if i == along else 1) for i in range(rank)]
    )
    return values.movedim((axis, along), (0, 1)).reshape(channels, ENTRIES).double()


def quantize_table(values: torch.Tensor, scale_out: float, qmin: int, qmax: int) -> np.ndarray:
    """``clamp(floor(values / scale_out + 1/2), qmin, qmax)`` as int8; ``+-inf`` clamp, NaN gives 0."""
    q = torch.floor(values / scale_out + 0.5)
    q = torch.nan_to_num(q, nan=0.0, posinf=float(qmax), neginf=float(qmin))
    return q.clamp(qmin, qmax).to(torch.int8).numpy()


class IntLookup(IntegerOp):
    op_type = "IntLookup"
    data_inputs = ("x",)
    param_names = ("table", "offset")
    output_dtype = torch.int8

    def __init__(self, table: np.ndarray, offset: np.ndarray | int = OFFSET):
        """``table``: int8 ``[C, 256]`` (or ``[256]``); ``offset``: ``OFFSET`` or ``256 c + 128`` per channel."""
        super().__init__()
        t = np.asarray(table)
        if t.dtype != np.int8 or t.size == 0 or t.size % ENTRIES or t.shape[-1] != ENTRIES:
            raise ValueError(f"IntLookup: the table must be int8 [C, {ENTRIES}], got {t.dtype} {t.shape}")
        channels = t.size // ENTRIES
        o = np.asarray(offset, dtype=np.int64)
        expected = np.arange(channels) * ENTRIES + OFFSET
        if not np.array_equal(np.sort(np.unique(o)), expected) or (channels > 1 and o.size != channels):
            raise ValueError(
                f"IntLookup: offset must hold 256 * c + 128 once for each of the {channels} tables, got {o.ravel()[:8]}"
            )
        self.register_buffer("table", as_buffer(t.reshape(-1), torch.int8))
        self.register_buffer("offset", as_buffer(o, torch.int32))

    @classmethod
    def from_function(
        cls,
        f: Callable[[torch.Tensor], torch.Tensor],
        scale_in: float,
        scale_out: float,
        qmin: int,
        qmax: int,
        channels: int = 1,
        axis: int = -1,
        rank: int = 1,
    ) -> IntLookup:
        """The tables of ``f`` (see the module docstring); ``channels > 1`` lays them along ``axis`` of a rank-``rank``
        input."""
        return cls.from_values(table_values(f, scale_in, channels, axis, rank), scale_out, qmin, qmax, axis, rank)

    @classmethod
    def from_values(
        cls, values: torch.Tensor, scale_out: float, qmin: int, qmax: int, axis: int = -1, rank: int = 1
    ) -> IntLookup:
        """The op for ``values`` (float64 ``[C, 256]``, ``table_values``): quantized, the offsets along ``axis``."""
        qmin, qmax = check_range(qmin, qmax, -128, 127, cls.op_type)
        table = quantize_table(values, scale_out, qmin, qmax)
        channels = table.shape[0]
        if channels == 1:
            return cls(table, OFFSET)
        shape = [1] * rank
        shape[axis % rank] = channels
        return cls(table, (np.arange(channels) * ENTRIES + OFFSET).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = x.to(torch.int64) + self.offset.to(torch.int64)
        return self.table[index]

    @classmethod
    def function_proto(cls):
        b = FunctionBuilder(cls.op_type, ["x", "table", "offset"], doc=__doc__)
        b.op("Gather", "table", b.op("Add", b.cast("x", "int32"), "offset"), out="y", axis=0)
        return b.build()
