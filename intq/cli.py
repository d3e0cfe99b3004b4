"""``quantize MODEL.onnx --bits 8|4|4/8 [--budget KIND=FRACTION ...] --calib CALIB.npz -o OUT/``

Writes, atomically (a failure leaves no OUT): ``model.int.onnx`` (integer-
only ONNX), ``manifest.json`` (inputs/outputs with quantization parameters,
layers with their bits, versions, file hashes), ``report.json`` and
``report.md`` (float vs integer fidelity on the calibration data).

``--bits 4/8`` chooses each conv/linear layer's width with the HAWQV3 ILP
(``intq.mixed``) under ``--budget`` (fractions of the all-INT8 cost of those
layers: ``size=``, ``bops=``, ``latency=``); the report adds each layer's
bits, sensitivity and costs and the predicted vs measured latency, and
``--debug`` writes the ILP as ``bits.lp``.  An infeasible budget exits 2
with the smallest feasible one and writes nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

EXIT_FAILURE = 1
EXIT_USAGE = 2


class BuildMismatchError(Exception):
    """The compiled artifact disagrees with onnxruntime: an intq bug; nothing is written."""


class CliError(Exception):
    """A user-facing failure: printed as one paragraph, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="quantize",
        description="Quantize a float ONNX model into an integer-only ONNX model (dyadic requantize, Shiftmax, "
        "ShiftGELU, I-LayerNorm).",
    )
    p.add_argument("model", help="float model, an .onnx file")
    p.add_argument(
        "--bits",
        default="8",
        help="weight/activation bits of the conv/linear layers: 8 (default), 4 (W4A4, the first and last "
        "weighted layers at 8 bits), or 4/8 (mixed: each layer's width chosen by the HAWQV3 ILP under --budget)",
    )
    p.add_argument(
        "--budget",
        action="append",
        metavar="KIND=FRACTION",
        help="with --bits 4/8: a cost limit as a fraction of the all-INT8 cost of the conv/linear layers: size= "
        "(weight and bias bytes), bops= (bit operations), latency= (their kernels timed on --target); "
        "comma-combinable or repeated, e.g. --budget latency=0.9,size=0.6",
    )
    p.add_argument(
        "--hutchinson-samples",
        type=_positive_int,
        default=100,
        help="with --bits 4/8: the most Hutchinson draws per Hessian trace (100)",
    )
    p.add_argument(
        "--timing-repeats",
        type=_positive_int,
        default=20,
        help="with --bits 4/8: timed repeats per kernel, the median is kept (20)",
    )
    p.add_argument("--debug", action="store_true", help="with --bits 4/8: also write the ILP as OUT/bits.lp")
    p.add_argument(
        "--calib",
        help="calibration data: an .npz whose arrays are keyed by the model's input names (first axis = samples); "
        "'random' calibrates on random data, deliberately",
    )
    p.add_argument("-o", "--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument(
        "--calibration",
        default="percentile",
        choices=["minmax", "percentile", "mse"],
        help="range estimator (percentile)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=16, help="calibration batch size (16)")
    p.add_argument(
        "--max-samples", type=_positive_int, default=512, help="use at most this many calibration samples (512)"
    )
    p.add_argument(
        "--target",
        default="x86",
        help="compile the integer model with TVM for this target: x86 (the host CPU, default), arm (aarch64 Linux "
        "with the dot-product extension, cross-compiled and checked under qemu; install with .ci/setup_arm.sh), cuda "
        '(an NVIDIA GPU, sm_80 unless given as \'{"kind": "cuda", "arch": "sm_90"}\'; checked only where a GPU '
        "is), a TVM target JSON dict, or 'none' to write only the ONNX model",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors and --help: return the status, as for every other outcome
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        run(args)
    except CliError as e:
        print(f"quantize: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:  # our user-facing errors subclass ValueError
        print(f"quantize: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FileExistsError as e:
        print(f"quantize: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BuildMismatchError as e:
        print(f"quantize: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:  # disk full, permission denied: the environment, not a bug; OUT was not written
        print(
            f"quantize: error: {e}. {args.out} was not written; check free disk space and permissions, then run again.",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return 0


def run(args) -> None:
    model_path = Path(args.model)
    if not model_path.is_file():
        what = "is a folder, not an .onnx file" if model_path.is_dir() else "does not exist"
        raise CliError(f"The model file {model_path} {what}.")
    if args.bits not in ("8", "4", "4/8"):
        raise CliError(
            f"--bits {args.bits} is not supported; use --bits 8, --bits 4 (4-bit weights and activations, the "
            "first and last weighted layers at 8 bits), or --bits 4/8 with a --budget (mixed precision)."
        )
    budget = _parse_budget(args.budget or [])
    if args.bits == "4/8" and not budget:
        raise CliError(
            "--bits 4/8 chooses each layer's width under a cost budget, and none was given; add e.g. --budget "
            "latency=0.9 or --budget size=0.6 (fractions of the all-INT8 cost: size=, bops=, latency=)."
        )
    if budget and args.bits != "4/8":
        raise CliError(
            f"--budget applies to mixed precision (--bits 4/8), but --bits {args.bits} gives every layer a fixed "
            "width; drop --budget, or use --bits 4/8."
        )
    if args.debug and args.bits != "4/8":
        raise CliError("--debug writes the bit-width ILP, which only --bits 4/8 solves; drop --debug.")
    if args.calib is None:
        raise CliError(
            "No calibration data: pass --calib CALIB.npz with arrays keyed by the model's input names (first axis = "
            "samples). Random data calibrates activation ranges badly; if you want it anyway, say --calib random."
        )
    out = Path(args.out)
    if out.exists() and not args.force:
        raise CliError(f"The output folder {out} already exists; choose another -o or pass --force to replace it.")

    if args.target != "none":
        from intq.passes.targets import resolve_target

        spec = resolve_target(args.target)  # an unknown target is refused before any work
        if not spec.runs_here:
            _require_remote_runner(spec)  # as is a target whose check cannot run here
    if "latency" in budget and (args.target == "none" or not spec.runs_here):
        where = "--target none compiles nothing" if args.target == "none" else f"{spec.name!r} does not run here"
        raise CliError(
            f"--budget latency= needs each layer's kernel timed on the target, but {where}; use a size= or bops= "
            "budget, or time the layers on the device through an RPC tracker with the Python API "
            "(intq.mixed.plan_mixed_precision(..., remote=RemoteSpec(...)))."
        )

    import numpy as np
    import onnx

    from intq.config import QuantConfig
    from intq.export.onnx_reader import read_onnx

    # fails early, with one message, on corrupt files or op types that simplification does not remove
    gm = read_onnx(str(model_path), simplify=True)
    inputs = gm.meta["inputs"]
    arrays = _load_calibration(args.calib, inputs, model_path)
    batches = _batches(arrays, inputs, args.batch_size, args.max_samples)
    config = QuantConfig(bits=8 if args.bits == "4/8" else int(args.bits), calibration=args.calibration)

    import intq

    t0 = time.perf_counter()
    plan = lp_file = None
    if args.bits == "4/8":
        plan, lp_file = _plan_mixed(args, model_path, batches, config, budget)
        qmodel, config = plan.qmodel, plan.config
    else:
        qmodel = intq.quantize(str(model_path), batches, config, progress=not args.quiet)
    from intq.export.artifact import atomic_dir, file_hashes, versions, write_json
    from intq.export.report import layer_errors
    from intq.export.verify import verify_integer_only

    int_model = qmodel.to_onnx()
    onnx.checker.check_model(int_model, full_check=False)
    verify_integer_only(int_model)
    seconds = time.perf_counter() - t0

    compiled = None
    if args.target != "none":
        compiled, check = _compile_and_check(int_model, args.target, batches, inputs, quiet=args.quiet)
    mixed = None
    if plan is not None:
        measured = None
        if compiled is not None and compiled.spec.runs_here and plan.predicted_latency_s is not None:
            measured = _measure_latency(int_model, args.target, qmodel, args.timing_repeats, args.quiet)
        mixed = plan.report(measured)

    fidelity = _fidelity(model_path, int_model, batches, qmodel)
    layers = layer_errors(qmodel.float_graph, qmodel, _torch_batch(batches[0], inputs))
    with atomic_dir(out, overwrite=args.force) as tmp:
        onnx.save(int_model, tmp / "model.int.onnx")
        report = {
            "model": str(model_path),
            "config": json_config(config),
            "calibration": {
                "source": str(args.calib),
                "samples": int(sum(len(next(iter(b.values()))) for b in batches)),
            },
            "quantize_seconds": round(seconds, 2),
            "outputs": fidelity,
            "layers": layers,
        }
        if mixed is not None:
            report["mixed_precision"] = mixed
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(_report_md(report))
        manifest = {
            "format": "intq-artifact/1",
            "inputs": [_input_entry(i, qmodel) for i in inputs],
            "outputs": qmodel.outputs,
            "layers": [
                {"name": r.name, "op": r.op, "source": r.source, "bits": r.bits, "out_scale": _num(r.out_scale)}
                for r in qmodel.layers
            ],
            "config": json_config(config),
            "target": None,
            "versions": versions(),
        }
        files = ["model.int.onnx", "report.json", "report.md"]
        if mixed is not None:
            manifest["mixed_precision"] = {"budget": mixed["budget"], "cost_fractions": mixed["cost_fractions"]}
        if lp_file is not None:
            (tmp / "bits.lp").write_text(lp_file)
            files.append("bits.lp")
        if compiled is not None:
            library = f"model.{compiled.name}.so"
            compiled.export(str(tmp / library))
            manifest["target"] = {
                "name": compiled.name,
                "tvm_target": compiled.target_json,
                "library": library,
                "check": check,
            }
            files.append(library)
        manifest["files"] = file_hashes(tmp, files)
        write_json(tmp / "manifest.json", manifest)
    if not args.quiet:
        cos = ", ".join(f"{o['name']}: cosine {o['cosine']:.4f}" for o in fidelity)
        print(f"wrote {out}/model.int.onnx ({len(qmodel.layers)} integer layers; {cos})")
    del np


def _parse_budget(items: list[str]) -> dict[str, float]:
    """``--budget`` values (``KIND=FRACTION``, comma-combinable, repeatable) as ``{kind: fraction}``."""
    kinds = ("size", "bops", "latency")
    budget: dict[str, float] = {}
    for item in items:
        for part in item.split(","):
            kind, sep, value = part.strip().partition("=")
            kind = kind.strip().lower()
            if not sep or kind not in kinds:
                raise CliError(
                    f"--budget {part.strip()!r} is not KIND=FRACTION with KIND one of size, bops, latency; "
                    "e.g. --budget latency=0.9,size=0.6."
                )
            try:
                fraction = float(value)
            except ValueError:
                fraction = math.nan
            if not (math.isfinite(fraction) and fraction > 0):
                raise CliError(
                    f"--budget {kind}={value.strip()!r}: give a positive fraction of the all-INT8 {kind}, e.g. "
                    f"{kind}=0.7."
                )
            if kind in budget and budget[kind] != fraction:
                raise CliError(f"--budget gives {kind} twice ({budget[kind]:g} and {fraction:g}); keep one.")
            budget[kind] = fraction
    return budget


def _plan_mixed(args, model_path, batches, config, budget):
    """The HAWQV3 widths for ``budget`` (``intq.mixed``) and, with ``--debug``, the ILP's LP file text."""
    import tempfile

    from intq.mixed import plan_mixed_precision

    target = None if args.target == "none" else args.target
    with tempfile.TemporaryDirectory(prefix="intq-ilp-") as tmp:
        lp_path = Path(tmp) / "bits.lp" if args.debug else None
        plan = plan_mixed_precision(
            str(model_path),
            batches,
            budget,
            target=target,
            config=config,
            debug_lp_path=lp_path,
            measure_latency="latency" in budget or (target is not None and _runs_here(target)),
            repeats=args.timing_repeats,
            hutchinson_samples=args.hutchinson_samples,
            progress=not args.quiet,
        )
        lp_text = lp_path.read_text() if lp_path is not None else None
    if not args.quiet:
        chosen = sum(1 for b in plan.layer_bits.values() if b == 4)
        fractions = ", ".join(f"{k} {v:.3f}" for k, v in plan.cost_fractions.items())
        print(
            f"quantize: mixed precision: {chosen} of {len(plan.layer_bits)} weighted layers at 4 bits "
            f"(of all-INT8: {fractions})",
            file=sys.stderr,
        )
    return plan, lp_text


def _runs_here(target: str) -> bool:
    from intq.passes.targets import resolve_target

    return resolve_target(target).runs_here


def _measure_latency(int_model, target: str, qmodel, repeats: int, quiet: bool) -> float:
    """The whole integer model's median seconds on the target (``ilp.costs.measure_model_latency``), on the
    example batch's shapes, as the cost table timed the 8-bit model."""
    from intq.ilp.costs import measure_model_latency

    if not quiet:
        print(f"quantize: timing the chosen model on {target} ...", file=sys.stderr)
    inputs = {name: t.numpy() for name, t in zip(qmodel.input_names, qmodel.example, strict=True)}
    return measure_model_latency(int_model, target, inputs=inputs, repeats=repeats)


def _compile_and_check(int_model, target: str, batches, inputs, quiet: bool):
    """Compile with TVM and check the result equals onnxruntime bit for bit on a calibration batch.

    Returns the compiled model and the manifest's record of the check.  The
    check runs where the target runs: in this process (x86; cuda on a machine
    with a GPU), or through ``_run_remote`` (arm, under qemu).  A cuda build
    on a machine without a GPU is written unchecked, and the record says so.
    """
    import numpy as np
    import onnxruntime as ort

    from intq.passes.pipeline import compile_onnx

    if not quiet:
        print(f"quantize: compiling for {target} with TVM ...", file=sys.stderr)
    compiled = compile_onnx(int_model, target)
    from intq.passes import compat

    feeds = {i["name"]: np.ascontiguousarray(batches[0][i["name"]]).astype(_np_dtype(i["elem_type"])) for i in inputs}
    if compiled.spec.runs_here:
        device = compat.vm_device(compiled.target)
        vm = compat.VirtualMachine(compiled.executable, device)
        got = vm["main"](*[compat.tvm.runtime.tensor(feeds[n], device) for n in compiled.input_names])
        got = [got.numpy()] if hasattr(got, "numpy") else [g.numpy() for g in got]
        ran_on = str(device)
    elif compiled.name == "cuda":
        from intq.passes.targets import cuda_device_code

        reason = (
            "no CUDA device on this machine, so the bit-exact check against onnxruntime could not run; run "
            "`quantize ... --target cuda` on a machine with a GPU to build and check it there"
        )
        if cuda_device_code(compiled.executable) == "source":
            reason += " (TVM's CUDA runtime is not loaded here, so the library holds the kernels as CUDA source, "
            reason += "not a cubin: rebuild it on the GPU machine to run it there)"
        if not quiet:
            print(f"quantize: warning: {reason}.", file=sys.stderr)
        return compiled, {"ran": False, "reason": reason}
    else:
        import dataclasses

        got, library = _run_remote(compiled, [feeds[n] for n in compiled.input_names], quiet)
        # the artifact gets the very library that was checked (no second link)
        compiled = dataclasses.replace(compiled, spec=dataclasses.replace(compiled.spec, export=_writer(library)))
        ran_on = "qemu-aarch64 -cpu max"
    sess = ort.InferenceSession(int_model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)
    for name, g, w in zip([o.name for o in sess.get_outputs()], got, want, strict=True):
        if not np.array_equal(g, w):
            raise BuildMismatchError(
                f"the TVM build for {target} disagrees with onnxruntime on output {name!r} "
                f"(max difference {np.abs(g.astype(np.float64) - w).max():.3g}); this is an intq bug — nothing was "
                "written. Re-run with --target none to get the ONNX model alone, and report the model."
            )
    return compiled, {"ran": True, "result": "bit-exact with onnxruntime", "ran_on": ran_on}


def _require_remote_runner(spec) -> None:
    """Refuse, before any work, a target whose artifact cannot be checked on this machine.

    cuda is not refused: without a GPU the artifact is written unchecked (``_compile_and_check``).
    """
    if spec.name == "cuda":
        return
    if spec.name == "arm":
        from intq.passes import arm

        try:
            arm.require_toolchain()
        except arm.ArmToolchainError as e:
            raise CliError(f"--target arm: {e}") from None
        return
    raise CliError(
        f"the artifact of target {spec.name!r} cannot be run on this machine to check it against onnxruntime."
    )


def _run_remote(compiled, arrays, quiet: bool) -> tuple[list, bytes]:
    """The outputs of the compiled model on ``arrays``, run where the target runs (arm: under qemu), and the
    library that ran."""
    import tempfile

    if compiled.name != "arm":
        raise CliError(f"no way to run the {compiled.name!r} artifact here to check it against onnxruntime.")
    from intq.passes import arm

    if not quiet:
        print("quantize: checking the aarch64 library under qemu-aarch64 ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="intq-arm-") as tmp:
        library = str(Path(tmp) / "model.arm.so")
        try:
            compiled.export(library)
            return arm.run_under_qemu(library, arrays), Path(library).read_bytes()
        except arm.ArmToolchainError as e:
            raise CliError(f"--target arm: {e}") from None


def _writer(library: bytes):
    """A ``TargetSpec.export`` that writes ``library`` as it is."""

    def export(_executable, path: str) -> None:
        Path(path).write_bytes(library)

    return export


def json_config(config) -> dict:
    import json

    return json.loads(config.to_json())


def _num(v):
    import numpy as np

    if v is None:
        return None
    a = np.asarray(v, dtype=np.float64)
    return float(a) if a.size == 1 else a.tolist()


def _input_entry(info, qmodel) -> dict:
    from onnx import TensorProto

    entry = {
        "name": info["name"],
        "dtype": TensorProto.DataType.Name(info["elem_type"]).lower(),
        "shape": info["shape"],
    }
    for rec in qmodel.layers:
        if rec.op == "Quantize" and rec.source == info["name"]:
            entry["quantization"] = {"scale": float(rec.out_scale), "zero_point": 0, "dtype": "int8"}
    return entry


def _load_calibration(spec: str, inputs, model_path) -> dict:
    import numpy as np

    if spec == "random":
        rng = np.random.default_rng(0)
        out = {}
        for info in inputs:
            shape = [d if isinstance(d, int) else (8 if k == 0 else 16) for k, d in enumerate(info["shape"] or [8])]
            dtype = np.dtype(_np_dtype(info["elem_type"]))
            out[info["name"]] = (
                rng.standard_normal(shape).astype(dtype)
                if dtype.kind == "f"
                else rng.integers(0, 100, shape).astype(dtype)
            )
        return out
    path = Path(spec)
    if not path.is_file():
        raise CliError(f"The calibration file {path} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile/ValueError/OSError: all mean "not an npz we can read"
        raise CliError(
            f"The calibration file {path} is not a readable .npz archive ({type(e).__name__}: {e})."
        ) from None
    names = [i["name"] for i in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise CliError(
            f"The calibration file {path} has no array for model input(s) {missing} of {model_path.name}; it has "
            f"{sorted(arrays)}. Name the arrays after the model's inputs: {names}."
        )
    extra = sorted(set(arrays) - set(names))
    if extra:
        print(f"quantize: note: ignoring arrays {extra} in {path.name} (not model inputs)", file=sys.stderr)
    sizes = {n: len(arrays[n]) for n in names}
    if len(set(sizes.values())) != 1:
        raise CliError(f"The calibration arrays have different numbers of samples: {sizes}.")
    if next(iter(sizes.values())) == 0:
        raise CliError(f"The calibration file {path} holds zero samples; intq needs representative inputs.")
    for n in names:
        a = arrays[n]
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise CliError(
                f"The calibration array {n!r} in {path.name} has {int((~np.isfinite(a)).sum())} NaN/Inf value(s); "
                "remove or repair those samples."
            )
    return {n: arrays[n] for n in names}


def _np_dtype(elem_type):
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(elem_type)


def _batches(arrays: dict, inputs, batch_size: int, max_samples: int) -> list[dict]:
    n = min(len(next(iter(arrays.values()))), max_samples)
    out = []
    for start in range(0, n, batch_size):
        out.append({k: v[start : min(start + batch_size, n)] for k, v in arrays.items()})
    return out


def _torch_batch(batch: dict, inputs) -> tuple:
    import numpy as np
    import torch

    return tuple(
        torch.as_tensor(np.ascontiguousarray(batch[i["name"]]).astype(_np_dtype(i["elem_type"]))) for i in inputs
    )


def _fidelity(model_path, int_model, batches, qmodel) -> list[dict]:
    """Float ONNX (onnxruntime) vs integer ONNX (onnxruntime) on up to 4 calibration batches."""
    import numpy as np
    import onnxruntime as ort

    from intq.export.report import compare

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    f_sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    i_sess = ort.InferenceSession(int_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    refs, gots = [], []
    for batch in batches[:4]:
        feeds = {
            i.name: np.ascontiguousarray(batch[i.name]).astype(_np_dtype(info["elem_type"]))
            for i, info in zip(f_sess.get_inputs(), qmodel.inputs, strict=False)
        }
        refs.append(f_sess.run(None, feeds))
        gots.append(i_sess.run(None, feeds))
    rows = []
    for k, name in enumerate(qmodel.output_names):
        ref = np.concatenate([r[k].reshape(-1) for r in refs])
        got = np.concatenate([g[k].reshape(-1) for g in gots])
        rows.append({"name": name, **compare(ref, got)})
    return rows


def _report_md(report: dict) -> str:
    lines = [f"# intq report: {report['model']}", "", f"Config: `{report['config']}`", ""]
    lines += [f"Calibration: {report['calibration']['samples']} samples from `{report['calibration']['source']}`.", ""]
    lines += ["## Outputs (float ONNX vs integer ONNX, onnxruntime, calibration data)", ""]
    lines += ["| output | cosine | max abs err | mean abs err | SQNR dB |", "|---|---|---|---|---|"]
    for o in report["outputs"]:
        lines.append(
            f"| {o['name']} | {o['cosine']:.5f} | {o['max_abs_error']:.4g} | {o['mean_abs_error']:.4g} "
            f"| {o['sqnr_db']:.1f} |"
        )
    lines += ["", "## Layers (dequantized integer output vs float, first calibration batch)", ""]
    lines += ["| layer | op | bits | cosine | SQNR dB |", "|---|---|---|---|---|"]
    for r in report["layers"]:
        lines.append(f"| {r['layer']} | {r['op']} | {r['bits']} | {r['cosine']:.5f} | {r['sqnr_db']:.1f} |")
    if "mixed_precision" in report:
        from intq.mixed import report_markdown

        lines += ["", *report_markdown(report["mixed_precision"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
