"""The x86 dot instructions of the attention matmuls (``batch_matmul``'s "x86" plan), exact for any int8 operands.

``a @ b`` with both operands int8 activations: ``-128`` may sit on either
side, so neither the ``vpsignb`` trick of the linears (``x86_int8``: it
negates the weight) nor ``vpmaddubsw`` (its int16 pair sums saturate at
``2 * 255 * 127 > 32767`` once one side is made unsigned) is exact here.
Each ``MatmulDot`` below is one instruction that adds ``G`` products per
int32 lane, ``L`` lanes per vector register::

    acc[j] += sum_{t<G} A[t] * B[j, t]          j < L

``A``: ``G`` consecutive elements of one row of ``a`` (a panel, see
``batch_matmul``), broadcast to every lane as one 32-bit word; ``B``: ``b``
packed per ``(batch, group ko of G rows, column block jb)`` as ``L x G``
contiguous elements (``B[j, t] = b[G ko + t, L jb + j]``), one vector.

- ``VNNI_U8`` (``vpdpbusd``, AVX512_VNNI, ``L = 16``, ``G = 4``): unsigned
  bytes times signed bytes.  ``a`` enters the panel as ``a ^ 0x80``, i.e.
  the unsigned byte ``a + 128``, and ``b`` as it is; the accumulator starts
  at ``-128 * sum_k b[k, j]`` (``column_bias``, the same instruction with
  ``A = 128``), so it ends at ``sum_k (a + 128) b - 128 sum_k b = sum_k a b``.
  Exact: each product ``|(a + 128) b| <= 255 * 128 = 32640`` is formed in
  16 bits without saturation, the four are added into the int32 lane with
  wrapping (``vpdpbusd``, not the saturating ``vpdpbusds``), and the start
  value ``|128 sum_k b| <= 2**14 K < 2**31`` (``K <= MAX_K``) fits.  The
  partial sums may leave int32 (``(a + 128) b`` is up to 255 times larger
  than ``a b`` on one side), but inside the instruction the lane wraps modulo
  ``2**32``, and the final value, the exact ``sum_k a b``, lies in int32:
  it is the true sum.  64 products per instruction.
- ``VNNI_I16`` (``vpdpwssd``, AVX512_VNNI, ``L = 16``, ``G = 2``): both
  operands sign-extended to int16, two int16 products per lane added into
  int32 (wrapping).  Exact without a bias (``|a b| <= 2**14``); 32 products
  per instruction.
- ``AVX2_I16`` (``vpmaddwd`` then ``vpaddd``, AVX2, ``L = 8``, ``G = 2``):
  as ``VNNI_I16`` on 256-bit registers in two instructions: ``vpmaddwd``'s
  pair sum is at most ``2 * 128 * 128 = 32768`` in magnitude, exact in its
  int32 result (its one overflowing case, ``(-32768)**2 * 2``, needs int16
  operands below ``-128``); 16 products per two instructions.

``b``'s packing is one shuffle per ``L x G`` block (``pack_b``: ``G`` row
loads of ``L`` bytes interleaved, which LLVM lowers to ``vpunpck*``), the
int16 variants sign-extend first (``vpmovsxbw``).  The intrinsics are called
with the operand types of the LLVM inside TVM 0.27: ``vpdpbusd`` takes
``<64 x i8>`` multiplicands and ``vpdpwssd`` ``<32 x i16>`` (TVM's own VNNI
intrinsic, written for older LLVMs, passes ``<16 x i32>`` and fails to
compile).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from intq.passes.compat import tirx, tvm
from intq.passes.schedules.x86_int8 import vpdpbusd

BYTES_128 = 0x80808080 - 2**32  # the int32 whose four bytes are 0x80 (each 128 as an unsigned byte)


def _bcast(word: tirx.PrimExpr, lanes: int, dtype: str) -> tirx.PrimExpr:
    """The 32-bit ``word`` in each of ``lanes`` dword lanes, read as a vector of ``dtype``."""
    return tirx.reinterpret(dtype, tirx.Broadcast(word, lanes))


@dataclass(frozen=True)
class MatmulDot:
    """One exact ``acc[j] += sum_{t<G} A[t] * B[j, t]`` instruction over ``L`` int32 lanes (module docstring)."""

    name: str
    features: tuple[str, ...]  # the LLVM target features it needs
    lanes: int  # L: int32 accumulators per vector register
    group: int  # G: reduction indices per lane and instruction
    packed: str  # element dtype of the panel of a and the packed b ("int8" or "int16")
    registers: int  # vector registers of the ISA the plan uses
    tile: tuple[int, int]  # the default register tile: rows x column blocks of L lanes
    biased: bool  # a enters as a + 128 (unsigned bytes): the accumulator starts at -128 * column sums of b
    instruction: Callable[[tirx.PrimExpr, tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr]  # (acc, word of A, B)

    def dot(self, acc: tirx.PrimExpr, word: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
        """``acc`` (int32 x L) plus the ``G`` products per lane of the int32 ``word`` (``G`` packed A) and ``B``."""
        return self.instruction(acc, word, b)

    def pack_a(self, a: tirx.PrimExpr) -> tirx.PrimExpr:
        """int8 elements of ``a`` (scalar or vector) as the panel holds them."""
        lanes = a.ty.dtype.lanes
        if self.biased:
            return tirx.bitwise_xor(a, _const(-128, "int8", lanes))  # the bits of the unsigned byte a + 128
        return tirx.Cast(_vector(self.packed, lanes), a)

    def pack_b(self, rows: Sequence[tirx.PrimExpr]) -> tirx.PrimExpr:
        """``G`` int8 x L rows of ``b`` interleaved into the ``L x G`` block ``B[j, t] = rows[t][j]``."""
        lanes = self.lanes
        if self.packed != "int8":
            rows = [tirx.Cast(_vector(self.packed, lanes), row) for row in rows]
        order = [t * lanes + j for j in range(lanes) for t in range(self.group)]
        return tirx.Shuffle(list(rows), [tirx.const(i, "int32") for i in order])

    def pack_b_scalar(self, value: tirx.PrimExpr) -> tirx.PrimExpr:
        return value if self.packed == "int8" else tirx.Cast(self.packed, value)

    def column_bias(self, acc: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
        """``acc + 128 * sum_t B[j, t]`` (the biased plan's correction, accumulated over the groups of a column)."""
        return self.dot(acc, tirx.const(BYTES_128, "int32"), b)

    def usable(self, target: tvm.target.Target) -> bool:
        return all(tvm.target.codegen.target_has_features(f, target) for f in self.features)


def _vector(dtype: str, lanes: int) -> str:
    return dtype if lanes == 1 else f"{dtype}x{lanes}"


def _const(value: int, dtype: str, lanes: int) -> tirx.PrimExpr:
    scalar = tirx.const(value, dtype)
    return scalar if lanes == 1 else tirx.Broadcast(scalar, lanes)


def _vpdpwssd(acc, word, b):
    lanes = acc.ty.dtype.lanes
    name = f"llvm.x86.avx512.vpdpwssd.{32 * lanes}"
    return tirx.call_llvm_pure_intrin(f"int32x{lanes}", name, acc, _bcast(word, lanes, f"int16x{2 * lanes}"), b)


def _vpmaddwd(acc, word, b):
    return acc + tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", _bcast(word, 8, "int16x16"), b)


VNNI_U8 = MatmulDot(
    "avx512vnni_u8",
    ("avx512vnni", "avx512bw", "avx512f"),
    lanes=16,
    group=4,
    packed="int8",
    registers=32,
    tile=(6, 4),
    biased=True,
    instruction=vpdpbusd,
)
VNNI_I16 = MatmulDot(
    "avx512vnni_i16",
    ("avx512vnni", "avx512bw", "avx512f"),
    lanes=16,
    group=2,
    packed="int16",
    registers=32,
    tile=(6, 4),
    biased=False,
    instruction=_vpdpwssd,
)
AVX2_I16 = MatmulDot(
    "avx2_i16",
    ("avx2",),
    lanes=8,
    group=2,
    packed="int16",
    registers=16,
    tile=(6, 2),
    biased=False,
    instruction=_vpmaddwd,
)
DOTS = (VNNI_U8, AVX2_I16)  # by preference; VNNI_I16 measured slower than VNNI_U8 (batch_matmul's docstring)


def matmul_dot(target: tvm.target.Target) -> MatmulDot | str:
    """The first of ``DOTS`` that ``target``'s CPU has (none on a non-x86 one), or the reason none applies."""
    for dot in DOTS:
        if dot.usable(target):
            return dot
    return f"the target {target.export().get('mcpu', '')!r} is not an x86 CPU with AVX2 (or AVX512_VNNI)"
