"""The Relax integer-only verifier: passes on imported intq models, names planted float ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import intq
from intq.models.vit import VisionTransformer, ViTConfig
from intq.passes.onnx_import import import_onnx
from intq.passes.verify import RelaxIntegerOnlyError, float_ops_in_integer_region, verify_integer_only


@I.ir_module
class PlantedAstype:
    @R.function
    def main(x: R.Tensor(("n", 4), "float32")) -> R.Tensor(("n", 4), "float32"):
        with R.dataflow():
            q = R.quantize(x, R.const(0.1, "float32"), R.const(0, "int8"), out_dtype="int8", axis=1)
            f = R.astype(q, "float32")
            h = R.multiply(f, R.const(2.0, "float32"))
            back = R.astype(h, "int8")
            y = R.dequantize(back, R.const(0.1, "float32"), R.const(0, "int8"), out_dtype="float32", axis=1)
            R.output(y)
        return y


@I.ir_module
class PlantedKernel:
    @T.prim_func(private=True, s_tir=True)
    def sneaky(a: T.handle, b: T.handle):
        n = T.int64()
        A = T.match_buffer(a, (n, T.int64(4)), "int8")
        B = T.match_buffer(b, (n, T.int64(4)), "int8")
        for i, j in T.grid(n, T.int64(4)):
            with T.sblock("s"):
                vi, vj = T.axis.remap("SS", [i, j])
                B[vi, vj] = T.Cast("int8", T.Cast("float32", A[vi, vj]) * T.float32(0.5))

    @R.function
    def main(x: R.Tensor(("n", 4), "float32")) -> R.Tensor(("n", 4), "float32"):
        n = T.int64()
        cls = PlantedKernel
        with R.dataflow():
            q = R.quantize(x, R.const(0.1, "float32"), R.const(0, "int8"), out_dtype="int8", axis=1)
            s = R.call_tir(cls.sneaky, (q,), out_ty=R.Tensor((n, 4), "int8"))
            y = R.dequantize(s, R.const(0.1, "float32"), R.const(0, "int8"), out_dtype="float32", axis=1)
            R.output(y)
        return y


def test_planted_float_ops_are_named():
    bad = float_ops_in_integer_region(PlantedAstype)
    assert [op for op, _ in bad] == ["relax.astype", "relax.multiply"]
    with pytest.raises(RelaxIntegerOnlyError, match="relax.multiply"):
        verify_integer_only(PlantedAstype)


def test_float_arithmetic_inside_a_kernel_is_named():
    bad = float_ops_in_integer_region(PlantedKernel)
    assert bad == [("call_tir sneaky", "s: the kernel computes in floating point")]


def test_imported_intq_linear_model_is_integer_only():
    from intq.quantizer.ops.linear import IntLinear
    from intq.quantizer.ops.onnx_fn import single_op_model

    op = IntLinear(np.ones((4, 8), np.int8), np.zeros(4, np.int32), np.full(4, 0.01))
    mod = import_onnx(single_op_model(op, [np.zeros((2, 8), np.int8)]))
    verify_integer_only(mod)


def test_whole_quantized_vit_is_integer_only():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig.deit_tiny(img_size=32, patch=4, depth=1, num_classes=10)).eval()
    onnx_model = intq.quantize(model, [torch.randn(2, 3, 32, 32)], progress=False).to_onnx()
    verify_integer_only(import_onnx(onnx_model))
