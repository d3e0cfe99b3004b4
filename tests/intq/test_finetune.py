"""intq.finetune: QAT on the canonical graph, converted like PTQ; checkpoints resume."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import intq
from intq.config import QuantConfig
from intq.finetuning import CheckpointMismatchError
from intq.quantizer.qat import ActFakeQuant, ActSite, WeightFakeQuant


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(y + self.body(y))
        return self.head(y.mean(dim=(2, 3)))


class CountingBatches:
    """Fixed batches, counting how many were handed out."""

    def __init__(self, batches):
        self.batches = batches
        self.served = 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            self.served += 1
            yield b


@pytest.fixture(scope="module")
def task():
    """A 4-class task whose labels are the float model's own decisions, so the float model scores 100%."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():
        model.stem[1].running_mean.uniform_(-0.2, 0.2)
        model.stem[1].running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 3, 8, 8, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    train = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 192, 32)]
    test = (x[192:], y[192:])
    qmodel = intq.quantize(model, [x[:64]], QuantConfig(bits=4, first_last_bits=4), progress=False)
    return model, qmodel, train, test


def agreement(qmodel, test) -> float:
    x, y = test
    return float((qmodel(x).argmax(1) == y).float().mean())


def test_fake_quantizers_match_the_integer_grid():
    w = torch.tensor([[0.7, -0.35, 0.1], [2.0, 1.0, -0.5]])
    got = WeightFakeQuant(4)(w)
    # per row: S = max|w| / 7, values rounded to multiples of S
    expected = torch.stack([torch.round(r / (r.abs().max() / 7)) * (r.abs().max() / 7) for r in w])
    assert torch.equal(got, expected)
    fq = ActFakeQuant(ActSite(clip=1.5, qmin=0, qmax=15))
    x = torch.tensor([-1.0, 0.04, 0.06, 1.4, 9.0])
    assert torch.allclose(fq(x), torch.tensor([0.0, 0.0, 0.1, 1.4, 1.5]), atol=1e-6)
    assert fq.clip == pytest.approx(1.5)


def test_gradients_pass_straight_through_rounding():
    fq = ActFakeQuant(ActSite(clip=1.0, qmin=-7, qmax=7))
    x = torch.tensor([0.03, 0.5, 3.0], requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # identity inside the range, zero where clamped
    assert fq.log_scale.grad is not None and float(fq.log_scale.grad) != 0.0


def test_finetune_improves_a_4bit_model_and_exports_bit_exact(task, tmp_path):
    _, qmodel, train, test = task
    before = agreement(qmodel, test)
    tuned = intq.finetune(qmodel, train, epochs=4, lr=3e-3, progress=False)
    after = agreement(tuned, test)
    assert after > before, (before, after)
    # the tuned model is an ordinary integer model: onnxruntime equals the torch emulation bit for bit
    onnx_model = tuned.to_onnx(integer_outputs=True)
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = test[0][:16]
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    want = tuned.integer_forward(x)[0].numpy()
    np.testing.assert_array_equal(got, want)
    # 4-bit weights stay 4-bit after training
    assert any(layer.bits == 4 for layer in tuned.layers if layer.op.startswith("IntConv2d"))


def test_checkpoint_resumes_where_it_stopped(task, tmp_path):
    _, qmodel, train, _ = task
    ckpt = tmp_path / "qat.pt"
    first = CountingBatches(train)
    intq.finetune(qmodel, first, epochs=1, lr=1e-3, checkpoint=ckpt, progress=False)
    assert ckpt.is_file() and first.served == len(train)
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 0)
    second = CountingBatches(train)
    intq.finetune(qmodel, second, epochs=2, lr=1e-3, checkpoint=ckpt, progress=False)
    assert second.served == len(train)  # only the second epoch ran
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    third = CountingBatches(train)
    intq.finetune(qmodel, third, epochs=2, lr=1e-3, checkpoint=ckpt, progress=False)
    assert third.served == 0  # already done: converts the checkpointed weights


def test_checkpoint_of_another_model_is_refused(task, tmp_path):
    _, qmodel, train, _ = task
    ckpt = tmp_path / "qat.pt"
    intq.finetune(qmodel, train[:1], epochs=1, lr=1e-3, checkpoint=ckpt, progress=False)
    other = intq.quantize(SmallCNN().eval(), [train[0][0]], QuantConfig(bits=8), progress=False)
    with pytest.raises(CheckpointMismatchError, match="another model or configuration"):
        intq.finetune(other, train[:1], epochs=1, checkpoint=ckpt, progress=False)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="delete it"):
        intq.finetune(qmodel, train[:1], epochs=1, checkpoint=ckpt, progress=False)


def test_bad_arguments_are_refused(task):
    _, qmodel, train, _ = task
    with pytest.raises(ValueError, match="epochs"):
        intq.finetune(qmodel, train, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        intq.finetune(qmodel, train, lr=-1.0)
