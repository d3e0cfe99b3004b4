"""Sensitivity: Hutchinson traces against exact Hessians (tolerances from the estimator's variance), the
weight perturbation against direct computations and the converter's own weights, and the JSON cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import intq
from intq.ilp.table import Table
from intq.quantizer import sensitivity as sens
from intq.quantizer.sensitivity import hutchinson_traces, layer_sensitivity, weight_codes, weight_perturbation

SIGMAS = 4.5  # a correct estimator lands outside this many standard deviations with probability < 1e-5


def joint_variances(h: np.ndarray, blocks: list[slice]) -> list[float]:
    """Variance of one sample v_i . (H v)_i, v Rademacher: 2 sum_{k != l} S_kl^2, S the symmetric part of P_i H."""
    out = []
    for blk in blocks:
        m = np.zeros_like(h)
        m[blk, :] = h[blk, :]
        s = (m + m.T) / 2
        off = s - np.diag(np.diag(s))
        out.append(2.0 * float((off**2).sum()))
    return out


def assert_within(est: float, exact: float, var: float, n: int, what: str):
    sigma = math.sqrt(var / n)
    bound = SIGMAS * sigma + 1e-9 * abs(exact)
    assert abs(est - exact) <= bound, f"{what}: estimate {est:.6g} vs exact {exact:.6g}, |diff| > {bound:.3g}"


def test_hutchinson_on_a_known_matrix():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((9, 9))
    h = a @ a.T + np.diag(rng.uniform(0, 3, 9))
    blocks = [slice(0, 4), slice(4, 9)]
    ht = torch.tensor(h)

    def hvp(vs):
        hv = ht @ torch.cat([v.reshape(-1) for v in vs])
        return [hv[:4].reshape(2, 2), hv[4:]]

    n = 600
    means, stderrs, count = hutchinson_traces(
        hvp, [torch.Size([2, 2]), torch.Size([5])], max_samples=n, min_samples=2, tol=0.0,
        generator=torch.Generator().manual_seed(0), dtype=torch.float64,
    )  # fmt: skip
    assert count == n
    for est, se, blk, var in zip(means, stderrs, blocks, joint_variances(h, blocks), strict=True):
        assert_within(est, float(np.trace(h[blk, blk])), var, n, f"block {blk}")
        assert 0.6 < se / math.sqrt(var / n) < 1.4, f"reported stderr {se:.4g} vs sqrt(var/n) {math.sqrt(var / n):.4g}"


def test_hutchinson_diagonal_matrix_is_exact_and_stops_early():
    d = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    means, stderrs, count = hutchinson_traces(
        lambda vs: [d * vs[0]], [torch.Size([3])], max_samples=50, min_samples=3, tol=0.0,
        generator=torch.Generator().manual_seed(0), dtype=torch.float64,
    )  # fmt: skip
    assert count == 3 and means == [8.0] and stderrs == [0.0]


def test_linear_regression_mse_trace():
    """L = mean (W x + b - y)^2 over n samples and m outputs: H_W = I_m (x) 2 X^T X / (n m)."""
    torch.manual_seed(0)
    n, d, m = 32, 6, 2
    x = torch.randn(n, d, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    y = torch.randn(n, m, dtype=torch.float64)
    model = torch.nn.Linear(d, m).double()
    samples = 300
    res = layer_sensitivity(
        model, [x], [y], loss_fn=F.mse_loss, max_samples=samples, min_samples=2, tol=0.0, progress=False
    )
    xn = x.numpy()
    block = 2.0 * xn.T @ xn / (n * m)
    h = np.kron(np.eye(m), block)
    r = res["Linear"]
    assert r.samples == samples and r.params == m * d
    exact = 2.0 * float((xn**2).sum()) / n
    assert math.isclose(float(np.trace(h)), exact, rel_tol=1e-12)
    assert_within(r.trace, exact, joint_variances(h, [slice(0, m * d)])[0], samples, "MSE trace")
    assert math.isclose(r.trace_per_param, r.trace / (m * d))


def test_early_stop_by_relative_stderr():
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randn(16, 3)
    res = layer_sensitivity(
        torch.nn.Linear(8, 3), [x], [y], loss_fn=F.mse_loss, max_samples=500, min_samples=4, tol=0.1, progress=False
    )
    r = next(iter(res.values()))
    assert 4 <= r.samples < 500
    assert r.trace_stderr <= 0.1 * abs(r.trace)


def softmax_classifier_hessian(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """Mean over samples of kron(diag(p) - p p^T, x x^T): the Hessian of CE (any label) and of the KL at W_float."""
    p = torch.softmax(x @ w.T + b, dim=-1).double().numpy()
    xs = x.double().numpy()
    hs = [np.kron(np.diag(pi) - np.outer(pi, pi), np.outer(xi, xi)) for pi, xi in zip(p, xs, strict=True)]
    return np.mean(hs, axis=0)


def test_kl_and_cross_entropy_equal_the_softmax_hessian():
    torch.manual_seed(1)
    c, d, bsz = 3, 5, 12
    model = torch.nn.Linear(d, c).double()
    x = torch.randn(bsz, d, dtype=torch.float64)
    labels = torch.randint(0, c, (bsz,))
    h = softmax_classifier_hessian(model.weight.detach(), model.bias.detach(), x)
    var = joint_variances(h, [slice(0, c * d)])[0]
    n = 300
    kw = dict(max_samples=n, min_samples=2, tol=0.0, progress=False)
    kl = next(iter(layer_sensitivity(model, [x], **kw).values()))
    ce = next(iter(layer_sensitivity(model, [x], [labels], **kw).values()))
    # (the draws also cover the input, whose cross block with W differs: the CE gradient is not 0, so the
    # estimates are not equal draw for draw, only in expectation)
    assert_within(kl.trace, float(np.trace(h)), var, n, "KL trace")
    assert_within(ce.trace, float(np.trace(h)), var, n, "CE trace")


def test_two_layers_joint_estimate_against_full_hessian():
    """Both layers' weights and inputs from one draw: each block's mean is its trace, with the cross blocks'
    extra variance (the Hessian over all four blocks, by torch.autograd.functional on a hand-written KL)."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 5)).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    p_f = torch.softmax(model(x), dim=-1).detach()

    def kl(flat):  # the weights, then a delta on each layer's input (x: 10 x 4, tanh output: 10 x 3)
        v1, v2 = flat[:12].reshape(3, 4), flat[12:27].reshape(5, 3)
        d1, d2 = flat[27:67].reshape(10, 4), flat[67:97].reshape(10, 3)
        y = (torch.tanh((x + d1) @ v1.T + b1) + d2) @ v2.T + b2
        return (p_f * (torch.log(p_f) - torch.log_softmax(y, -1))).sum(-1).mean()

    flat = torch.cat([w1.reshape(-1), w2.reshape(-1), torch.zeros(70, dtype=torch.float64)])
    grad = torch.autograd.functional.jacobian(kl, flat)
    assert float(grad.abs().max()) < 1e-12, "the KL to the float output has zero gradient at W_float"
    h = torch.autograd.functional.hessian(kl, flat).numpy()
    weights, inputs = [slice(0, 12), slice(12, 27)], [slice(27, 67), slice(67, 97)]
    variances = joint_variances(h, weights + inputs)
    n = 400
    res = layer_sensitivity(model, [x], max_samples=n, min_samples=2, tol=0.0, progress=False)
    assert list(res) == ["0", "2"]
    for r, w_blk, a_blk, w_var, a_var in zip(res.values(), weights, inputs, variances[:2], variances[2:], strict=True):
        assert r.trace > 0 and r.act_trace > 0  # the Gauss-Newton matrix of the KL is positive semi-definite
        assert_within(r.trace, float(np.trace(h[w_blk, w_blk])), w_var, n, f"layer {r.name}")
        assert_within(r.act_trace, float(np.trace(h[a_blk, a_blk])), a_var, n, f"layer {r.name} input")
        assert 0 < r.act_trace_stderr < 4 * math.sqrt(a_var / n)


def test_input_trace_of_a_diagonal_linear_regression():
    """L = mean_b ||W x_b - t_b||^2 with W = diag(1, 2, 3): d2L/dx_b^2 = (2/B) W^T W, so Tr(H_A) over the B
    samples is 2 * (1 + 4 + 9) = 28, whatever the data."""
    model = torch.nn.Linear(3, 3, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
    x, t = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    n = 300

    def loss(y, target):
        return ((y - target) ** 2).sum(-1).mean()

    r = next(iter(layer_sensitivity(model, [x], [t], loss_fn=loss, max_samples=n, min_samples=2, tol=0.0,
                                    progress=False).values()))  # fmt: skip

    def flat_loss(flat):
        return loss((x + flat[9:].reshape(7, 3)) @ flat[:9].reshape(3, 3).T, t)

    h = torch.autograd.functional.hessian(flat_loss, torch.cat([model.weight.detach().reshape(-1), torch.zeros(21)]))
    h = h.numpy()
    assert math.isclose(float(np.trace(h[9:, 9:])), 28.0, rel_tol=1e-12)
    # the x block is diagonal, so its own part of each draw is exactly 28; the cross block with W adds the noise
    assert_within(r.act_trace, 28.0, joint_variances(h, [slice(0, 9), slice(9, 30)])[1], n, "input trace")


def test_batches_are_weighted_by_size():
    """Two batches (sizes 4 and 12) estimate the Hessian of the loss over all 16 samples."""
    torch.manual_seed(4)
    model = torch.nn.Linear(5, 3).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    h = softmax_classifier_hessian(model.weight.detach(), model.bias.detach(), x)
    n = 120
    res = layer_sensitivity(model, [x[:4], x[4:]], max_samples=n, min_samples=2, tol=0.0, progress=False)
    r = res["Linear"]
    assert_within(r.trace, float(np.trace(h)), joint_variances(h, [slice(0, 15)])[0], n, "two batches")


# ---------------------------------------------------------------- perturbation
def test_perturbation_by_hand():
    w = torch.tensor([[1.0, 0.5, -0.25, 0.1], [-2.0, 1.0, 0.0, 0.3]])
    # int4, row 0: S = 1/7, W/S = [7, 3.5, -1.75, 0.7] -> [7, 4 (half to even), -2, 1]
    # row 1: S = 2/7, W/S = [-7, 3.5, 0, 1.05] -> [-7, 4, 0, 1]
    codes, scale = weight_codes(w, 4)
    assert codes.tolist() == [[7, 4, -2, 1], [-7, 4, 0, 1]]
    # Q = [[1, 4/7, -2/7, 1/7], [-2, 8/7, 0, 2/7]]; W holds the float32 values of the literals
    expect = sum(
        (float(np.float32(a)) - b) ** 2
        for a, b in [(0.5, 4 / 7), (-0.25, -2 / 7), (0.1, 1 / 7), (1.0, 8 / 7), (0.3, 2 / 7)]
    )
    assert math.isclose(weight_perturbation(w, 4), expect, rel_tol=1e-12)


def test_perturbation_matches_a_per_channel_loop():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * rng.uniform(0.1, 3, (6, 1, 1, 1)).astype(np.float32)
    for bits, q in ((8, 127), (4, 7)):
        total = 0.0
        for row in w.astype(np.float64):
            s = np.abs(row).max() / q
            qr = np.clip(np.round(row / s), -q, q) * s  # numpy rounds half to even, as torch
            total += float(((row - qr) ** 2).sum())
        assert math.isclose(weight_perturbation(torch.from_numpy(w), bits), total, rel_tol=1e-12), bits
    assert weight_perturbation(torch.from_numpy(w), 4) > weight_perturbation(torch.from_numpy(w), 8)


# ---------------------------------------------------------------- canonical float graph
def _conv_gemm_onnx():
    rng = np.random.default_rng(6)
    wc = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
    bc = rng.standard_normal(4).astype(np.float32) * 0.1
    wl = rng.standard_normal((5, 4 * 6 * 6)).astype(np.float32) * 0.05
    bl = rng.standard_normal(5).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Conv", ["x", "wc", "bc"], ["c"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Gelu", ["c"], ["g"], name="gelu_a", domain=""),
        helper.make_node("Flatten", ["g"], ["f"], name="flat_a", axis=1),
        helper.make_node("Gemm", ["f", "wl", "bl"], ["y"], name="fc_a", transB=1),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        initializer=[numpy_helper.from_array(v, name=k) for k, v in dict(wc=wc, bc=bc, wl=wl, bl=bl).items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


@pytest.fixture(scope="module")
def tiny_qmodel():
    gen = torch.Generator().manual_seed(7)
    calib = [torch.randn(4, 3, 6, 6, generator=gen) for _ in range(2)]
    return intq.quantize(_conv_gemm_onnx(), calib, progress=False), calib


def test_canonical_graph_layers(tiny_qmodel):
    qmodel, calib = tiny_qmodel
    res = layer_sensitivity(qmodel, calib[:1], max_samples=16, min_samples=4, tol=0.0, progress=False)
    weighted = [r for r in qmodel.layers if r.op.startswith(("IntConv2d", "IntLinear"))]
    assert list(res) == [r.source for r in weighted] == ["conv_a", "fc_a"]
    conv, fc = res["conv_a"], res["fc_a"]
    assert (conv.op, conv.params, conv.macs) == ("FConv2d", 4 * 3 * 3 * 3, 4 * 6 * 6 * 3 * 3 * 3)
    assert (fc.op, fc.params, fc.macs) == ("FLinear", 5 * 144, 5 * 144)
    assert conv.trace > 0 and fc.trace > 0 and conv.samples == 16
    # the converter's int8 weights are this module's 8-bit codes (scalar input scale: the same grid)
    for rec in weighted:
        src = next(n for n in qmodel.float_graph.graph.nodes if n.meta.get("onnx_node") == rec.source)
        codes, _ = weight_codes(qmodel.float_graph.get_submodule(src.target).weight, 8)
        int_w = qmodel.graph_module.get_submodule(rec.name).w
        assert torch.equal(codes.to(torch.int8), int_w), rec.source
    # the records feed the ILP table directly
    table = Table.from_sensitivity(res)
    assert [r.name for r in table.layers] == ["conv_a", "fc_a"]
    assert table.layers[0].size_bytes == {4: 54, 8: 108} and table.layers[1].bops[4] == 5 * 144 * 16
    assert table.layers[1].sensitivity == pytest.approx(fc.trace / fc.params)


# ---------------------------------------------------------------- cache
def _mlp():
    torch.manual_seed(8)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def test_cache_hit_and_miss(tmp_path, monkeypatch):
    model, x = _mlp(), torch.randn(8, 4, generator=torch.Generator().manual_seed(9))
    cache = tmp_path / "sub" / "sens.json"
    kw = dict(max_samples=8, min_samples=2, tol=0.0, progress=False, cache_path=cache)
    first = layer_sensitivity(model, [x], **kw)
    doc = json.loads(cache.read_text())
    assert doc["format"] == "intq-sensitivity" and len(doc["entries"]) == 1
    assert [p.name for p in cache.parent.iterdir()] == ["sens.json"], "no temporary file is left behind"

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(sens, "_measure", boom)
    assert layer_sensitivity(model, [x], **kw) == first  # hit
    with pytest.raises(AssertionError, match="recomputed"):
        layer_sensitivity(model, [x + 1e-3], **kw)  # other data
    with pytest.raises(AssertionError, match="recomputed"):
        layer_sensitivity(model, [x], **{**kw, "seed": 1})  # other settings
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-3
    with pytest.raises(AssertionError, match="recomputed"):
        layer_sensitivity(model, [x], **kw)  # other weights
    monkeypatch.undo()
    layer_sensitivity(model, [x], **kw)
    assert len(json.loads(cache.read_text())["entries"]) == 2


def test_foreign_cache_file_is_not_overwritten(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"something": 1}')
    with pytest.raises(ValueError, match="not an intq sensitivity cache"):
        layer_sensitivity(_mlp(), [torch.randn(2, 4)], max_samples=2, progress=False, min_samples=2, cache_path=path)
    assert path.read_text() == '{"something": 1}'


def test_label_count_mismatch():
    with pytest.raises(ValueError, match="2 label tensors for 1 batches"):
        layer_sensitivity(_mlp(), [torch.randn(2, 4)], [torch.zeros(2), torch.zeros(2)], progress=False)


def test_input_noise_follows_the_converters_grid():
    """S_b^2 / 12 of each layer's input: a signed input's step grows by 127/7 from 8 to 4 bits, an input after a
    fused ReLU (unsigned: [0, 127] at 8 bits, [0, 15] at 4) by 127/15, with the calibrated clip the same."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    calib = [torch.randn(16, 6) for _ in range(2)]
    qmodels = {
        b: intq.quantize(model, calib, intq.QuantConfig(bits=b, first_last_bits=b), progress=False) for b in (8, 4)
    }
    noise = sens.input_noise(qmodels)
    names = [name for name, _ in sens.weighted_layers(qmodels[8].float_graph)]
    assert sorted(noise) == sorted(names)
    first, second = names
    assert math.isclose(noise[first][4] / noise[first][8], (127 / 7) ** 2, rel_tol=1e-9)
    assert math.isclose(noise[second][4] / noise[second][8], (127 / 15) ** 2, rel_tol=1e-9)
    assert all(v > 0 for per in noise.values() for v in per.values())
