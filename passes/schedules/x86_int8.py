"""The AVX2 int8 dot-product intrinsic of the GEMM schedule: 8 output channels x 4 reductions, exact.

    C[j] += sum_{k<4} int32(A[k]) * int32(B[j, k])        for j < 8

``A``: int8 ``[4]``, four consecutive activations of one row; ``B``: int8
``[8, 4]``, the weights of 8 output channels at the same 4 reduction
indices, contiguous (32 bytes, one ymm register); ``C``: int32 ``[8]``, the
8 accumulators (one ymm).  Declared as ``DOT_8X4_I8I8I32_AVX2`` with
``TensorIntrin.register`` (description + implementation); the GEMM schedule
substitutes the implementation through ``compat.tensorize`` because
``Schedule.tensorize`` crashes in this TVM build.

Implementation, five AVX2 instructions (plus the loads)::

    a   = vpbroadcastd(A)       the 4 bytes in each of the 8 dword lanes
    u   = vpsignb(a, a)         |a|, read as unsigned bytes (|-128| = 0x80 = 128)
    v   = vpsignb(B, a)         sign(a) * w: w where a > 0, -w where a < 0, 0 where a == 0
    p   = vpmaddubsw(u, v)      int16 per byte pair: u[2t] * v[2t] + u[2t+1] * v[2t+1]  (saturating)
    C  += vpmaddwd(p, 1)        int32 per lane: p[2l] + p[2l+1], the sum over the 4 k

Exactness (the result equals the int32 ``MatMulInteger`` of onnxruntime):

- ``u``: ``vpsignb(a, a)`` negates the negative bytes with 8-bit wrap, so
  ``-128`` stays ``0x80``, which ``vpmaddubsw`` reads as the unsigned 128:
  ``u = |a|`` exactly for every ``a`` in ``[-128, 127]``.
- ``v``: ``sign(a) * w`` is representable when ``-w`` is, i.e. for ``w`` in
  ``[-127, 127]``: the weights are symmetric (``quantizer/convert.py``
  clamps them to ``+-127``); a weight tensor holding ``-128`` is refused by
  the schedule (``gemm.weight_refusal``) and its kernel is left unscheduled.
- ``u * v = |a| * sign(a) * w = a * w``, with ``|a * w| <= 128 * 127 =
  16256``; a pair sums to at most ``32512 < 32767`` in magnitude, so the
  saturation of ``vpmaddubsw`` never engages and ``p`` is the exact pair sum.
- ``vpmaddwd(p, 1)`` adds two int16 into an int32 (``|.| <= 65024``): exact.
- ``C +=`` is int32 addition, wrapping, hence associative and commutative:
  the accumulator equals the sum of all products modulo ``2**32`` in any
  order, as onnxruntime's does; the exporter's accumulator bound keeps that
  sum inside int32, so neither wraps.

Why not the 16-bit path (sign-extend both operands, ``vpmaddwd``): it spends
the same two multiply-port instructions per 32 products (``vpmaddwd`` does
16 at a time) but doubles the packed weight bytes and the weight loads; the
8-bit path pays one ALU instruction (``vpsignb``) instead.
"""

from __future__ import annotations

from tvm.script import tirx as T

from intq.passes.compat import s_tir, tirx

DOT_8X4_I8I8I32_AVX2 = "dot_8x4_i8i8i32_avx2"
LANES, REDUCE = 8, 4  # output channels per intrinsic call (int32 lanes of a ymm), reduction indices per call


def _dot_8x4_desc(a_dtype: str) -> tirx.PrimFunc:
    """The computation both x86 intrinsics implement, with ``A`` of ``a_dtype`` (int8, or uint8 for VNNI)."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), a_dtype, offset_factor=1),
        B: T.Buffer((8, 4), "int8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            for j, k in T.grid(8, 4):
                with T.sblock("update"):
                    vj, vk = T.axis.remap("SR", [j, k])
                    C[vj] = C[vj] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vj, vk])

    return desc


dot_8x4_desc = _dot_8x4_desc("int8")


def _bcast4(a: tirx.Buffer) -> tirx.PrimExpr:
    """The 4 int8 at ``a[0:4]`` repeated in the 8 dword lanes of an int8x32 (``vpbroadcastd``)."""
    return tirx.reinterpret("int8x32", tirx.Broadcast(tirx.reinterpret("int32", a.vload([0], "int8x4")), 8))


def dot_8x4_impl(scope_a: str = "global", scope_b: str = "global", scope_c: str = "global") -> tirx.PrimFunc:
    """A fresh implementation PrimFunc whose buffers ``A``, ``B``, ``C`` live in the given scopes."""

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "int8", offset_factor=1, scope=scope_a),
        B: T.Buffer((8, 4), "int8", offset_factor=1, scope=scope_b),
        C: T.Buffer((8,), "int32", offset_factor=1, scope=scope_c),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            # One expression: a named vector temporary becomes a buffer in 0.27 (see gemm.py's docstring).
            C[T.ramp(0, 1, 8)] = C[T.ramp(0, 1, 8)] + T.call_llvm_pure_intrin(
                "int32x8",
                "llvm.x86.avx2.pmadd.wd",
                T.call_llvm_pure_intrin(
                    "int16x16",
                    "llvm.x86.avx2.pmadd.ub.sw",
                    T.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", _bcast4(A), _bcast4(A)),
                    T.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", B.vload([0, 0], "int8x32"), _bcast4(A)),
                ),
                T.broadcast(T.int16(1), 16),
            )

    return impl


s_tir.TensorIntrin.register(DOT_8X4_I8I8I32_AVX2, dot_8x4_desc, dot_8x4_impl(), override=True)


# --- AVX-512 VNNI: one instruction per 32 products, the activations offset to unsigned --------------------------

DOT_8X4_U8I8I32_VNNI = "dot_8x4_u8i8i32_vnni"
VNNI_OFFSET = 128  # added to every int8 activation to make it the unsigned operand of vpdpbusd


dot_8x4_vnni_desc = _dot_8x4_desc("uint8")


def vpdpbusd(acc: tirx.PrimExpr, word: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    """``vpdpbusd(acc, broadcast(word), b)`` on ``L`` int32 lanes (8: ymm, 16: zmm); ``word``: 4 unsigned bytes.

    The one place that spells the LLVM intrinsic (also ``x86_matmul_intrin``'s): the LLVM of TVM 0.27
    declares it on ``<4L x i8>`` operands (older LLVMs, and TVM's own ``tensor_intrin/x86.py``, pass
    ``<L x i32>``, which this LLVM rejects).
    """
    lanes = acc.ty.dtype.lanes
    bytes_ = tirx.reinterpret(f"int8x{4 * lanes}", tirx.Broadcast(word, lanes))
    return tirx.call_llvm_pure_intrin(f"int32x{lanes}", f"llvm.x86.avx512.vpdpbusd.{32 * lanes}", acc, bytes_, b)


def dot_8x4_vnni_impl(scope_a: str = "global", scope_b: str = "global", scope_c: str = "global") -> tirx.PrimFunc:
    """``C[j] += sum_k A[k] * B[j, k]`` with ``A`` uint8: one ``vpdpbusd`` on ymm registers (AVX-512 VNNI + VL).

    ``vpdpbusd(C, a, B)`` adds, in each int32 lane, the four products of the
    lane's unsigned bytes of ``a`` and signed bytes of ``B`` to ``C``.  Each
    product is at most ``255 * 128`` in magnitude and the four are summed in
    32 bits (no 16-bit intermediate, no saturation: ``vpdpbusds`` is the
    saturating form), so the lane gains the exact sum; the ``C +=`` wraps
    like any int32 addition.  Every int8 weight works, ``-128`` included.
    """

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1, scope=scope_a),
        B: T.Buffer((8, 4), "int8", offset_factor=1, scope=scope_b),
        C: T.Buffer((8,), "int32", offset_factor=1, scope=scope_c),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            C[T.ramp(0, 1, 8)] = vpdpbusd(
                C[T.ramp(0, 1, 8)], T.reinterpret("int32", A.vload([0], "uint8x4")), B.vload([0, 0], "int8x32")
            )

    return impl


s_tir.TensorIntrin.register(DOT_8X4_U8I8I32_VNNI, dot_8x4_vnni_desc, dot_8x4_vnni_impl(), override=True)
