"""Schedule of the ``UnpackInt4`` kernel (``passes/ops/unpack_int4.py``) for a CPU (LLVM): one byte, two nibbles.

The kernel's one block ``unpack`` computes, over the flat output ``[n]``,

    y[i] = sext4((p[i // 2] >> 4 * (i % 2)) & 15)

``schedule_unpack_int4`` splits ``i = 2 * k + j`` (``j`` in ``{0, 1}``,
unrolled), so that one iteration of ``k`` reads byte ``p[k]`` once and
writes its low nibble to ``y[2k]`` and its high one to ``y[2k + 1]``, each
with a constant shift (``p[(2k + j) // 2]`` is ``p[k]`` and
``(2k + j) % 2`` is ``j`` for the simplifier: the kernel writes ``//`` and
``%``, which it reasons about, where ``>> 1`` and ``& 1`` stay as written).
The integer operations are the kernel's own, so the result is the same bit
for bit.  The loop over ``k`` is left to LLVM's loop vectorizer, which
turns it into whole-register byte loads, the nibble arithmetic on vectors,
and interleaved stores (AVX2: ``vpunpck[lh]bw``; AVX-512 VBMI: ``vpermt2b``;
aarch64: ``st2``).  TVM's own
``vectorize`` cannot express this: a vector over ``k`` stores with stride 2,
which TVM's LLVM codegen scalarizes, and a vector over ``i`` reads
``p[i // 2]`` as a gather.

The ``m = n // 2`` whole bytes: the largest multiple of ``CHUNK_BYTES`` of
them run as a ``parallel`` loop of tasks of ``CHUNK_BYTES`` when that makes
at least two tasks; the bytes after the last task, and the pad byte of an
odd ``n`` (only its low nibble is an element), are partitioned off into
serial loops, so that no loop the vectorizer sees carries a predicate.

Measured on a 2-core AMD EPYC (znver4), the kernel compiled alone and
called in a loop (medians; "cold": 48 different weights in turn, so the
packed bytes come from L3 or memory, as in a model run):

=================  =======  ===================  ===================
weight             threads  unscheduled          scheduled (warm / cold)
=================  =======  ===================  ===================
384x1536 (590 K)   1        311 us               11 / 47 us
384x1536           2        281 us               14 / 37 us
192x768 (147 K)    1        78 us                3.0 / 3.6 us
=================  =======  ===================  ===================

The unscheduled loop runs at 0.5 ns an element whatever the cache.  Tasks:
4 KiB ones were slower than serial with two threads on the warm weights
(a 2-10 us kernel against the pool's launch), 64 KiB ones cost nothing at
one thread and help a cold weight at two.  Whole models, 1 thread, the
4-bit model before / after / the 8-bit model: DeiT-tiny batch 1 16.7 /
14.1 / 14.0 ms, MiniLM-L6 sequence 128 16.3 / 12.5 / 12.4 ms.
"""

from __future__ import annotations

from intq.passes.compat import s_tir, tirx

#: Packed bytes per parallel task (the elements are twice as many).
CHUNK_BYTES = 64 * 1024


def schedule_unpack_int4(sch: s_tir.Schedule) -> None:
    """Per byte, both nibbles at once; whole-byte loop in parallel tasks, left to LLVM to vectorize."""
    block = sch.get_sblock("unpack")
    (loop,) = sch.get_loops(block)
    extent = sch.get(loop).extent
    if not isinstance(extent, tirx.IntImm):
        return  # a weight's shape is static (the converter checks it); nothing to plan for a symbolic one
    n = int(extent)
    m = n // 2  # whole bytes; an odd n has one more byte, whose high nibble is padding
    whole = m // CHUNK_BYTES * CHUNK_BYTES if m >= 2 * CHUNK_BYTES else m
    bytes_loop, _ = sch.split(loop, [None, 2])
    bounds = sorted({whole, m, (n + 1) // 2} - {0})
    sizes = [hi - lo for lo, hi in zip([0, *bounds], bounds, strict=False)]
    parts = sch.loop_partition(bytes_loop, sizes[:-1]) if len(sizes) > 1 else [bytes_loop]
    for index, part in enumerate(parts):
        (part_block,) = sch.get_child_blocks(part) if len(parts) > 1 else (block,)
        k, j = sch.get_loops(part_block)[-2:]
        if index == 0 and whole >= 2 * CHUNK_BYTES:
            task, _ = sch.split(k, [None, CHUNK_BYTES])
            sch.parallel(task)
        sch.unroll(j)
