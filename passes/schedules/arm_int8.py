"""The aarch64 int8 dot-product intrinsic of the GEMM schedule: 4 output channels x 4 reductions, ``sdot``.

    C[j] += sum_{k<4} int32(A[k]) * int32(B[j, k])        for j < 4

``A``: int8 ``[4]``, four consecutive activations of one row; ``B``: int8
``[4, 4]``, the weights of 4 output channels at the same 4 reduction
indices, contiguous (16 bytes, one NEON ``q`` register); ``C``: int32
``[4]``, the 4 accumulators (one ``q`` register).  This is the computation
of TVM's own ``dot_4x4_i8i8s32_sdot`` (``tvm/s_tir/tensor_intrin/arm_cpu.py``,
same buffer shapes and layout); it is declared here once more, as
``SDOT_4X4_I8I8I32``, because its implementation binds the broadcast
activations to a named vector temporary, which 0.27 turns into a buffer
(see ``gemm.py``), and because the GEMM schedule substitutes a fresh
implementation with its own buffer scopes through ``compat.tensorize``
(``Schedule.tensorize`` crashes in this TVM build).

Implementation, one instruction (plus the loads; needs ``+dotprod``)::

    a  = dup(A as one int32)           the 4 bytes in each of the 4 int32 lanes
    C  = sdot(C, a, B)                 C[j] += sum_k a[4 j + k] * B[4 j + k]

In the 4 x 4 tile of the GEMM (``gemm.AARCH64_SDOT``) LLVM emits, per 4
reduction steps, four ``ld1r {vA.4s}`` (the broadcast loads), the four
weight blocks' loads and 16 ``sdot vC.4s, vA.16b, vB.16b`` into 16
accumulators that stay in registers (read off ``inspect_source("asm")``).

Exactness: ``sdot`` multiplies signed bytes into 16-bit products, sums four
of them (``|.| <= 4 * 128 * 128 = 65536``) and adds the sum to the 32-bit
lane with wrap-around; no step saturates, and every int8 value, ``-128``
included, is taken as it is.  So ``C`` is the exact int32 sum of
``int32(a) * int32(w)`` modulo ``2**32``, in any order, as onnxruntime's
``MatMulInteger`` computes it; the exporter's accumulator bound keeps that
sum inside int32.  Unlike the AVX2 path (``x86_int8``), no weight is
refused.
"""

from __future__ import annotations

from tvm.script import tirx as T

from intq.passes.compat import s_tir, tirx

SDOT_4X4_I8I8I32 = "intq_dot_4x4_i8i8i32_sdot"
LANES, REDUCE = 4, 4  # output channels per intrinsic call (int32 lanes of a q register), reduction indices per call
REGISTERS = 32  # NEON v0..v31


@T.prim_func(s_tir=True)
def sdot_4x4_desc(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        for j, k in T.grid(4, 4):
            with T.sblock("update"):
                vj, vk = T.axis.remap("SR", [j, k])
                C[vj] = C[vj] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vj, vk])


def _bcast4(a: tirx.Buffer) -> tirx.PrimExpr:
    """The 4 int8 at ``a[0:4]`` repeated in the 4 int32 lanes of an int8x16 (``dup``)."""
    return tirx.reinterpret("int8x16", tirx.Broadcast(tirx.reinterpret("int32", a.vload([0], "int8x4")), 4))


def sdot_4x4_impl(scope_a: str = "global", scope_b: str = "global", scope_c: str = "global") -> tirx.PrimFunc:
    """A fresh implementation PrimFunc whose buffers ``A``, ``B``, ``C`` live in the given scopes."""

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "int8", offset_factor=1, scope=scope_a),
        B: T.Buffer((4, 4), "int8", offset_factor=1, scope=scope_b),
        C: T.Buffer((4,), "int32", offset_factor=1, scope=scope_c),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            C[T.ramp(0, 1, 4)] = T.call_llvm_pure_intrin(
                "int32x4",
                "llvm.aarch64.neon.sdot.v4i32.v16i8",
                C[T.ramp(0, 1, 4)],
                _bcast4(A),
                B.vload([0, 0], "int8x16"),
            )

    return impl


s_tir.TensorIntrin.register(SDOT_4X4_I8I8I32, sdot_4x4_desc, sdot_4x4_impl(), override=True)
