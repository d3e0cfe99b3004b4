"""The corpus of real exports (``intq.models.corpus``) through ``quantize``: a table of what works and how well.

For each model x exporter: does ``quantize model.onnx --calib calib.npz -o OUT`` succeed (the first line of
its error if not), is the result integer-only (``export/verify.py``), does the TVM artifact equal
onnxruntime on the integer ONNX on the held-out inputs, and how close the integer model is to the float one
on them: output cosine (over the kept tokens for masked text), top-1 agreement and accuracy where labelled.

Data: CIFAR-10 test JPEGs (64 to calibrate, then 256 for the trained ViT and 32 for the random-weight CNNs,
normalized by the CIFAR statistics), SST-2 phrases tokenized by MiniLM-L6 (see ``models/corpus.py``).

    python benchmarks/real_exports.py [--names vit-cifar,timm-vit] [--exporters legacy,dynamo] [-o folder]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import intq
from intq.cli import main as quantize_cli
from intq.export.verify import float_ops_in_integer_region
from intq.models import corpus


def _ort(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def _cos(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def row(name: str, exporter: str, folder: Path) -> dict:
    entry = corpus.build(name, exporter, folder)
    out = folder / f"{name}-{exporter}.out"
    stderr = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(stderr):
        rc = quantize_cli(
            [str(entry.onnx_path), "--calib", str(entry.calib_path), "-o", str(out), "--force", "--quiet"]
        )
    result = {
        "model": name,
        "exporter": exporter,
        "real_weights": entry.real_weights,
        "seconds": time.perf_counter() - t0,
    }
    if rc != 0:
        lines = [ln for ln in stderr.getvalue().splitlines() if ln.startswith("quantize: error")]
        return {**result, "quantize": lines[0] if lines else f"exit {rc}"}
    int_path = out / "model.int.onnx"
    feeds = entry.eval_feeds
    want = _ort(int_path, feeds)
    ref = _ort(entry.onnx_path, feeds)
    result.update(
        quantize="ok",
        integer_only=not float_ops_in_integer_region(onnx.load(int_path)),
        tvm_equals_ort=bool(np.array_equal(intq.load(out)(**feeds), want)),
    )
    if entry.mask_input is not None:
        kept = feeds[entry.mask_input].astype(bool)
        result["cosine"] = _cos(want[kept], ref[kept])
    else:
        result["cosine"] = _cos(want, ref)
    if entry.labels is not None and want.ndim == 2:
        result["top1_agreement"] = float((want.argmax(-1) == ref.argmax(-1)).mean())
        if entry.real_weights:
            result["accuracy_fp32"] = float((ref.argmax(-1) == entry.labels).mean())
            result["accuracy_int8"] = float((want.argmax(-1) == entry.labels).mean())
    return result


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | exporter | weights | quantize | integer-only | TVM == ORT | cosine | top-1 agree | acc fp32 / int8"
        " |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = r["quantize"] == "ok"
        cells = [
            r["model"],
            r["exporter"],
            "real" if r["real_weights"] else "random, trained-like",
            "ok" if ok else r["quantize"][:90],
            str(r.get("integer_only", "-")),
            str(r.get("tvm_equals_ort", "-")),
            f"{r['cosine']:.4f}" if ok else "-",
            f"{100 * r['top1_agreement']:.1f}%" if "top1_agreement" in r else "-",
            f"{100 * r['accuracy_fp32']:.1f}% / {100 * r['accuracy_int8']:.1f}%" if "accuracy_fp32" in r else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", default=",".join(corpus.NAMES))
    p.add_argument("--exporters", default=",".join(corpus.EXPORTERS))
    p.add_argument("-o", "--out", default=None, help="folder for the exports and artifacts (default: temporary)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="intq-corpus-"))
    rows = []
    for name in args.names.split(","):
        for exporter in args.exporters.split(","):
            rows.append(row(name, exporter, folder))
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
