"""Target pipelines: integer-only ONNX -> Relax -> verified -> compiled.

    import_onnx             intq nodes -> one fused TIR kernel each (passes/ops)
    verify_integer_only     no float between quantizer and dequantizer (passes/verify.py)
    FuseRequantizeEpilogue  IntLinearAcc / IntMatMulAcc + its Requantize -> one kernel
    FuseResidualEpilogue    IntLinear16 + the IntAdd that is its only use -> one kernel
    schedule_module         hand schedules of the kernels for the target (passes/schedules); it
                            repacks the linears' weights; TVM's pipeline lowers a schedule as it is
    InsertRuntimeChecks     the asserts each kernel states it needs at run time (ids inside the table,
                            broadcastable symbolic dims; passes/runtime_checks.py), before its body
    tvm.compile             TVM's default Relax pipeline for the target (on CPU it fuses no kernels)

Targets are named or given as a TVM target JSON dict (``passes/targets.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import onnx

from intq.passes import compat
from intq.passes.fuse_requantize_epilogue import FuseRequantizeEpilogue
from intq.passes.fuse_residual_epilogue import FuseResidualEpilogue
from intq.passes.onnx_import import import_onnx
from intq.passes.runtime_checks import InsertRuntimeChecks
from intq.passes.schedules import schedule_module
from intq.passes.targets import TargetSpec, resolve_target
from intq.passes.verify import verify_integer_only


@dataclasses.dataclass
class Compiled:
    spec: TargetSpec
    executable: object
    input_names: list[str]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def target(self) -> compat.tvm.target.Target:
        return self.spec.target

    def export(self, path: str) -> None:
        """Write the compiled library to ``path`` (cross-compiled where the target needs it)."""
        self.spec.export(self.executable, path)

    @property
    def target_json(self) -> dict:
        return {k: (str(v) if not isinstance(v, (int, float, bool)) else v) for k, v in self.target.export().items()}


def compile_onnx(model: onnx.ModelProto, target: str | Mapping | None = None) -> Compiled:
    """Compile an integer-only intq ONNX model for ``target``."""
    spec = resolve_target(target)
    tgt = spec.target
    mod = import_onnx(model)
    verify_integer_only(mod)
    mod = FuseResidualEpilogue()(FuseRequantizeEpilogue()(mod))
    mod = InsertRuntimeChecks(tgt)(schedule_module(mod, tgt))
    executable = compat.build(mod, tgt)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    return Compiled(spec, executable, inputs)
