"""Standard ONNX ops whose TVM frontend lowering trusts the data, lowered safely.

TVM 0.27's ONNX frontend lowers two standard ops in a way that reads out of
bounds on inputs that onnxruntime refuses or clamps:

- ``Gather`` becomes ``take(..., mode="fast")``, which reads ``table[i]``
  for any ``i``: a token id >= the vocabulary reads past the embedding
  table (garbage, or SIGSEGV).  ``CheckedGather`` keeps the frontend's
  lowering where the indices are known when converting (constants, shape
  values: checked here, at compile time) and otherwise emits
  ``take_kernel``: ``out[o, j, k] = data[o, clamp(norm(idx[j]), 0, n-1), k]``
  on the data viewed as ``[outer, n, inner]`` (``n`` the gathered axis) and
  the indices flattened, ``norm(i) = i + n if i < 0 else i`` (ONNX counts a
  negative index from the end).  The clamp keeps every read in bounds on
  every target; on a CPU the kernel first asserts that every index lies in
  ``[-n, n - 1]`` (``passes/runtime_checks.py``), so an out-of-range id
  raises ``ValueError`` as onnxruntime raises, instead of being clamped.
- ``Slice`` with a symbolic bound (``position_ids[:, 0:seq]``) becomes
  ``strided_slice(..., assume_inbound=True)``: its output is declared
  ``seq`` long even when ``seq`` exceeds the sliced axis, and reading it
  runs past the end.  ``CheckedSlice`` emits the same slice with
  ``assume_inbound=False``, whose length is ONNX's clamped one
  (``min(seq, 64)``); a kernel that then meets mismatched shapes refuses
  them at run time (``IntAdd``'s broadcast check).

Both are installed over the frontend's own converters for the duration of an
import (``onnx_import.import_onnx``, ``compat.extended_convert_map``).
"""

from __future__ import annotations

from intq.passes.compat import _onnx_frontend as frontend
from intq.passes.compat import relax, te, tensor_type, tirx, tvm
from intq.passes.ops.base import OP_ATTR
from intq.passes.runtime_checks import CHECKS_ATTR, index_check

TAKE_OP = "Take"  # the intq.op tag of take_kernel (a GPU schedules it with its generic fallback)


def _prod(dims) -> tirx.PrimExpr:
    total = tirx.const(1, "int64")
    for d in dims:
        total = total * d
    return total


def take_te(data: te.Tensor, indices: te.Tensor) -> te.Tensor:
    """``out[o, j, k] = data[o, clamp(norm(indices[j]), 0, n - 1), k]`` for ``data`` ``[outer, n, inner]``."""
    outer, n, inner = data.shape
    (m,) = indices.shape

    def body(o, j, k):
        i = indices[j].astype("int64")
        i = tirx.if_then_else(i < 0, i + n, i)
        return data[o, te.max(te.min(i, n - 1), tirx.const(0, "int64")), k]

    return te.compute((outer, m, inner), body, name="take")


def _node_name(attr: dict) -> str:
    return attr.get("tvm_custom", {}).get("name") or "Gather"


class CheckedGather(frontend.Gather):
    """ONNX ``Gather`` without out-of-bounds reads (see the module docstring)."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, indices = inputs[0], inputs[1]
        node = _node_name(attr)
        if isinstance(data, relax.ShapeExpr) or isinstance(indices, relax.ShapeExpr):
            return super()._impl_v13(bb, inputs, attr, params)
        data_ty = tensor_type(data)
        axis = int(attr.get("axis", 0))
        axis = axis + data_ty.ndim if axis < 0 else axis
        extent = data_ty.shape.values[axis] if isinstance(data_ty.shape, relax.ShapeExpr) else None
        if isinstance(indices, tvm.ir.GenericConst):
            values = indices.value.numpy()
            if (
                isinstance(extent, tirx.IntImm)
                and values.size
                and (values.min() < -int(extent) or values.max() >= int(extent))
            ):
                bad = values[(values < -int(extent)) | (values >= int(extent))].ravel()[0]
                raise ValueError(
                    f"Gather {node!r}: its constant index {int(bad)} is outside [{-int(extent)}, {int(extent) - 1}] "
                    f"(axis {axis} has {int(extent)} entries): the ONNX model is invalid; re-export it"
                )
            return super()._impl_v13(bb, inputs, attr, params)
        if extent is None or not isinstance(tensor_type(indices).shape, relax.ShapeExpr):
            return super()._impl_v13(bb, inputs, attr, params)  # unknown rank: nothing to build a kernel of
        dims = list(data_ty.shape.values)
        index_dims = list(tensor_type(indices).shape.values)
        flat = bb.normalize(relax.op.reshape(data, [_prod(dims[:axis]), extent, _prod(dims[axis + 1 :])]))
        flat_indices = bb.normalize(relax.op.reshape(indices, [_prod(index_dims)]))
        rows = f"{int(extent)} entries" if isinstance(extent, tirx.IntImm) else "its entries"
        lo_hi = f"[{-int(extent)}, {int(extent) - 1}]" if isinstance(extent, tirx.IntImm) else "[-n, n - 1]"
        message = (
            f"Gather {node!r}: an index is outside {lo_hi} (axis {axis} of its data has {rows}); "
            "onnxruntime refuses it too: check the ids fed to the model (e.g. token ids < the vocabulary size)"
        )
        taken = bb.call_te(
            take_te,
            flat,
            flat_indices,
            primfunc_name_hint="intq_take",
            primfunc_attrs={OP_ATTR: TAKE_OP, CHECKS_ATTR: [index_check(1, 0, 1, message)]},
        )
        return relax.op.reshape(taken, dims[:axis] + index_dims + dims[axis + 1 :])


class CheckedSlice(frontend.Slice):
    """ONNX ``Slice`` whose symbolic bounds are clamped as ONNX says (see the module docstring)."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        out = super()._impl_v13(bb, inputs, attr, params)
        call = out
        if isinstance(out, relax.Var):
            call = bb.lookup_binding(out) if hasattr(bb, "lookup_binding") else None
        if (
            isinstance(call, relax.Call)
            and call.op.same_as(tvm.ir.Op.get("relax.strided_slice"))
            and bool(call.attrs.assume_inbound)
        ):
            x, axes, begin, end, strides = call.args
            return relax.op.strided_slice(
                x, list(axes.fields), list(begin.fields), list(end.fields), list(strides.fields), assume_inbound=False
            )
        return out


OVERRIDES = {"Gather": CheckedGather, "Slice": CheckedSlice}

__all__ = ["OVERRIDES", "TAKE_OP", "CheckedGather", "CheckedSlice", "take_te"]
