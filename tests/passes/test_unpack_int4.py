"""Packed 4-bit weights: ``INT4 initializer -> Cast(INT8)`` becomes ``UnpackInt4`` and runs at run time, exactly.

Hand-built ONNX models check the import rewrite and the kernel on every
nibble value and an odd element count (a pad nibble); the ops the quantizer
writes with ``weight_bits=4`` (``packed_int4``) check the path through the
x86 schedules: the GEMMs of the dense conv and of the linear keep their
packed weights 4-bit, the depthwise conv reads ``UnpackInt4``'s output.  Everything is
compared with onnxruntime (which runs ``Cast`` from INT4) bit for bit, and
the compiled executable's constant pool must hold the packed bytes, never
the int8 weights.  The CPU schedule of the kernel (``schedules/unpack.py``):
bit-exact on sizes through its parallel tasks, remainder and pad nibble, its
loop structure, and LLVM's vector loads and stores of it; a CUDA build binds
the kernel to threads, and aarch64 runs it under qemu.
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from intq.passes import compat
from intq.passes.build import build, run
from intq.passes.onnx_import import OnnxImportError, import_onnx, unpack_int4_initializers
from intq.passes.ops.base import OP_ATTR
from intq.passes.ops.unpack_int4 import pack_int4, unpack_int4, unpack_int4_te
from intq.passes.pipeline import compile_onnx
from intq.passes.schedules import SCHEDULE_ATTR, ScheduleKernels
from intq.passes.schedules.conv import Layout, pack_conv_weight, plan_tiles
from intq.passes.schedules.gemm import Tiles, pack_weight
from intq.passes.schedules.unpack import CHUNK_BYTES, schedule_unpack_int4
from intq.quantizer.ops.conv import IntConv2d
from intq.quantizer.ops.linear import IntLinear
from intq.quantizer.ops.onnx_fn import single_op_model

TARGET = {"kind": "llvm", "mcpu": "znver3"}

pytestmark = pytest.mark.filterwarnings(
    "ignore:Field 'shape' of 'type' is required:UserWarning",
    "ignore:Renaming name:UserWarning",
)


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def tensor_constants(executable) -> list[str]:
    """The shapes of the tensor constants in a VM executable's constant pool, as it prints them (``[18]``)."""
    pool = re.search(r"Constant pool \(# \d+\): \[(.*)\]\n", executable.stats()).group(1)
    return re.findall(r"(?<![\w\"])\[[\d, ]+\]", pool)


def unpack_schedules(mod) -> list[str]:
    """The schedule applied to each ``UnpackInt4`` kernel of ``mod`` (``-`` for an unscheduled one)."""
    kernels = [f for f in mod.functions.values() if isinstance(f, compat.tirx.PrimFunc) and f.attrs]
    return [str(f.attrs.get(SCHEDULE_ATTR, "-")) for f in kernels if f.attrs.get(OP_ATTR) == "UnpackInt4"]


def int4_add_model(values: np.ndarray) -> onnx.ModelProto:
    """``y = x + Cast(w.int4 -> int8)``, the weight an INT4 initializer as the quantizer's writer stores it."""
    shape = list(values.shape)
    init = numpy_helper.from_array(values.astype(ml_dtypes.int4), "w.int4")
    nodes = [
        helper.make_node("Cast", ["w.int4"], ["w"], name="w.unpack", to=TensorProto.INT8),
        helper.make_node("Add", ["x", "w"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "int4",
        [helper.make_tensor_value_info("x", TensorProto.INT8, shape)],
        [helper.make_tensor_value_info("y", TensorProto.INT8, shape)],
        initializer=[init],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_packing_is_the_onnx_int4_layout():
    values = np.arange(-8, 7)  # odd count: the last byte's high nibble is padding
    stored = numpy_helper.from_array(values.astype(ml_dtypes.int4), "w")
    assert pack_int4(values).tobytes() == stored.raw_data == bytes.fromhex("98badcfe10325406")
    np.testing.assert_array_equal(unpack_int4(pack_int4(values), (15,)), values)


def test_import_rewrites_the_cast_into_unpack_int4():
    model = int4_add_model(np.resize(np.arange(-8, 8), (5, 7)))
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    assert unpack_int4_initializers(prepared) == 1
    (unpack, add) = prepared.graph.node
    assert (unpack.domain, unpack.op_type, list(unpack.input), list(unpack.output)) == (
        "intq",
        "UnpackInt4",
        ["w.int4.packed"],
        ["w"],
    )
    assert helper.get_attribute_value(unpack.attribute[0]) == [5, 7]
    (init,) = prepared.graph.initializer
    assert init.data_type == TensorProto.UINT8 and list(init.dims) == [18]
    assert add.op_type == "Add"


@pytest.mark.parametrize("shape", [(16,), (5, 7), (3, 2, 3, 3)])
def test_every_nibble_value_and_odd_sizes_equal_onnxruntime(shape):
    rng = np.random.default_rng(len(shape))
    values = rng.integers(-8, 7, size=shape, endpoint=True)
    values.reshape(-1)[:16] = np.arange(-8, 8)[: values.size]
    model = int4_add_model(values)
    x = rng.integers(-100, 100, size=shape).astype(np.int8)
    want = ort_run(model, {"x": x})
    np.testing.assert_array_equal(want, x + values)
    (got,) = run(build(import_onnx(model)), {"x": x})
    np.testing.assert_array_equal(got, want)


def test_the_executable_stores_the_packed_bytes():
    model = int4_add_model(np.resize(np.arange(-8, 8), (5, 7)))
    executable = compat.build(import_onnx(model), compat.make_target(TARGET))
    assert tensor_constants(executable) == ["[18]"]  # 35 nibbles; no [5, 7] int8 weight (FoldConstant kept off it)


# --- the CPU schedule of the kernel (schedules/unpack.py) ----------------------------------------------------


def scheduled_unpack(n: int) -> compat.tirx.PrimFunc:
    packed = compat.te.placeholder(((n + 1) // 2,), "uint8", name="packed")
    sch = compat.s_tir.Schedule(compat.te.create_prim_func([packed, unpack_int4_te(packed, n)]))
    schedule_unpack_int4(sch)
    return sch.mod["main"]


# (2, 131075): two parallel tasks of CHUNK_BYTES and 3 bytes after them; (3, 87383) the same, odd (a pad nibble)
@pytest.mark.parametrize("shape", [(1,), (3,), (16,), (5, 7), (2, 131075), (3, 87383)])
def test_scheduled_kernel_equals_onnxruntime(shape):
    rng = np.random.default_rng(sum(shape))
    values = rng.integers(-8, 7, size=shape, endpoint=True)
    values.reshape(-1)[:16] = np.arange(-8, 8)[: values.size]
    model = int4_add_model(values)
    schedule = ScheduleKernels(compat.make_target(TARGET))
    mod = schedule(import_onnx(model))
    assert schedule.scheduled == {"intq_unpack_int4": "unpack"} and unpack_schedules(mod) == ["schedule_unpack_int4"]
    x = rng.integers(-100, 100, size=shape).astype(np.int8)
    want = ort_run(model, {"x": x})
    np.testing.assert_array_equal(want, x + values)
    (got,) = run(build(mod, TARGET), {"x": x})
    np.testing.assert_array_equal(got, want)


def test_schedule_reads_each_byte_once_in_parallel_tasks_and_partitions_the_rest():
    n = 4 * CHUNK_BYTES + 2 * 37 + 1  # 2 tasks, 37 more whole bytes, a byte holding the last element only
    script = scheduled_unpack(n).script()
    assert re.findall(r"T\.parallel\(T\.int64\((\d+)\)\)", script) == ["2"], script
    byte_loops = re.findall(r"in range\(T\.int64\((\d+)\), T\.int64\((\d+)\)\)", script)
    whole = 2 * CHUNK_BYTES
    assert byte_loops == [(str(whole), str(whole + 37)), (str(whole + 37), str(whole + 38))], script
    assert script.count("T.unroll(T.int64(2))") == 3, script  # both nibbles of a byte in one iteration, every part
    small = scheduled_unpack(35).script()
    assert "T.parallel" not in small and small.count("T.unroll(T.int64(2))") == 2, small  # 17 bytes, then 1


@pytest.mark.parametrize("n", [4096, 4 * CHUNK_BYTES])  # serial; four parallel tasks and nothing else
def test_llvm_vectorizes_the_scheduled_byte_loop(n):
    # x86-64-v3 (AVX2): the packed bytes loaded a 32-byte register at a time, no lane extracted (a gather), and the
    # nibbles stored interleaved.  Indexed with >> 1 and & 1 instead of // 2 and % 2, the parallel tasks' loop
    # reads p[(2k + j) >> 1] byte by byte: no vector load, 28 extractelements
    target = compat.make_target({"kind": "llvm", "mcpu": "x86-64-v3"})
    func = scheduled_unpack(n).with_attr("global_symbol", "main")
    ll = compat.tvm.compile(compat.tvm.IRModule({"main": func}), target=target).mod.inspect_source("ll")
    loads = [int(w) for w in re.findall(r"load <(\d+) x i8>", ll)]
    stores = [int(w) for w in re.findall(r"store <(\d+) x i8>", ll)]
    assert loads and min(loads) >= 32 and stores and min(stores) >= 32, (loads, stores)
    assert "extractelement" not in ll


def test_int4_read_other_than_by_a_cast_to_int8_is_refused():
    model = int4_add_model(np.zeros((2, 3), np.int64))
    model.graph.node[0].attribute[0].i = TensorProto.INT32
    with pytest.raises(OnnxImportError, match=r"'w\.int4' \(read by 'w\.unpack'\) are read other than by a Cast"):
        import_onnx(model)


# --- the quantizer's 4-bit ops through the schedules -------------------------------------------------------


def int4_weights(rng, shape) -> np.ndarray:
    w = rng.integers(-8, 7, size=shape, endpoint=True)
    w.reshape(-1)[:16] = np.arange(-8, 8)
    return w.astype(np.int8)


def compile_and_compare(op, model: onnx.ModelProto, x: np.ndarray) -> list[str]:
    """compile_onnx == onnxruntime == torch on ``x``; the executable's tensor constants."""
    compiled = compile_onnx(model, TARGET)
    vm = compat.VirtualMachine(compiled.executable, compat.tvm.cpu(0))
    got = vm["main"](compat.tvm.runtime.tensor(x)).numpy()
    want = ort_run(model, {"x": x})
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(op(torch.from_numpy(x)).numpy(), want)
    return tensor_constants(compiled.executable)


def test_dense_conv_keeps_its_gemm_weight_packed_4_bit():
    rng = np.random.default_rng(4)
    w = int4_weights(rng, (8, 6, 3, 3))
    op = IntConv2d(w, rng.integers(-50, 50, 8), np.geomspace(1e-3, 4e-2, 8), padding=1, weight_bits=4)
    model = single_op_model(op, [np.zeros((2, 6, 7, 7), np.int8)])
    assert [t.data_type for t in model.graph.initializer][0] == TensorProto.INT4
    schedule = ScheduleKernels(compat.make_target(TARGET))
    scheduled = schedule(import_onnx(model))
    assert schedule.scheduled["intq_conv2d"] == "conv" and schedule.skipped == {}
    assert unpack_schedules(scheduled) == ["schedule_unpack_int4"]  # the GEMM layout's own, scheduled by unpack.py
    constants = compile_and_compare(op, model, rng.integers(-128, 127, (2, 6, 7, 7), endpoint=True).astype(np.int8))
    packed = pack_conv_weight(w, Layout.choose(6, 3, 3, 1), plan_tiles(8))  # [1, 6, 3, 1, 8, 4]: 576 nibbles
    assert f"[{packed.size // 2}]" in constants, constants
    unpacked = {f"[{', '.join(map(str, packed.shape))}]", "[8, 6, 3, 3]"}
    assert not (unpacked | {"[216]"}) & set(constants), constants  # nor the file's own bytes, now dead


def test_depthwise_conv_unpacks_at_run_time():
    rng = np.random.default_rng(5)
    w = int4_weights(rng, (16, 1, 3, 3))
    op = IntConv2d(w, rng.integers(-50, 50, 16), np.full(16, 2e-2), padding=1, groups=16, weight_bits=4)
    model = single_op_model(op, [np.zeros((1, 16, 6, 6), np.int8)])
    constants = compile_and_compare(op, model, rng.integers(-128, 127, (1, 16, 6, 6), endpoint=True).astype(np.int8))
    assert "[72]" in constants and "[16, 1, 3, 3]" not in constants, constants


def test_linear_keeps_its_gemm_weight_packed_4_bit():
    rng = np.random.default_rng(6)
    w = int4_weights(rng, (20, 40))
    op = IntLinear(w, rng.integers(-50, 50, 20), np.full(20, 1e-2), weight_bits=4)
    model = single_op_model(op, [np.zeros((3, 40), np.int8)])
    schedule = ScheduleKernels(compat.make_target(TARGET))
    scheduled = schedule(import_onnx(model))
    assert schedule.scheduled["intq_intlinear"] == "gemm" and schedule.skipped == {}
    assert unpack_schedules(scheduled) == ["schedule_unpack_int4"]
    constants = compile_and_compare(op, model, rng.integers(-128, 127, (3, 40), endpoint=True).astype(np.int8))
    packed = pack_weight(w, Tiles())
    assert f"[{packed.size // 2}]" in constants, constants
    assert not {f"[{', '.join(map(str, packed.shape))}]", "[20, 40]", "[400]"} & set(constants), constants


# --- other targets: the GPU keeps its fallback, aarch64 takes the CPU schedule -------------------------------


def test_cuda_binds_the_unpack_kernel_to_threads():
    import tvm_ffi

    from intq.passes.targets import resolve_target

    target = resolve_target("cuda").target
    model = int4_add_model(np.resize(np.arange(-8, 8), (5, 7)))  # odd: the pad nibble
    schedule = ScheduleKernels(target)
    mod = schedule(import_onnx(model))
    assert schedule.scheduled == {"intq_unpack_int4": "cuda_rows"} and schedule.skipped == {}  # the fallback
    (kernel,) = [f for f in mod.functions.values() if isinstance(f, compat.tirx.PrimFunc)]
    loops: list = []
    tvm_ffi.structural_walk(kernel.body, (compat.tirx.For, loops.append))
    assert any(loop.kind == compat.tirx.ForKind.THREAD_BINDING for loop in loops), kernel.script()
    assert not any(loop.kind == compat.tirx.ForKind.PARALLEL for loop in loops), kernel.script()
    executable = compat.build(mod, target)  # no GPU needed: compiles for sm_80
    modules, sources = [executable.mod], []
    while modules:
        module = modules.pop()
        sources += [module.inspect_source()] if module.kind == "cuda" else []
        modules.extend(module.imports)
    assert len(sources) == 1 and "intq_unpack_int4_kernel" in sources[0], sources


def test_arm_unpacks_equal_onnxruntime_under_qemu(tmp_path):
    from intq.passes import arm
    from intq.passes.targets import resolve_target

    try:
        arm.require_toolchain()
    except arm.ArmToolchainError as e:
        pytest.fail(f"{e}", pytrace=False)
    rng = np.random.default_rng(8)
    values = int4_weights(rng, (3, 87383))  # two parallel tasks, 2 whole bytes after them, a pad nibble
    dw = IntConv2d(
        int4_weights(rng, (16, 1, 3, 3)),
        rng.integers(-50, 50, 16),
        np.full(16, 2e-2),
        padding=1,
        groups=16,
        weight_bits=4,
    )
    cases = [
        ("add", int4_add_model(values), rng.integers(-100, 100, size=values.shape).astype(np.int8)),
        (
            "dwconv",
            single_op_model(dw, [np.zeros((1, 16, 6, 6), np.int8)]),
            rng.integers(-128, 127, (1, 16, 6, 6), endpoint=True).astype(np.int8),
        ),
    ]
    for name, model, x in cases:
        schedule = ScheduleKernels(resolve_target("arm").target)
        assert "schedule_unpack_int4" in unpack_schedules(schedule(import_onnx(model))), name
        compiled = compile_onnx(model, "arm")
        library = tmp_path / f"{name}.arm.so"
        compiled.export(str(library))
        (got,) = arm.run_under_qemu(library, [x], threads=2)
        np.testing.assert_array_equal(got, ort_run(model, {"x": x}), err_msg=name)
