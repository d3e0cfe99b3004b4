"""Reading an ``intq`` contraction kernel as a batched int8 GEMM (``GemmPlan``), for ``cuda_int8``.

A contraction kernel (``passes/ops/linear.py``, ``matmul.py``, ``conv.py``)
holds an ``acc`` block

    acc[s] = sum_r int32(A[f(s, r)]) * int32(B[g(s, r)])          (``read_contraction``)

optionally after a spatial block it reads (the convolution's ``pad``,
inlined into the load) and before one elementwise epilogue block ``out[s'] =
E(acc[s'], params)``.  A plan names the GEMM's dims and two int8 operands
of them::

    out[b, i, j] = E(sum_{k < K} lhs(b, i, k) * rhs(b, j, k), b, i, j)     i < M, j < N

by substituting the block iterators in the kernel's own load and epilogue
expressions, so the integer formula is the kernel's, untouched:

- ``matmul_plan`` (``IntMatMul``, ``IntMatMulAcc``): ``lhs = a[.., i, k]``,
  ``rhs = b[.., k, j]``, the batch dims as the kernel indexes them
  (broadcast included); same params, same output: a drop-in kernel.
- ``linear_plan`` (``IntLinear*``, ``IntLinear16+IntAdd``): ``x[.., k]``
  flattened to ``x2[m, k]`` (``m`` a fresh symbolic dim), ``rhs = w[j, k]``;
  an epilogue param read at the full output index (the residual) is read as
  ``[m, N]`` too; the call site reshapes.
- ``conv_plan`` (``IntConv2d_*``, one group): ``lhs = w[i, (c, ki, kj)]``,
  ``rhs = xpad[n, (c, ki, kj), (y, z)]`` with the flat ``k = (c ki kj)`` and
  ``j = (y z)`` split back by division (exact: ``k < K``, ``j < N``); the
  output is ``[B, O, OH * OW]`` and the call site reshapes.

How each operand is copied into shared memory (``Copy``): ``VECTOR`` when
every 4 consecutive ``k`` of a row are 4 consecutive, 4-byte aligned bytes
of the source (one 32-bit load; CUDA faults on a misaligned one, so this is
claimed only where the layout proves it); ``ALONG_K``: byte by byte, ``k``
innermost; ``ALONG_ROWS``: ``i`` (or ``j``) innermost, for a source whose
unit-stride axis is the row (``b[.., k, j]``), so that a warp reads
consecutive bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm_ffi

from intq.passes import compat
from intq.passes.compat import s_tir, te, tirx, tvm

VECTOR, ALONG_K, ALONG_ROWS = "vector", "along_k", "along_rows"


@dataclass(frozen=True)
class GemmPlan:
    """A contraction kernel as a batched GEMM (see the module docstring)."""

    inputs: tuple[te.Tensor, ...]  # the new kernel's input params, in call order
    batch: tuple  # extents of the batch dims
    m: object  # PrimExpr extents of the GEMM (any may be symbolic)
    n: object
    k: object
    lhs: Callable  # (b, i, k) -> int8, defined for i < M, k < K
    rhs: Callable  # (b, j, k) -> int8, defined for j < N, k < K
    epilogue: Callable  # (acc, b, i, j) -> the output value
    out_dtype: str
    lhs_copy: str  # VECTOR, ALONG_K or ALONG_ROWS
    rhs_copy: str


@dataclass(frozen=True)
class Contraction:
    """The ``acc`` block of a kernel and what surrounds it (``read_contraction``)."""

    spatial: tuple  # the acc block's spatial iterators
    reduce: tuple  # its reduction iterators
    extents: dict  # iterator -> extent
    a_load: tvm.ir.TensorLoad  # the first operand's load (int8)
    b_load: tvm.ir.TensorLoad
    acc: tvm.ir.Var  # the accumulator buffer
    epilogue: s_tir.SBlock | None  # None: acc is the output
    producers: dict  # buffer var -> (iterators, value) of a spatial block before acc (the pad)


def i64(value: int) -> tirx.IntImm:
    return tirx.IntImm("int64", value)


def blocks(func: tirx.PrimFunc) -> list[s_tir.SBlock]:
    found: list[s_tir.SBlock] = []
    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, found.append), order="pre")
    return [b for b in found if b.name_hint != "root"]


def loads(expr) -> list[tvm.ir.TensorLoad]:
    found: list[tvm.ir.TensorLoad] = []
    tvm_ffi.structural_walk(expr, (tvm.ir.TensorLoad, found.append))
    return found


def uses(expr, variables) -> bool:
    """Whether ``expr`` mentions any of the scalar vars ``variables``."""
    found: list[tvm.ir.Var] = []
    tvm_ffi.structural_walk(expr, (tvm.ir.Var, found.append))
    return any(v.same_as(u) for v in found for u in variables)


def substitute(expr, var_map: dict, buffers: dict, acc: tuple | None = None):
    """``expr`` with vars replaced (``var_map``), loads of a buffer in ``buffers`` read from its te tensor (or
    any object indexed like one), and loads of the buffer ``acc[0]`` replaced by the expression ``acc[1]``."""

    def var(node):
        return var_map.get(node, node)

    def load(node):
        if acc is not None and node.source.same_as(acc[0]):
            return acc[1]
        tensor = buffers.get(node.source)
        return tensor[tuple(node.indices)] if tensor is not None else node

    return tvm_ffi.structural_map(expr, [(tvm.ir.Var, var), (tvm.ir.TensorLoad, load)])


def _same(indices, variables) -> bool:
    return len(indices) == len(variables) and all(i.same_as(v) for i, v in zip(indices, variables, strict=True))


def _int8_operand(expr) -> tvm.ir.TensorLoad | None:
    if not (isinstance(expr, tirx.Cast) and str(expr.ty.dtype) == "int32"):
        return None
    load = expr.value
    return load if isinstance(load, tvm.ir.TensorLoad) and str(load.source.ty.dtype) == "int8" else None


def read_contraction(func: tirx.PrimFunc) -> Contraction | str:
    """``func`` as a ``Contraction``, or the reason it is not one."""
    found = blocks(func)
    names = [b.name_hint for b in found]
    if "acc" not in names:
        return f"no 'acc' block (blocks {names})"
    at = names.index("acc")
    block, before, after = found[at], found[:at], found[at + 1 :]
    store = block.body
    if len(after) > 1 or not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tirx.Add):
        return f"not acc[...] += product, then at most one epilogue (blocks {names})"
    product = store.value.b
    a_load = _int8_operand(product.a) if isinstance(product, tirx.Mul) else None
    b_load = _int8_operand(product.b) if isinstance(product, tirx.Mul) else None
    if a_load is None or b_load is None:
        return "the 'acc' block does not add the product of two int8 loads widened to int32"
    spatial = tuple(iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar)
    reduce = tuple(iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce)
    if len(spatial) + len(reduce) != len(block.iter_vars) or not reduce or not _same(store.indices, spatial):
        return "the 'acc' block is not a reduction stored at acc[its spatial iterators]"
    producers = {}
    for pre in before:
        body = pre.body
        if not isinstance(body, tirx.BufferStore) or any(iv.iter_type != tirx.IterVar.DataPar for iv in pre.iter_vars):
            return f"block {pre.name_hint!r} before 'acc' is not an elementwise store"
        producers[body.buffer] = (tuple(iv.var for iv in pre.iter_vars), body.value)
    epilogue = after[0] if after else None
    if epilogue is None:
        if not store.buffer.same_as(func.params[-1]):
            return "the accumulator is neither the output nor followed by an epilogue"
    else:
        body, iters = epilogue.body, [iv.var for iv in epilogue.iter_vars]
        if not isinstance(body, tirx.BufferStore) or not body.buffer.same_as(func.params[-1]):
            return "the block after 'acc' is not one store into the output"
        if not _same(body.indices, iters) or any(
            ld.source.same_as(store.buffer) and not _same(ld.indices, iters) for ld in loads(body.value)
        ):
            return "the epilogue is not elementwise over acc"
    extents = {iv.var: iv.dom.extent for iv in block.iter_vars}
    return Contraction(spatial, reduce, extents, a_load, b_load, store.buffer, epilogue, producers)


def inline_producers(expr, producers: dict):
    """``expr`` with each load of a producer's buffer replaced by the producer's value at that index."""

    def load(node):
        if node.source not in producers:
            return node
        iters, value = producers[node.source]
        return substitute(value, dict(zip(iters, node.indices, strict=True)), {})

    return tvm_ffi.structural_map(expr, (tvm.ir.TensorLoad, load))


def placeholders(func: tirx.PrimFunc, shapes: dict | None = None) -> dict:
    """A te placeholder per input buffer param of ``func`` (all but the output), some with new shapes."""
    shapes = shapes or {}
    return {p: te.placeholder(shapes.get(p, tuple(p.ty.shape)), str(p.ty.dtype), p.name) for p in func.params[:-1]}


def epilogue_fn(c: Contraction, var_map: Callable, buffers: dict, redirect: Callable | None = None) -> Callable:
    """``E(acc, b, i, j)``: the kernel's epilogue, its iterators given by ``var_map(b, i, j)``; ``redirect``
    may first rewrite some loads (in terms of ``b, i, j``)."""
    if c.epilogue is None:
        return lambda acc, b, i, j: acc
    iters = tuple(iv.var for iv in c.epilogue.iter_vars)
    value = c.epilogue.body.value

    def epilogue(acc, b, i, j):
        expr = redirect(value, b, i, j) if redirect is not None else value
        return substitute(expr, dict(zip(iters, var_map(b, i, j), strict=True)), buffers, (c.acc, acc))

    return epilogue


def _k_innermost(load: tvm.ir.TensorLoad, k: tvm.ir.Var) -> bool:
    return load.indices[-1].same_as(k)


# --- the plans -----------------------------------------------------------------------------------------


def matmul_plan(func: tirx.PrimFunc) -> GemmPlan | str:
    """``IntMatMul`` / ``IntMatMulAcc`` as a drop-in GEMM over the same params, or the reason it is not one."""
    c = read_contraction(func)
    if isinstance(c, str):
        return c
    if c.producers or len(c.reduce) != 1 or len(c.spatial) < 2:
        return "not a batched matmul (one reduction, at least two spatial dims, nothing before acc)"
    *batch, vi, vj = c.spatial
    (vk,) = c.reduce
    if uses(c.a_load, [vj]) or uses(c.b_load, [vi]):
        return "the operands are not a[.., i, k] and b[.., k, j]"
    tensors = placeholders(func)

    def operand(load, row):
        return lambda b, r, k: substitute(load, {**dict(zip(batch, b, strict=True)), row: r, vk: k}, tensors)

    return GemmPlan(
        tuple(tensors.values()),
        tuple(c.extents[v] for v in batch),
        c.extents[vi],
        c.extents[vj],
        c.extents[vk],
        operand(c.a_load, vi),
        operand(c.b_load, vj),
        epilogue_fn(c, lambda b, i, j: (*b, i, j), tensors),
        str(func.params[-1].ty.dtype),
        VECTOR if _k_innermost(c.a_load, vk) else ALONG_ROWS,
        VECTOR if _k_innermost(c.b_load, vk) else ALONG_ROWS,
    )


class _Rows:
    """A flattened ``[m, N]`` tensor that stands for a ``[..., N]`` one read at the output index."""

    def __init__(self, tensor: te.Tensor, i, j):
        self.tensor, self.i, self.j = tensor, i, j

    def __getitem__(self, _index):
        return self.tensor[self.i, self.j]


def linear_plan(func: tirx.PrimFunc) -> tuple[GemmPlan, frozenset[str]] | str:
    """A linear flattened to ``[M, K] x [N, K]^T`` and the names of the params the call site flattens too
    (read at the full output index: a residual), or the reason it is not one."""
    c = read_contraction(func)
    if isinstance(c, str):
        return c
    x, w = func.params[0], func.params[1]
    *lead, vn = c.spatial
    if c.producers or len(c.reduce) != 1 or not (c.a_load.source.same_as(x) and c.b_load.source.same_as(w)):
        return "not a linear (one reduction of x, the first param, times w, the second)"
    (vk,) = c.reduce
    if not (_same(c.a_load.indices, (*lead, vk)) and _same(c.b_load.indices, (vn, vk))):
        return "the 'acc' block does not read x[..., k] and w[n, k]"
    rows = set()
    if c.epilogue is not None:
        iters = [iv.var for iv in c.epilogue.iter_vars]
        for load in loads(c.epilogue.body.value):
            if load.source.same_as(c.acc):
                continue
            if not any(load.source.same_as(p) for p in func.params[2:-1]):
                return f"the epilogue reads {load.source.name}, which is neither acc nor a param"
            if lead and _same(load.indices, iters):
                rows.add(load.source)
            elif any(uses(index, iters[:-1]) for index in load.indices):
                return f"the epilogue reads {load.source.name} at an index that mixes the flattened dims"
    m = tirx.Var("m", "int64")
    k, n = c.extents[vk], c.extents[vn]
    tensors = placeholders(func, {x: (m, k), **{p: (m, n) for p in rows}})

    def redirect(value, b, i, j):
        return substitute(value, {}, {p: _Rows(tensors[p], i, j) for p in rows})

    # the flattened iterators appear only in the row loads redirected above
    plan = GemmPlan(
        tuple(tensors.values()),
        (),
        m,
        n,
        k,
        lambda b, i, kk: tensors[x][i, kk],
        lambda b, j, kk: tensors[w][j, kk],
        epilogue_fn(c, lambda b, i, j: (*[i64(0)] * len(lead), j), tensors, redirect),
        str(func.params[-1].ty.dtype),
        VECTOR,
        VECTOR,
    )
    return plan, frozenset(p.name for p in rows)


def flat_reduction(c: Contraction, k) -> dict | str:
    """The reduction iterators as functions of one flat ``k``, row-major over their extents (``k < K``)."""
    extents = [c.extents[r] for r in c.reduce]
    if len(extents) == 1:
        return {c.reduce[0]: k}
    if not all(isinstance(e, tirx.IntImm) for e in extents):
        return "a reduction over several dims, one of them symbolic"
    out, stride = {}, 1
    for r, e in reversed(list(zip(c.reduce, extents, strict=True))[1:]):
        out[r] = tirx.floormod(tirx.floordiv(k, i64(stride)), e) if stride > 1 else tirx.floormod(k, e)
        stride *= int(e)
    out[c.reduce[0]] = tirx.floordiv(k, i64(stride))
    return out


def _aligned_runs(act, c: Contraction, x: tvm.ir.Var) -> bool:
    """Whether 4 consecutive flat ``k`` (from a multiple of 4) read 4 consecutive, 4-byte aligned bytes of ``x``:
    no pad; the last reduction iterator steps the last index by 1 over a multiple of 4; every other iterator
    and the constant move it by multiples of 4; the rows of ``x`` hold a multiple of 4 bytes."""
    last_dim, last_r = x.ty.shape[-1], c.reduce[-1]
    if c.producers or not isinstance(last_dim, tirx.IntImm) or int(last_dim) % 4:
        return False
    if not isinstance(c.extents[last_r], tirx.IntImm) or int(c.extents[last_r]) % 4:
        return False
    index = act.indices[-1]
    analyzer = compat.Analyzer()
    variables = (*c.spatial, *c.reduce)
    zero = {v: i64(0) for v in variables}
    base = analyzer.simplify(substitute(index, zero, {}))
    for v in variables:
        step = analyzer.simplify(substitute(index, {**zero, v: i64(1)}, {}) - base)
        if not isinstance(step, tirx.IntImm) or (v.same_as(last_r) and int(step) != 1):
            return False
        if not v.same_as(last_r) and int(step) % 4:
            return False
    return isinstance(base, tirx.IntImm) and int(base) % 4 == 0


def conv_plan(func: tirx.PrimFunc) -> GemmPlan | str:
    """A one-group ``IntConv2d`` as ``[O, K] x [OH OW, K]^T`` per image (``[B, O, OH * OW]`` out), or the reason
    it is not one."""
    c = read_contraction(func)
    if isinstance(c, str):
        return c
    x, w = func.params[0], func.params[1]
    if len(c.spatial) != 4 or not c.b_load.source.same_as(w):
        return "not an NCHW convolution reading the weight (second param) as its second operand"
    vn, vo, vy, vz = c.spatial
    analyzer = compat.Analyzer()
    analyzer.bind(vo, tvm.ir.Range(i64(0), c.extents[vo]))
    act = analyzer.simplify(inline_producers(c.a_load, c.producers))
    if uses(act, [vo]):
        return "a grouped convolution (the input channel depends on the output channel)"
    if uses(c.b_load, [vn, vy, vz]):
        return "the weight load depends on the image or the pixel"
    kvar = tirx.Var("k", "int64")
    flat = flat_reduction(c, kvar)
    if isinstance(flat, str):
        return flat
    k = i64(1)
    for r in c.reduce:
        k = k * c.extents[r]
    ow = c.extents[vz]
    tensors = placeholders(func)

    def at(kk):
        return {r: substitute(e, {kvar: kk}, {}) for r, e in flat.items()}

    def lhs(b, i, kk):
        return substitute(c.b_load, {vo: i, **at(kk)}, tensors)

    def rhs(b, j, kk):
        return substitute(act, {vn: b[0], vy: tirx.floordiv(j, ow), vz: tirx.floormod(j, ow), **at(kk)}, tensors)

    return GemmPlan(
        tuple(tensors.values()),
        (c.extents[vn],),
        c.extents[vo],
        compat.Analyzer().simplify(c.extents[vy] * ow),
        compat.Analyzer().simplify(k),
        lhs,
        rhs,
        epilogue_fn(c, lambda b, i, j: (b[0], i, tirx.floordiv(j, ow), tirx.floormod(j, ow)), tensors),
        str(func.params[-1].ty.dtype),
        VECTOR,  # w[o, c, ki, kj] at the flat k = (c, ki, kj) is w's own layout
        VECTOR if isinstance(act, tvm.ir.TensorLoad) and _aligned_runs(act, c, x) else ALONG_K,
    )
