"""The TVM artifact equals onnxruntime and the torch emulation, bit for bit,
on MiniLM-L6 (real weights) and a DeiT-tiny-shaped ViT, at several batch
sizes and sequence lengths (one compiled module serves every shape)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from intq.passes import compat
from intq.passes.pipeline import compile_onnx


def _check(qmodel, inputs_list):
    int_model = qmodel.to_onnx()
    compiled = compile_onnx(int_model, "x86")
    vm = compat.VirtualMachine(compiled.executable, compat.tvm.cpu(0))
    sess = ort.InferenceSession(int_model.SerializeToString(), providers=["CPUExecutionProvider"])
    for x in inputs_list:
        got = vm["main"](compat.tvm.runtime.tensor(x.numpy())).numpy()
        want = sess.run(None, {compiled.input_names[0]: x.numpy()})[0]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, qmodel(x).numpy())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_deit_tiny_tvm_equals_onnxruntime_and_torch(deit_tiny):
    _, qmodel = deit_tiny
    gen = torch.Generator().manual_seed(11)
    _check(qmodel, [torch.randn(b, 3, 224, 224, generator=gen) for b in (1, 2)])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_minilm_tvm_equals_onnxruntime_and_torch(minilm_int8):
    _, _, qmodel = minilm_int8
    gen = torch.Generator().manual_seed(12)
    shapes = ((1, 5), (2, 17), (3, 64), (1, 128))
    inputs = []
    for batch, length in shapes:
        ids = torch.randint(1000, 30000, (batch, length), generator=gen)
        ids[:, 0], ids[:, -1] = 101, 102
        inputs.append(ids)
    _check(qmodel, inputs)
