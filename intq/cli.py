"""``quantize MODEL.onnx --bits 8 --calib CALIB.npz -o OUT/``

Writes, atomically (a failure leaves no OUT): ``model.int.onnx`` (integer-
only ONNX), ``manifest.json`` (inputs/outputs with quantization parameters,
layers with their bits, versions, file hashes), ``report.json`` and
``report.md`` (float vs integer fidelity on the calibration data).
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--bits", default="8", help="weight/activation bits (8)")
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
        help="compile the integer model with TVM for this target: x86 (the host CPU, default), a TVM target JSON "
        "dict, or 'none' to write only the ONNX model",
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
    if args.bits != "8":
        raise CliError(f"--bits {args.bits} is not available yet; this version writes 8-bit models (--bits 8).")
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

        resolve_target(args.target)  # an unknown target is refused before any work

    import numpy as np
    import onnx

    from intq.config import QuantConfig
    from intq.export.onnx_reader import read_onnx

    gm = read_onnx(str(model_path))  # fails early, with one message, on corrupt files or unsupported op types
    inputs = gm.meta["inputs"]
    arrays = _load_calibration(args.calib, inputs, model_path)
    batches = _batches(arrays, inputs, args.batch_size, args.max_samples)
    config = QuantConfig(bits=8, calibration=args.calibration)

    import intq

    t0 = time.perf_counter()
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
        compiled = _compile_and_check(int_model, args.target, batches, inputs, quiet=args.quiet)

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
        if compiled is not None:
            library = f"model.{compiled.name}.so"
            compiled.export(str(tmp / library))
            manifest["target"] = {"name": compiled.name, "tvm_target": compiled.target_json, "library": library}
            files.append(library)
        manifest["files"] = file_hashes(tmp, files)
        write_json(tmp / "manifest.json", manifest)
    if not args.quiet:
        cos = ", ".join(f"{o['name']}: cosine {o['cosine']:.4f}" for o in fidelity)
        print(f"wrote {out}/model.int.onnx ({len(qmodel.layers)} integer layers; {cos})")
    del np


def _compile_and_check(int_model, target: str, batches, inputs, quiet: bool):
    """Compile with TVM and check the result equals onnxruntime bit for bit on a calibration batch."""
    import numpy as np
    import onnxruntime as ort

    from intq.passes.pipeline import compile_onnx

    if not quiet:
        print(f"quantize: compiling for {target} with TVM ...", file=sys.stderr)
    compiled = compile_onnx(int_model, target)
    from intq.passes import compat

    vm = compat.VirtualMachine(compiled.executable, compat.tvm.cpu(0))
    feeds = {i["name"]: np.ascontiguousarray(batches[0][i["name"]]).astype(_np_dtype(i["elem_type"])) for i in inputs}
    got = vm["main"](*[compat.tvm.runtime.tensor(feeds[n]) for n in compiled.input_names])
    got = [got.numpy()] if hasattr(got, "numpy") else [g.numpy() for g in got]
    sess = ort.InferenceSession(int_model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)
    for name, g, w in zip([o.name for o in sess.get_outputs()], got, want, strict=True):
        if not np.array_equal(g, w):
            raise BuildMismatchError(
                f"the TVM build for {target} disagrees with onnxruntime on output {name!r} "
                f"(max difference {np.abs(g.astype(np.float64) - w).max():.3g}); this is an intq bug — nothing was "
                "written. Re-run with --target none to get the ONNX model alone, and report the model."
            )
    return compiled


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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
