"""``read_onnx``: whole models against onnxruntime, the GraphModule contract, and the errors.

Model parity: small torch modules built here (a 2-layer BERT-like encoder,
a small ViT) exported by both torch exporters (``dynamo=True`` with dynamic
shapes, default opset; ``dynamo=False``, opset 17, dynamic axes), read back,
and run at two batch / sequence sizes that differ from the export's. Float32
tolerance ``MODEL_TOL`` (``rtol=1e-4, atol=1e-5``): a few hundred float32
ulps after two layers of matmul, softmax and LayerNorm.
"""

from __future__ import annotations

import copy
import io
import math
import operator
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from intq.export.onnx_reader import OnnxOp, OnnxReadError, read_onnx

MODEL_TOL = {"rtol": 1e-4, "atol": 1e-5}


# ---------------------------------------------------------------- models


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        if mask is not None:
            scores = scores + mask
        y = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(b, t, d)
        return self.out(y)


class EncoderLayer(nn.Module):
    """Post-LN (BERT) or pre-LN (ViT) transformer layer."""

    def __init__(self, dim: int, heads: int, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.attn = Attention(dim, heads)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask=None):
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), mask)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, mask))
        return self.ln2(x + self.mlp(x))


class TinyBert(nn.Module):
    def __init__(self, vocab=50, dim=32, heads=4, layers=2, max_len=32):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.1)
        self.ln = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, pre_norm=False) for _ in range(layers))

    def forward(self, ids, mask):
        t = ids.shape[1]
        x = self.ln(self.tok(ids) + self.pos[:t])
        additive = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, additive)
        return x


class TinyViT(nn.Module):
    def __init__(self, image=32, patch=16, dim=32, heads=4, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        n = (image // patch) ** 2
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.1)
        self.block = EncoderLayer(dim, heads, pre_norm=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.block(x))[:, 0])


def bert_inputs(batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, seq // 2 :] = 0  # padding in the first sequence exercises the additive mask
    return ids, mask


def vit_inputs(batch, seed):
    return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)),)


def export(model, args, dynamo: bool, dims: dict[str, dict[int, str]]) -> onnx.ModelProto:
    names = list(dims)
    if dynamo:
        shapes = {n: {axis: torch.export.Dim(f"{n}_{d}", max=32) for axis, d in ax.items()} for n, ax in dims.items()}
        program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=shapes, input_names=names, verbose=False)
        return program.model_proto
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, still in use
        torch.onnx.export(model, args, f, dynamo=False, opset_version=17, input_names=names, dynamic_axes=dims)
    return onnx.load_from_string(f.getvalue())


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


MODELS = {
    "bert": (
        TinyBert,
        lambda s: bert_inputs(2, 8, s),
        [lambda s: bert_inputs(1, 5, s), lambda s: bert_inputs(3, 11, s)],
    ),
    "vit": (TinyViT, lambda s: vit_inputs(2, s), [lambda s: vit_inputs(1, s), lambda s: vit_inputs(3, s)]),
}
DIMS = {
    "bert": {"ids": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}},
    "vit": {"img": {0: "batch"}},
}


@pytest.fixture(scope="module", params=[(m, d) for m in MODELS for d in (True, False)], ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request):
    name, dynamo = request.param
    cls, example, _ = MODELS[name]
    torch.manual_seed(0)
    model = cls().eval()
    return name, dynamo, export(model, example(0), dynamo, DIMS[name])


def test_model_matches_onnxruntime_at_two_sizes(exported):
    name, dynamo, proto = exported
    gm = read_onnx(proto)
    assert gm.meta["opset"] == (17 if not dynamo else proto.opset_import[0].version)
    for k, make in enumerate(MODELS[name][2]):
        args = make(10 + k)
        feeds = {vi["name"]: a.numpy() for vi, a in zip(gm.meta["inputs"], args, strict=True)}
        ref = run_ort(proto, feeds)
        got = gm(*args)
        assert isinstance(got, tuple) and len(got) == len(ref)
        for r, g in zip(ref, got, strict=True):
            assert g.shape == r.shape
            np.testing.assert_allclose(g.detach().numpy(), r, **MODEL_TOL, err_msg=f"{name} dynamo={dynamo} size {k}")


def test_model_graph_contract(exported):
    """One fx node per ONNX node; Constants become buffers; names and dims carried over."""
    name, dynamo, proto = exported
    gm = read_onnx(proto)
    non_constant = [n for n in proto.graph.node if n.op_type != "Constant"]
    modules = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert len(modules) == len(non_constant)
    for node, onnx_node in zip(modules, non_constant, strict=True):
        op = gm.get_submodule(node.target)
        assert isinstance(op, OnnxOp)
        assert (op.op_type, op.onnx_name, op.output_names) == (
            onnx_node.op_type,
            onnx_node.name,
            list(onnx_node.output),
        )
        assert [a.SerializeToString() for a in op.attribute_protos] == [
            a.SerializeToString() for a in onnx_node.attribute
        ]
        assert node.meta["onnx_node"] == onnx_node.name
    constants = {n.output[0] for n in proto.graph.node if n.op_type == "Constant"}
    constants |= {t.name for t in proto.graph.initializer}
    assert set(gm.meta["constants"].values()) == constants
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            assert gm.meta["constants"][node.target] == node.meta["onnx_name"]
            assert isinstance(getattr(gm, node.target), torch.Tensor)
        elif node.op != "output" and not (
            node.op == "call_module" and len(gm.get_submodule(node.target).output_names) > 1
        ):
            assert node.meta["onnx_name"], node
    assert [n.meta["onnx_name"] for n in gm.graph.nodes if n.op == "placeholder"] == list(DIMS[name])
    first = gm.meta["inputs"][0]
    assert first["elem_type"] == (TensorProto.INT64 if name == "bert" else TensorProto.FLOAT)
    assert isinstance(first["shape"][0], str)  # the dynamic batch stays symbolic
    assert len(gm.meta["outputs"]) == 1 and gm.meta["source"] == "<ModelProto>"


# ---------------------------------------------------------------- the GraphModule contract on hand-built models


def make_model(nodes, inputs, outputs, initializers=(), opset=21, **kwargs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)


def tensor_info(name, elem_type=TensorProto.FLOAT, shape=None):
    return helper.make_tensor_value_info(name, elem_type, shape)


def contract_model() -> onnx.ModelProto:
    """Sanitized names, a Constant, an unused initializer, an empty optional input, a multi-output node."""
    nodes = [
        helper.make_node("Constant", [], ["c:half"], name="const/half", value_float=0.5),
        helper.make_node("Mul", ["in.x", "c:half"], ["scaled"], name="mul/0"),
        helper.make_node("Clip", ["scaled", "", "hi"], ["clipped"], name="clip"),
        helper.make_node("Split", ["clipped"], ["left", "right"], name="split", axis=1, num_outputs=2),
        helper.make_node("Add", ["left", "right"], ["sum"], name=""),
    ]
    inits = [
        numpy_helper.from_array(np.float32(0.7), "hi"),
        numpy_helper.from_array(np.zeros(3, np.float32), "unused.weight"),
    ]
    return make_model(
        nodes,
        [tensor_info("in.x", shape=["n", 4]), tensor_info("hi", shape=[])],
        [tensor_info("right", shape=["n", 2]), tensor_info("sum", shape=["n", 2])],
        inits,
    )


def test_graph_module_contract():
    proto = contract_model()
    gm = read_onnx(proto)
    nodes = {n.meta.get("onnx_name"): n for n in gm.graph.nodes if n.op != "output"}

    (placeholder,) = [n for n in gm.graph.nodes if n.op == "placeholder"]  # "hi" has an initializer: a default
    assert placeholder.meta["onnx_name"] == "in.x" and placeholder.target.isidentifier()
    assert gm.meta["inputs"] == [{"name": "in.x", "elem_type": TensorProto.FLOAT, "shape": ["n", 4]}]
    assert [o["name"] for o in gm.meta["outputs"]] == ["right", "sum"]
    assert gm.meta["opset"] == 21 and gm.meta["source"] == "<ModelProto>"

    half = nodes["c:half"]
    assert half.op == "get_attr" and half.meta["onnx_source"] == "Constant" and half.meta["onnx_node"] == "const/half"
    assert getattr(gm, half.target).item() == 0.5
    assert nodes["hi"].meta["onnx_source"] == "initializer"
    assert "unused.weight" in gm.meta["constants"].values()  # registered although nothing reads it
    assert not any(isinstance(m, OnnxOp) and m.op_type == "Constant" for m in gm.modules())

    clip = nodes["clipped"]
    assert clip.args[1] is None and clip.args[2] is nodes["hi"]

    split_call = nodes["left"].args[0]
    assert split_call.op == "call_module" and split_call.meta["onnx_name"] is None
    assert [(n.target, n.args[1]) for n in (nodes["left"], nodes["right"])] == [(operator.getitem, 0)] * 1 + [
        (operator.getitem, 1)
    ]
    op = gm.get_submodule(split_call.target)
    assert op.attrs == {"axis": 1, "num_outputs": 2} and op.output_names == ["left", "right"] and op.opset == 21
    assert nodes["sum"].meta["onnx_node"] == ""  # unnamed ONNX node
    assert nodes["sum"].meta["onnx_type"] == {"elem_type": TensorProto.FLOAT, "shape": ["n", 2]}

    x = np.array([[1.0, -3.0, 0.2, 2.0], [0.4, 0.1, -0.5, 9.0]], np.float32)
    ref = run_ort(proto, {"in.x": x})
    got = gm(torch.from_numpy(x))
    assert isinstance(got, tuple)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_array_equal(g.numpy(), r)
    again = copy.deepcopy(gm)(torch.from_numpy(x))  # passes deep-copy the module
    np.testing.assert_array_equal(again[1].numpy(), ref[1])


def test_single_output_is_a_tuple_and_strings_decode():
    proto = make_model(
        [helper.make_node("Gelu", ["x"], ["y"], approximate="tanh")],
        [tensor_info("x", shape=[3])],
        [tensor_info("y", shape=[3])],
    )
    gm = read_onnx(proto)
    op = next(m for m in gm.modules() if isinstance(m, OnnxOp))
    assert op.attrs == {"approximate": "tanh"}
    out = gm(torch.zeros(3))
    assert isinstance(out, tuple) and len(out) == 1


def test_reads_a_file_with_external_data(tmp_path):
    proto = contract_model()
    big = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(1, 4096), "big")
    proto.graph.initializer.append(big)
    path = tmp_path / "m.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="m.data", size_threshold=1024)
    gm = read_onnx(path)
    assert gm.meta["source"] == str(path)
    buffer = next(k for k, v in gm.meta["constants"].items() if v == "big")
    assert torch.equal(getattr(gm, buffer), torch.arange(4096, dtype=torch.float32).reshape(1, 4096))

    os.remove(tmp_path / "m.data")
    with pytest.raises(OnnxReadError, match=r"'big' \(expected in .*m\.data"):
        read_onnx(path)
    with pytest.raises(OnnxReadError, match="external files that were not loaded"):
        read_onnx(onnx.load(path, load_external_data=False))


def test_local_functions_are_inlined():
    """A node of a model-local function (as intq's own domain) reads as its body of standard ops."""
    body = [
        helper.make_node("Mul", ["a", "b"], ["t"]),
        helper.make_node("Add", ["t", "a"], ["y"]),
    ]
    fn = helper.make_function("intq", "MulAdd", ["a", "b"], ["y"], body, [helper.make_opsetid("", 21)])
    proto = make_model(
        [helper.make_node("MulAdd", ["x", "w"], ["out"], domain="intq", name="fused")],
        [tensor_info("x", TensorProto.INT32, [4]), tensor_info("w", TensorProto.INT32, [4])],
        [tensor_info("out", TensorProto.INT32, [4])],
        functions=[fn],
    )
    proto.opset_import.append(helper.make_opsetid("intq", 1))
    gm = read_onnx(proto)
    assert sorted(m.op_type for m in gm.modules() if isinstance(m, OnnxOp)) == ["Add", "Mul"]
    x, w = np.array([1, -2, 3, 2**30], np.int32), np.array([5, 6, -7, 4], np.int32)
    np.testing.assert_array_equal(
        gm(torch.from_numpy(x), torch.from_numpy(w))[0].numpy(), run_ort(proto, {"x": x, "w": w})[0]
    )


# ---------------------------------------------------------------- errors


def assert_one_paragraph(err: OnnxReadError) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)  # no chained traceback
    return text


def test_missing_file(tmp_path):
    with pytest.raises(OnnxReadError, match="does not exist") as info:
        read_onnx(tmp_path / "nope.onnx")
    assert "nope.onnx" in str(info.value)
    with pytest.raises(OnnxReadError, match="is a directory"):
        read_onnx(tmp_path)


@pytest.mark.parametrize("content", [b"\x08\x07\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01garbage", b"hello, not onnx"])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxReadError) as info:
        read_onnx(path)
    text = assert_one_paragraph(info.value)
    assert str(path) in text and "could not be parsed as ONNX" in text


def test_truncated_model_file(tmp_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(contract_model().SerializeToString()[:-7])
    with pytest.raises(OnnxReadError, match="could not be parsed as ONNX"):
        read_onnx(path)


def test_every_unsupported_op_in_one_error():
    proto = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="ok"),
            helper.make_node("FancyNorm", ["r"], ["f"], name="custom_norm", domain="com.example"),
            helper.make_node("Det", ["f"], ["d"], name="determinant"),
        ],
        [tensor_info("x", shape=[2, 2])],
        [tensor_info("d", shape=[])],
    )
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(OnnxReadError) as info:
        read_onnx(proto)
    text = assert_one_paragraph(info.value)
    assert "2 node(s)" in text
    assert "'custom_norm' (FancyNorm, domain 'com.example')" in text
    assert "'determinant' (Det, domain 'ai.onnx')" in text
    assert "'ok'" not in text
    assert "Re-export" in text and "file an issue" in text


def test_control_flow_is_unsupported():
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y_branch"])], "b", [], [tensor_info("y_branch", shape=[2])]
    )
    proto = make_model(
        [helper.make_node("If", ["c"], ["y"], name="branch", then_branch=branch, else_branch=branch)],
        [tensor_info("c", TensorProto.BOOL, []), tensor_info("x", shape=[2])],
        [tensor_info("y", shape=[2])],
    )
    with pytest.raises(OnnxReadError, match=r"'branch' \(If, domain 'ai.onnx'\).*Control flow"):
        read_onnx(proto)


@pytest.mark.parametrize("opset", [11, 22])
def test_opset_outside_13_to_21(opset):
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor_info("x", shape=[2])],
        [tensor_info("y", shape=[2])],
        opset=opset,
    )
    with pytest.raises(OnnxReadError, match=f"opset {opset}; intq reads opsets 13 to 21"):
        read_onnx(proto)


def test_nodes_out_of_topological_order():
    proto = make_model(
        [helper.make_node("Relu", ["a"], ["y"], name="second"), helper.make_node("Neg", ["x"], ["a"], name="first")],
        [tensor_info("x", shape=[2])],
        [tensor_info("y", shape=[2])],
    )
    with pytest.raises(OnnxReadError, match="'second' \\(Relu\\) reads 'a', which node 'first' produces later"):
        read_onnx(proto)


def test_checker_message_is_reported():
    proto = make_model(
        [helper.make_node("Add", ["x", "x", "x"], ["y"], name="three_inputs")],
        [tensor_info("x", shape=[2])],
        [tensor_info("y", shape=[2])],
    )
    with pytest.raises(OnnxReadError) as info:
        read_onnx(proto)
    text = assert_one_paragraph(info.value)
    assert "onnx.checker.check_model rejects the model" in text and "input size 3" in text


def test_uninitialized_value():
    proto = make_model(
        [helper.make_node("Add", ["x", "ghost"], ["y"], name="adder")],
        [tensor_info("x", shape=[2])],
        [tensor_info("y", shape=[2])],
    )
    with pytest.raises(OnnxReadError, match="'adder' \\(Add\\) reads 'ghost', which no graph input"):
        read_onnx(proto)
