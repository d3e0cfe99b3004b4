"""Integer-only verifier on the Relax module (after ``import_onnx``).

Contract: in ``main``, the integer region is every binding reachable from an
integer-typed parameter or from the output of ``R.quantize`` (the input
quantizer), stopping at ``R.dequantize`` (the output dequantizer).  Inside
it, every value must have an integer or boolean dtype, and every PrimFunc
called by ``call_tir`` must compute in integers only.  A violation names the
Relax op (or the PrimFunc) and the value.

Checking a PrimFunc: the 0.27 wheel exposes no TIR expression visitor to
Python, so the check reads the PrimFunc's TVMScript and looks for any float
dtype (``float16/32/64``, ``bfloat16``) in buffer declarations, casts and
constants; every TIR type is printed by name there, so nothing escapes it.
"""

from __future__ import annotations

import re

from intq.passes.compat import relax, tvm

_FLOAT_RE = re.compile(r"\b(b?float(16|32|64)|float8\w*)\b")
_INT_DTYPES = ("int", "uint", "bool")


class RelaxIntegerOnlyError(ValueError):
    """A float value or float kernel sits between input quantizer and output dequantizer."""


def _dtype(var) -> str | None:
    ty = getattr(var, "ty", None) or getattr(var, "struct_info", None)
    return getattr(ty, "dtype", None)


def _vars_in(expr) -> list:
    out = []
    if isinstance(expr, relax.Var):
        out.append(expr)
    elif isinstance(expr, relax.Tuple):
        for f in expr.fields:
            out.extend(_vars_in(f))
    elif isinstance(expr, relax.Call):
        for a in expr.args:
            out.extend(_vars_in(a))
    elif isinstance(expr, relax.TupleGetItem):
        out.extend(_vars_in(expr.tuple_value))
    return out


def _op_name(call) -> str:
    op = call.op
    if isinstance(op, tvm.ir.Op):
        if op.name == "relax.call_tir":
            return f"call_tir {call.args[0].name_hint}"
        return op.name
    return str(op)


def float_ops_in_integer_region(mod: tvm.IRModule, func: str = "main") -> list[tuple[str, str]]:
    """``(op, value)`` for every float value or float kernel inside the integer region of ``func``."""
    fn = mod[func]
    tainted = {p for p in fn.params if str(_dtype(p) or "").startswith(_INT_DTYPES)}
    violations: list[tuple[str, str]] = []
    checked_kernels: dict[str, bool] = {}
    for block in fn.body.blocks:
        for binding in block.bindings:
            value, var = binding.value, binding.var
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                if value.op.name == "relax.dequantize":
                    continue
                if value.op.name == "relax.quantize":
                    tainted.add(var)
                    continue
            if not any(v in tainted for v in _vars_in(value)):
                continue
            tainted.add(var)
            name = _op_name(value) if isinstance(value, relax.Call) else type(value).__name__
            dtype = str(_dtype(var) or "")
            if dtype and not dtype.startswith(_INT_DTYPES):
                violations.append((name, f"{var.name}: {dtype}"))
            if isinstance(value, relax.Call) and name.startswith("call_tir "):
                kernel = value.args[0].name_hint
                if kernel not in checked_kernels:
                    checked_kernels[kernel] = bool(_FLOAT_RE.search(mod[kernel].script()))
                if checked_kernels[kernel]:
                    violations.append((name, f"{var.name}: the kernel computes in floating point"))
    return violations


def verify_integer_only(mod: tvm.IRModule, func: str = "main") -> None:
    bad = float_ops_in_integer_region(mod, func)
    if bad:
        lines = "\n".join(f"  - {op} -> {value}" for op, value in bad)
        raise RelaxIntegerOnlyError(
            f"The Relax module is not integer-only: {len(bad)} op(s) between the input quantizer and the output "
            f"dequantizer compute in floating point:\n{lines}"
        )
