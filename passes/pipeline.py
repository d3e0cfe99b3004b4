"""Target pipelines: integer-only ONNX -> Relax -> verified -> compiled.

    import_onnx             intq nodes -> one fused TIR kernel each (passes/ops)
    verify_integer_only     no float between quantizer and dequantizer (passes/verify.py)
    FuseRequantizeEpilogue  IntLinearAcc / IntMatMulAcc + its Requantize -> one kernel
    FuseResidualEpilogue    IntLinear16 + the IntAdd that is its only use -> one kernel
    schedule_module         hand schedules of the kernels for the target (passes/schedules); last, as
                            it repacks the linears' weights; TVM's pipeline lowers a schedule as it is
    tvm.compile             TVM's default Relax pipeline for the target (on CPU it fuses no kernels)

Targets are named (``x86``: the host CPU through LLVM, ``mcpu`` = the host's
CPU name) or given as a TVM target JSON dict, e.g. ``{"kind": "llvm",
"mcpu": "x86-64-v3"}``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import onnx

from intq.passes import compat
from intq.passes.fuse_requantize_epilogue import FuseRequantizeEpilogue
from intq.passes.fuse_residual_epilogue import FuseResidualEpilogue
from intq.passes.onnx_import import import_onnx
from intq.passes.schedules import schedule_module
from intq.passes.verify import verify_integer_only

TARGET_NAMES = ("x86",)


def resolve_target(target: str | Mapping | None) -> tuple[str, compat.tvm.target.Target]:
    """``(short name, Target)``: the name is used in file names (``model.<name>.so``)."""
    if target is None or target == "x86":
        return "x86", compat.host_target()
    if isinstance(target, Mapping):
        return str(target.get("kind", "custom")), compat.make_target(target)
    if isinstance(target, str) and target.strip().startswith("{"):
        spec = json.loads(target)
        return str(spec.get("kind", "custom")), compat.make_target(spec)
    raise ValueError(
        f"unknown target {target!r}: use one of {', '.join(TARGET_NAMES)} or a TVM target JSON dict such as "
        '\'{"kind": "llvm", "mcpu": "x86-64-v3"}\''
    )


@dataclasses.dataclass
class Compiled:
    name: str
    target: compat.tvm.target.Target
    executable: object
    input_names: list[str]

    @property
    def target_json(self) -> dict:
        return {k: (str(v) if not isinstance(v, (int, float, bool)) else v) for k, v in self.target.export().items()}


def compile_onnx(model: onnx.ModelProto, target: str | Mapping | None = None) -> Compiled:
    """Compile an integer-only intq ONNX model for ``target``."""
    name, tgt = resolve_target(target)
    mod = import_onnx(model)
    verify_integer_only(mod)
    mod = FuseResidualEpilogue()(FuseRequantizeEpilogue()(mod))
    mod = schedule_module(mod, tgt)
    executable = compat.build(mod, tgt)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    return Compiled(name, tgt, executable, inputs)
