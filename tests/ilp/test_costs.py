"""Cost tables: exact size and BOPs of hand-built models, measured latencies, one-node layer models bit-exact
with the whole model's kernels (onnxruntime and TVM), and timing through a TVM RPC tracker and server."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import intq
from intq.config import QuantConfig
from intq.ilp import costs as C
from intq.ilp.table import Table
from intq.ilp.timing import RemoteSpec, Runner
from intq.passes.pipeline import compile_onnx
from intq.passes.targets import resolve_target
from intq.quantizer.sensitivity import layer_sensitivity

FAST = dict(repeats=5, min_repeat_ms=1.0)


def _init(**arrays):
    return [numpy_helper.from_array(v.astype(np.float32), name=k) for k, v in arrays.items()]


def cnn_onnx() -> onnx.ModelProto:
    """conv 3x3 (3 -> 3, pad 1) + ReLU, conv 1x1 (3 -> 5) + ReLU, flatten, Gemm (180 -> 7), on [n, 3, 6, 6]."""
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", "wl", "bl"], ["y"], name="fc", transB=1),
    ]
    inits = _init(
        w1=rng.standard_normal((3, 3, 3, 3)) * 0.3,
        b1=rng.standard_normal(3) * 0.1,
        w2=rng.standard_normal((5, 3, 1, 1)) * 0.3,
        b2=rng.standard_normal(5) * 0.1,
        wl=rng.standard_normal((7, 180)) * 0.05,
        bl=rng.standard_normal(7) * 0.1,
    )
    g = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 7])],
        initializer=inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def block_onnx() -> onnx.ModelProto:
    """A transformer-style block on [n, 4, 8]: LayerNorm -> fc1 (8 -> 12) + ReLU -> fc2 (12 -> 8) -> residual add
    -> head (8 -> 3): an IntLinear on a per-channel LayerNorm scale, an IntLinear16, an IntLinearAcc."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "be"], ["ln"], name="norm", axis=-1),
        helper.make_node("MatMul", ["ln", "w1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
        helper.make_node("Relu", ["a1"], ["r1"], name="act"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "b2"], ["a2"], name="fc2_bias"),
        helper.make_node("Add", ["x", "a2"], ["res"], name="residual"),
        helper.make_node("MatMul", ["res", "w3"], ["m3"], name="head"),
        helper.make_node("Add", ["m3", "b3"], ["y"], name="head_bias"),
    ]
    inits = _init(
        g=1 + 0.1 * rng.standard_normal(8),
        be=0.1 * rng.standard_normal(8),
        w1=0.3 * rng.standard_normal((8, 12)),
        b1=0.1 * rng.standard_normal(12),
        w2=0.3 * rng.standard_normal((12, 8)),
        b2=0.1 * rng.standard_normal(8),
        w3=0.3 * rng.standard_normal((8, 3)),
        b3=0.1 * rng.standard_normal(3),
    )
    g = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 3])],
        initializer=inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def _calib(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(2)]


@pytest.fixture(scope="module")
def cnn():
    """(q8, q4, calib): q4 has only the middle conv at 4 bits (first and last pinned at 8)."""
    calib = _calib((4, 3, 6, 6), 7)
    q8 = intq.quantize(cnn_onnx(), calib, progress=False)
    q4 = intq.quantize(cnn_onnx(), calib, QuantConfig(bits=4), progress=False)
    return q8, q4, calib


@pytest.fixture(scope="module")
def block():
    calib = _calib((3, 4, 8), 8)
    q8 = intq.quantize(block_onnx(), calib, progress=False)
    q4 = intq.quantize(block_onnx(), calib, QuantConfig(bits=4, first_last_bits=4), progress=False)
    return q8, q4, calib


@pytest.fixture(scope="module")
def cnn_table(cnn):
    q8, q4, _ = cnn
    return C.layer_costs(q8, q4, "x86", progress=False, **FAST)


# ---------------------------------------------------------------- size, BOPs, names
def test_size_and_bops_exact(cnn_table, block):
    # size = ceil(params * b / 8) + 4 bytes per int32 bias; BOPs = MACs per sample * b * b
    expected = {
        "conv1": (3 * 3 * 3 * 3, 3, 3 * 6 * 6 * 3 * 3 * 3),  # (params, out channels, MACs)
        "conv2": (5 * 3, 5, 5 * 6 * 6 * 3),
        "fc": (7 * 180, 7, 7 * 180),
    }
    assert list(cnn_table) == list(expected)
    for name, (params, out_ch, macs) in expected.items():
        for b in (8, 4):
            cost = cnn_table[name][b]
            assert cost.size_bytes == math.ceil(params * b / 8) + 4 * out_ch, (name, b)
            assert cost.bops == macs * b * b, (name, b)
    assert cnn_table["conv1"][4].size_bytes == 41 + 12  # 81 weights: 40.5 bytes round up
    assert cnn_table["conv2"][4].size_bytes == 8 + 20
    # linears on [n, 4, K]: 4 rows per sample
    q8, _, _ = block
    layers = {layer.name: layer for layer in C.weighted_layers(q8)}
    assert {n: type(x.op).__name__ for n, x in layers.items()} == {
        "fc1_bias": "IntLinear",
        "fc2_bias": "IntLinear16",
        "head_bias": "IntLinearAcc",
    }
    assert [(x.params, x.macs, x.size_bytes(4), x.bops(4)) for x in layers.values()] == [
        (96, 4 * 96, 48 + 48, 4 * 96 * 16),
        (96, 4 * 96, 48 + 32, 4 * 96 * 16),
        (24, 4 * 24, 12 + 12, 4 * 24 * 16),
    ]


def test_layer_names_are_the_sensitivity_names(cnn, cnn_table):
    q8, _, calib = cnn
    sens = layer_sensitivity(q8, calib[:1], max_samples=2, min_samples=2, progress=False)
    assert [x.name for x in C.weighted_layers(q8)] == list(sens) == list(cnn_table)
    table = Table.from_sensitivity(sens, latency=cnn_table.latency())
    assert table.row("conv2").latency == {b: cnn_table["conv2"][b].latency_s for b in (4, 8)}


# ---------------------------------------------------------------- latency
def test_latency_measured_for_every_layer_and_width(cnn_table, cnn):
    _, q4, _ = cnn
    assert C.model_layer_bits(q4) == {"conv1": 8, "conv2": 4, "fc": 8}
    # conv2 is timed on q4's own 4-bit kernel; conv1 and fc are 8-bit there: synthetic 4-bit instances
    assert {n: per[4].synthetic for n, per in cnn_table.items()} == {"conv1": True, "conv2": False, "fc": True}
    assert not any(per[8].synthetic for per in cnn_table.values())
    for name, per in cnn_table.items():
        for b, cost in per.items():
            assert math.isfinite(cost.latency_s) and cost.latency_s > 0, (name, b, cost)
    assert set(cnn_table.model_latency_s) == {8, 4}
    assert all(math.isfinite(t) and t > 0 for t in cnn_table.model_latency_s.values())
    assert cnn_table.input_shapes == {"conv1": (4, 3, 6, 6), "conv2": (4, 3, 6, 6), "fc": (4, 180)}
    # the remainders close the prediction onto the measured models: all-8, and q4's own widths (conv2 at 4)
    all8 = C.predict_latency(cnn_table, {n: 8 for n in cnn_table})
    assert all8 == pytest.approx(cnn_table.model_latency_s[8], rel=1e-12)
    mixed = C.predict_latency(cnn_table, C.model_layer_bits(q4))
    assert mixed == pytest.approx(cnn_table.model_latency_s[4], rel=1e-9)
    lat = cnn_table.latency()
    share = lat["conv2"][8] / math.fsum(per[8] for per in lat.values())  # conv2's part of the layers' 8-bit time
    r_q4 = cnn_table.model_latency_s[4] - lat["conv1"][8] - lat["conv2"][4] - lat["fc"][8]
    r4 = cnn_table.remainder_s + (r_q4 - cnn_table.remainder_s) / share  # extrapolated to all layers at 4
    assert cnn_table.remainder_4_s == pytest.approx(r4, rel=1e-9, abs=1e-12)
    print(
        f"\ncnn (x86): measured 8-bit {cnn_table.model_latency_s[8] * 1e6:.1f} us, 4/8-bit "
        f"{cnn_table.model_latency_s[4] * 1e6:.1f} us (predicted {mixed * 1e6:.1f} us), "
        f"remainder {cnn_table.remainder_s * 1e6:.1f} us"
    )
    back = C.CostTable.from_json(cnn_table.to_json())
    assert back == cnn_table and back.latency() == cnn_table.latency()


def test_predict_latency_refuses_incomplete_input(cnn_table):
    with pytest.raises(ValueError, match=r"missing \['fc'\], unknown \['nope'\]"):
        C.predict_latency(cnn_table, {"conv1": 8, "conv2": 4, "nope": 8})
    with pytest.raises(ValueError, match="no measured latency at 2 bits"):
        C.predict_latency(cnn_table, {"conv1": 2, "conv2": 8, "fc": 8})
    with pytest.raises(ValueError, match=r"measure_model=True\) or pass remainder_s"):
        C.predict_latency(dict(cnn_table.items()), {n: 8 for n in cnn_table})
    assert C.predict_latency(dict(cnn_table.items()), {n: 8 for n in cnn_table}, remainder_s=0.0) == pytest.approx(
        math.fsum(per[8].latency_s for per in cnn_table.values())
    )


def hand_costs(t4: float | None, synthetic4: tuple[str, ...] = ()) -> C.CostTable:
    """Kernel times a: 1/0.5, b: 2/1.5, c: 1/0.5 s at 8/4 bits; the whole 8-bit model 10 s (r_8 = 10 - 4 = 6)."""
    lat = {"a": (1.0, 0.5), "b": (2.0, 1.5), "c": (1.0, 0.5)}
    costs = {
        n: {8: C.Cost(10, 640, l8), 4: C.Cost(5, 160, l4, synthetic=n in synthetic4)} for n, (l8, l4) in lat.items()
    }
    model = {8: 10.0} if t4 is None else {8: 10.0, 4: t4}
    return C.CostTable(costs=costs, target="x86", model_latency_s=model, remainder_s=6.0)


def test_remainder_interpolates_between_the_two_measured_models():
    # the 4-bit model (every layer at 4) ran 9 s: r_4 = 9 - (0.5 + 1.5 + 0.5) = 6.5; 8-bit shares a 1/4, b 1/2, c 1/4
    table = hand_costs(9.0)
    assert table.remainder_4_s == pytest.approx(6.5) and table.remainders == pytest.approx({8: 6.0, 4: 6.5})
    assert C.predict_latency(table, {"a": 8, "b": 8, "c": 8}) == pytest.approx(10.0)  # T_8
    assert C.predict_latency(table, {"a": 4, "b": 4, "c": 4}) == pytest.approx(9.0)  # T_4
    # a alone at 4: r = 6 + 0.5 * 1/4 = 6.125, kernels 0.5 + 2 + 1 = 3.5
    assert C.predict_latency(table, {"a": 4, "b": 8, "c": 8}) == pytest.approx(9.625)
    # b alone at 4: r = 6 + 0.5 * 1/2 = 6.25, kernels 1 + 1.5 + 1 = 3.5
    assert C.predict_latency(table, {"a": 8, "b": 4, "c": 8}) == pytest.approx(9.75)
    # an explicit r_8 replaces the table's; the slope r_4 - r_8 = 0.5 stays the table's
    assert C.predict_latency(table, {"a": 4, "b": 8, "c": 8}, remainder_s=0.0) == pytest.approx(3.625)
    assert C.CostTable.from_json(table.to_json()) == table and table.to_dict()["remainder_4_s"] == pytest.approx(6.5)


def test_remainder_from_a_4bit_model_with_8bit_layers():
    # a and c at 8 in the 4-bit model (synthetic 4-bit costs), b at 4: its kernels 1 + 1.5 + 1 = 3.5 s, model 9.25 s
    # -> r(a4) = 5.75 at b's share 1/2; the line through (0, 6) and (1/2, 5.75) gives r_4 = 5.5 at share 1
    table = hand_costs(9.25, synthetic4=("a", "c"))
    assert table.remainder_4_s == pytest.approx(5.5)
    assert C.predict_latency(table, {"a": 8, "b": 4, "c": 8}) == pytest.approx(9.25)  # the measured 4-bit model
    assert C.predict_latency(table, {"a": 4, "b": 4, "c": 4}) == pytest.approx(5.5 + 2.5)


def test_remainder_is_constant_without_a_4bit_model_time():
    for table in (hand_costs(None), hand_costs(9.0, synthetic4=("a", "b", "c"))):  # untimed; no layer at 4 in it
        assert table.remainder_4_s is None and table.remainders == {8: 6.0}
        assert C.predict_latency(table, {"a": 4, "b": 8, "c": 8}) == pytest.approx(6.0 + 3.5)


def test_ilp_table_takes_the_remainders_and_predicts_as_predict_latency():
    from intq.ilp.table import Table

    records = [{"name": n, "params": 10, "macs": 10, "trace": 1.0, "delta_w": {"4": 1.0, "8": 0.1}} for n in "abc"]
    costs = hand_costs(9.0)
    table = Table.from_sensitivity(records, costs=costs)
    assert table.remainder_s == pytest.approx({8: 6.0, 4: 6.5})
    # the ILP's 4-bit latency cost: kernel + share * (r_4 - r_8): a 0.5 + 0.125, b 1.5 + 0.25
    assert table.cost("latency", "a", 4) == pytest.approx(0.625) and table.cost("latency", "b", 4) == pytest.approx(
        1.75
    )
    assert table.cost("latency", "b", 8) == 2.0 and table.cost("size", "b", 4) == 5
    for bits in ({"a": 4, "b": 8, "c": 8}, {"a": 8, "b": 4, "c": 4}, dict.fromkeys("abc", 4)):
        assert table.predicted_latency(bits) == pytest.approx(C.predict_latency(costs, bits), rel=1e-12)


def test_layer_costs_refuses_a_mixed_model_as_the_8bit_one(cnn):
    _, q4, _ = cnn
    with pytest.raises(ValueError, match=r"other widths \{'conv2': 4\}"):
        C.layer_costs(q4, progress=False)


def test_targets_that_do_not_run_here_need_a_remote():
    with pytest.raises(ValueError, match="does not run on this machine.*RemoteSpec"):
        Runner(resolve_target("arm"))
    with pytest.raises(ValueError, match="tracker_port=70000"):
        RemoteSpec("127.0.0.1", 70000, "k")
    with pytest.raises(ValueError, match="key=''"):
        RemoteSpec("127.0.0.1", 9190, "")


# ---------------------------------------------------------------- one-node models == the model's kernels
def _full_model_io(proto: onnx.ModelProto, node_name: str, feeds: dict) -> tuple[np.ndarray, np.ndarray]:
    """The input and output of the intq node ``node_name`` when onnxruntime runs the whole model."""
    node = next(n for n in proto.graph.node if n.name == node_name)
    types = {vi.name: vi.type for vi in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    for name in (node.input[0], node.output[0]):
        probe.graph.output.append(helper.make_value_info(name, types[name]))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    *_, x, y = sess.run(None, feeds)
    return x, y


def _run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("which", ["cnn", "block"])
def test_one_node_models_are_bit_exact_with_the_full_model(which, request):
    q8, q4, _ = request.getfixturevalue(which)
    shape = (5, 3, 6, 6) if which == "cnn" else (5, 4, 8)  # not the example batch: the batch dim stays symbolic
    feeds = {"x": np.random.default_rng(11).standard_normal(shape).astype(np.float32) * 2}
    seen = set()
    for qm in (q8, q4):
        proto = qm.to_onnx()
        for layer in C.weighted_layers(qm, proto):
            x, y = _full_model_io(proto, layer.node, feeds)
            model = C.layer_model(layer.op, layer.input_shape, layer.input_dims, len(layer.output_shape))
            assert isinstance(layer.input_dims[0], str), layer.input_dims  # the batch axis, symbolic
            got = _run_ort(model, x)
            assert got.dtype == y.dtype and np.array_equal(got, y), (layer.name, layer.bits)
            inits = {t.name: t.data_type for t in model.graph.initializer}
            assert (inits.get("w.int4") == TensorProto.INT4) == (layer.bits == 4), (layer.name, inits)
            seen.add((type(layer.op).__name__, layer.bits))
    expected = {"cnn": {("IntConv2d", 8), ("IntConv2d", 4), ("IntLinearAcc", 8)}}.get(which) or {
        (k, b) for k in ("IntLinear", "IntLinear16", "IntLinearAcc") for b in (8, 4)
    }
    assert seen == expected


def test_layer_model_keeps_the_reduction_axis_static(block, cnn):
    """ONNX shape inference names every dim after a Reshape to a computed shape (MiniLM's attention output); the
    one-node model still declares the reduction axis (a linear's K, a conv's channels) static, and compiles."""
    for qm in (block[0], cnn[0]):
        layer = C.weighted_layers(qm)[0]
        unnamed = tuple(f"unk_{k}" for k in range(len(layer.input_shape)))
        model = C.layer_model(layer.op, layer.input_shape, unnamed, len(layer.output_shape))
        dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        axis = 1 if len(layer.input_shape) == 4 else -1
        expected = list(unnamed)
        expected[axis] = layer.input_shape[axis]
        assert dims == expected, (layer.name, dims)
        compile_onnx(model, "x86")


def test_synthetic_4bit_instance(block):
    q8, _, _ = block
    layer = C.weighted_layers(q8)[1]
    w8 = layer.op.w.clone()
    op4 = C.as_4bit(layer.op)
    w4 = op4.w.to(torch.int64)
    assert torch.equal(w4, torch.round(w8.to(torch.float64) * 7 / 127).to(torch.int64)) and int(w4.abs().max()) == 7
    assert torch.equal(layer.op.w, w8), "the 8-bit op is left as it was"
    model = C.layer_model(op4, layer.input_shape, layer.input_dims, len(layer.output_shape))
    assert {t.name: t.data_type for t in model.graph.initializer}["w.int4"] == TensorProto.INT4
    x = np.random.default_rng(2).integers(-8, 8, size=(2, 4, 12), dtype=np.int8)
    assert np.array_equal(_run_ort(model, x), op4(torch.from_numpy(x)).numpy())


# ---------------------------------------------------------------- RPC
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, ready, deadline: float, procs) -> None:
    while not ready():
        if any(p.poll() is not None for p, _ in procs) or time.monotonic() > deadline:
            errs = []
            for p, err in procs:
                err.seek(0)
                errs.append(f"pid {p.pid} exit {p.poll()}: " + err.read().decode(errors="replace")[-2000:])
            raise RuntimeError(f"the RPC {what} did not come up: " + " | ".join(errs))
        time.sleep(0.1)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def local_rpc(key: str, timeout_s: float = 60.0):
    """A TVM RPC tracker and one server registered under ``key``, on 127.0.0.1 at free ports, as
    ``python -m tvm.exec.rpc_tracker`` / ``rpc_server`` processes in their own process groups (killed on exit)."""
    import tvm.rpc

    procs: list[tuple[subprocess.Popen, object]] = []
    deadline = time.monotonic() + timeout_s

    def start(*argv):
        err = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", *argv]
        procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True), err))

    try:
        tport, sport = _free_port(), _free_port()
        start("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tport), "--port-end", str(tport + 1))
        # started at once: the server retries its tracker connection while the tracker comes up
        start(
            "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(sport), "--port-end", str(sport + 1),
            "--tracker", f"127.0.0.1:{tport}", "--key", key,
        )  # fmt: skip
        _wait("tracker", lambda: _listening(tport), deadline, procs)
        tracker = tvm.rpc.connect_tracker("127.0.0.1", tport)

        def registered():
            return tracker.summary()["queue_info"].get(key, {}).get("free", 0) > 0

        _wait("server", registered, deadline, procs)
        tracker.close()
        yield RemoteSpec("127.0.0.1", tport, key, session_timeout_s=timeout_s)
    finally:
        for p, err in reversed(procs):  # each group: the tool, its tracker/server worker, forked sessions
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
            err.close()


def test_timing_through_an_rpc_tracker_and_server(block, cnn, cnn_table):
    q8, q4, _ = block
    layer = C.weighted_layers(q4)[1]  # the 4-bit IntLinear16: packed weights unpacked on the device
    assert (type(layer.op).__name__, layer.bits) == ("IntLinear16", 4)
    model = C.layer_model(layer.op, layer.input_shape, layer.input_dims, len(layer.output_shape))
    compiled = compile_onnx(model, "x86")
    x = np.random.default_rng(4).integers(0, 16, size=layer.input_shape, dtype=np.int8)
    with Runner(compiled.spec) as local:
        t_local = local.time(compiled, [x], **FAST)
        y_local = local.run(compiled, [x])[0]
    cnn8, _, cnn_calib = cnn
    with local_rpc("intq-test") as remote:
        with Runner(compiled.spec, remote) as runner:
            y_remote = runner.run(compiled, [x])[0]
            t_remote = runner.time(compiled, [x], **FAST)
        t_model = C.measure_model_latency(
            cnn8.to_onnx(), "x86", inputs={"x": cnn_calib[0].numpy()}, remote=remote, **FAST
        )
    expected = _run_ort(model, x)
    assert np.array_equal(y_remote, expected) and np.array_equal(y_local, expected)
    for t in (t_local, t_remote, t_model):
        assert math.isfinite(t) and t > 0
    # same machine behind the RPC server: the same kernel within a loose factor (the CPU is shared)
    assert 1 / 50 < t_remote / t_local < 50, (t_remote, t_local)
    assert 1 / 50 < t_model / cnn_table.model_latency_s[8] < 50, (t_model, cnn_table.model_latency_s[8])
    print(
        f"\nrpc: IntLinear16@4 local {t_local * 1e6:.2f} us, remote {t_remote * 1e6:.2f} us; "
        f"cnn 8-bit model remote {t_model * 1e6:.1f} us, local {cnn_table.model_latency_s[8] * 1e6:.1f} us"
    )
