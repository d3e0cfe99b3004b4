"""Integer linear layers: int8 x int8 products summed in an int32 accumulator.

``IntLinear`` (requantized to int8)::

    acc = x @ w.T + b                                    (int32)
    y   = clamp((acc * m + 2**(s-1)) >> s, qmin, qmax)   (int8)

with the clamp range ``[qmin, qmax]`` ``[-128, 127]`` by default; another
range inside int8 (``base.activation_range``) names the op
``IntLinear_c0x15`` etc. (``base.range_suffix``).

``IntLinearAcc`` (the raw accumulator, for a dequantizer that follows)::

    y = x @ w.T + b                                      (int32)

- ``x``: int8 ``[..., K]``; ``w``: int8 ``[N, K]`` (the ``nn.Linear``
  layout, stored as given and transposed inside the ONNX function;
  ``weight_bits=4``: values in ``[-8, 7]``, written as packed ONNX INT4,
  see ``base.packed_int4``);
  ``b``: int32 ``[N]``; ``m``, ``s``: int64 ``[N]``, ``(m, s) =
  dyadic(ratio)`` per output channel with ``ratio = S_x * S_w[n] / S_y``.
- Accumulator bound: every product lies in ``[-128*127, 128*128]``, so
  ``|acc| <= K * 2**14 + max|b|``; the constructor requires this to be
  ``< 2**31`` (``K <= 131071`` without bias), so the int32 accumulator never
  wraps, in onnxruntime or anywhere else.
- Requantize margin (``dyadic``'s contract): ``|acc * m| + 2**(s-1) <
  2**62``, checked in the constructor; it fails only for ratios near
  ``2**30`` and above, which no real layer has.
- Rounding: half up, once (see ``dyadic``).  Float meaning: with ``v = acc *
  ratio``, ``|y - clip(v, -128, 127)| <= 1/2 + |v| * 2**-24`` (the 24-bit
  multiplier's relative error is at most ``2**-24`` while ``2**-38 <=
  |ratio| < 2**23``, i.e. while ``s`` is off its limits; ``clip`` is
  1-Lipschitz).
- Torch emulation: ``int_matmul`` (float64 BLAS, exact because every partial
  sum is an integer below ``2**31 < 2**53``).
- ONNX body: ``MatMulInteger(x, Transpose(w))`` (int8 x int8 -> int32, exact
  by the accumulator bound), ``Cast`` to int64, ``Add`` the bias, then
  ``FunctionBuilder.requantize``; ``IntLinearAcc`` adds the int32 bias
  directly.

The validation helpers below (integer ranges, accumulator bound, requantize
margin) are shared by the other accumulating ops (``matmul``, ``conv``,
``add``).
"""

from __future__ import annotations

import numpy as np
import torch

from intq.quantizer.ops.base import IntegerOp, as_buffer, check_range, class_or_instance_method, range_suffix
from intq.quantizer.ops.dyadic import dyadic, int_matmul, requantize
from intq.quantizer.ops.onnx_fn import FunctionBuilder

INT8_PRODUCT_MAX = 128 * 128  # the largest |x * w| for int8 operands: (-128) * (-128)
ACC_LIMIT = 1 << 31  # int32 accumulators hold |acc| < 2**31
MAX_K = (ACC_LIMIT - 1) // INT8_PRODUCT_MAX  # 131071: longest bias-free int8 reduction
REQUANTIZE_LIMIT = 1 << 62  # dyadic's margin: |x * m| + 2**(s-1) < 2**62


def weight_range(weight_bits: int, where: str) -> tuple[int, int]:
    """The integer range of ``weight_bits``-bit weights (4: packable as ONNX INT4; 8: int8)."""
    if weight_bits not in (4, 8):
        raise ValueError(f"{where}: weight_bits must be 4 or 8, got {weight_bits!r}")
    return -(1 << (weight_bits - 1)), (1 << (weight_bits - 1)) - 1


def int_array(value, lo: int, hi: int, name: str, where: str) -> np.ndarray:
    """``value`` as an int64 array, refusing non-integer dtypes and values outside ``[lo, hi]``."""
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where}: {name} must be an integer array, got dtype {arr.dtype}; quantize it first")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise ValueError(
            f"{where}: {name} has values in [{arr.min()}, {arr.max()}], outside the representable range [{lo}, {hi}]"
        )
    return arr


def accumulator_bound(k: int, bias: np.ndarray | None, where: str) -> int:
    """Largest ``|sum_k x*w + b|`` for int8 ``x``, ``w``; ValueError when it can leave int32."""
    bias_max = int(np.abs(bias).max()) if bias is not None and bias.size else 0
    bound = k * INT8_PRODUCT_MAX + bias_max
    if bound >= ACC_LIMIT:
        raise ValueError(
            f"{where}: reduction length K={k} with max |bias| = {bias_max} can overflow the int32 accumulator "
            f"(K * 128 * 128 + max|b| = {bound} >= 2**31); K must stay <= {MAX_K} (less with a large bias): "
            "split the reduction"
        )
    return bound


def check_requantize_margin(acc_bound: int, m: np.ndarray, s: np.ndarray, where: str) -> None:
    """Refuse ``(m, s)`` for which ``|acc * m| + 2**(s-1)`` can reach ``2**62`` (``dyadic``'s contract)."""
    worst = acc_bound * int(np.abs(m).max()) + (1 << (int(np.max(s)) - 1))
    if worst >= REQUANTIZE_LIMIT:
        raise ValueError(
            f"{where}: scale ratio too large for the requantize margin: |acc * m| + 2**(s-1) can reach "
            f"{worst} >= 2**62 (multiplier m = {int(np.abs(m).max())}, |acc| <= {acc_bound}); "
            "rescale the output so that the ratio is below 2**23"
        )


def channel_ratio(ratio, n: int, where: str) -> np.ndarray:
    """A float64 ``[n]`` ratio from a scalar or an ``[n]`` array."""
    r = np.asarray(ratio, dtype=np.float64)
    if r.ndim > 1 or (r.ndim == 1 and r.shape[0] != n):
        raise ValueError(f"{where}: ratio must be a scalar or have shape [{n}] (one per output channel), got {r.shape}")
    return np.broadcast_to(r, (n,)).copy()


class _LinearBase(IntegerOp):
    """Holds ``w`` (int8 ``[N, K]``) and ``b`` (int32 ``[N]``) and forms the accumulator."""

    def __init__(self, weight, bias, weight_bits: int = 8):
        super().__init__()
        where = type(self).op_type
        w = int_array(weight, *weight_range(weight_bits, where), "weight", where)
        if w.ndim != 2 or w.size == 0:
            raise ValueError(f"{where}: weight must be a non-empty [N, K] array, got shape {w.shape}")
        n, k = w.shape
        b = np.zeros(n, np.int64) if bias is None else int_array(bias, -(2**31), 2**31 - 1, "bias", where)
        if b.shape != (n,):
            raise ValueError(f"{where}: bias must have shape [{n}] (one per output channel), got {b.shape}")
        self.acc_bound = accumulator_bound(k, b, where)
        self.register_buffer("w", as_buffer(w, torch.int8))
        self.register_buffer("b", as_buffer(b, torch.int32))
        self.packed_int4 = frozenset({"w"}) if weight_bits == 4 else frozenset()

    def accumulate(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w.T + b`` as exact int64."""
        return int_matmul(x, self.w.T) + self.b

    @staticmethod
    def onnx_matmul(fb: FunctionBuilder) -> str:
        """int32 ``x @ w.T`` in the function body (``MatMulInteger`` on the transposed weight)."""
        return fb.op("MatMulInteger", "x", fb.op("Transpose", "w", perm=[1, 0]))


class IntLinear(_LinearBase):
    op_type = "IntLinear"
    data_inputs = ("x",)
    param_names = ("w", "b", "m", "s")
    output_dtype = torch.int8
    qmin, qmax = -128, 127

    def __init__(self, weight, bias, ratio, qmin: int = -128, qmax: int = 127, weight_bits: int = 8):
        super().__init__(weight, bias, weight_bits)
        family = type(self).op_type
        info = torch.iinfo(self.output_dtype)
        self.qmin, self.qmax = check_range(qmin, qmax, info.min, info.max, family)
        self.op_type = family + range_suffix(self.qmin, self.qmax, default=(type(self).qmin, type(self).qmax))
        m, s = dyadic(channel_ratio(ratio, self.w.shape[0], family))
        check_requantize_margin(self.acc_bound, m, s, family)
        self.register_buffer("m", as_buffer(m, torch.int64))
        self.register_buffer("s", as_buffer(s, torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return requantize(self.accumulate(x), self.m, self.s, self.qmin, self.qmax).to(self.output_dtype)

    @class_or_instance_method
    def function_proto(self):
        fb = FunctionBuilder(self.op_type, ["x", "w", "b", "m", "s"], doc=__doc__)
        acc = fb.op("Add", fb.cast(self.onnx_matmul(fb), "int64"), fb.cast("b", "int64"))
        fb.requantize(acc, "m", "s", self.qmin, self.qmax, str(self.output_dtype).removeprefix("torch."), out="y")
        return fb.build()


class IntLinear16(IntLinear):
    """``IntLinear`` whose output is requantized to int16: ``clamp(..., -32768, 32767)``.

    For a linear layer whose only consumer is a residual add (the int16
    residual stream): transformer FFN outputs carry a few channels with
    values ~100x the rest, which an int8 per-tensor scale cannot hold
    (MiniLM-L6: fake-quantizing the FFN outputs alone to int8 drops the
    embedding cosine to 0.88; int16 keeps it above 0.999).
    """

    op_type = "IntLinear16"
    output_dtype = torch.int16
    qmin, qmax = -32768, 32767

    def __init__(self, weight, bias, ratio, weight_bits: int = 8):
        super().__init__(weight, bias, ratio, self.qmin, self.qmax, weight_bits)


class IntLinearAcc(_LinearBase):
    op_type = "IntLinearAcc"
    data_inputs = ("x",)
    param_names = ("w", "b")
    output_dtype = torch.int32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.accumulate(x).to(self.output_dtype)

    @classmethod
    def function_proto(cls):
        fb = FunctionBuilder(cls.op_type, ["x", "w", "b"], doc=__doc__)
        # No overflow: |x @ w.T + b| < 2**31 is the constructor's accumulator bound.
        fb.op("Add", cls.onnx_matmul(fb), "b", out="y")
        return fb.build()
