"""Error against float of intq's integer nonlinearities beside I-BERT's, on the same integer inputs.

intq: Shiftmax, ShiftGELU, ILayerNorm (I-ViT's shift-based forms, ``quantizer/ops``).
I-BERT (Kim et al. 2021): i-softmax (i-exp), i-GELU (i-erf), I-LayerNorm
(I-SQRT), emulated exactly in int64 by ``benchmarks/ibert_reference.py``
(checked by ``tests/benchmarks/test_ibert_reference.py``).

Both ops of a pair get the same integers at the same input scale and
produce the same output format (softmax: int8 at 1/128; GELU and
LayerNorm: int8 at the same ``S_out``), so the difference is the
approximation.  Errors are against float64 references on the dequantized
input (input quantization is common to both and not counted): probability
units for softmax, real units for GELU and LayerNorm.  ``grid`` is the
error of the float reference rounded to the output grid alone, the floor
that any int8-output op has.

    python benchmarks/int_ops_error.py
"""

from __future__ import annotations

import math
import time

import ibert_reference as ib
import torch
import torch.nn.functional as F

from intq.quantizer.ops.layernorm import ILayerNorm
from intq.quantizer.ops.shiftgelu import ShiftGELU
from intq.quantizer.ops.shiftmax import Shiftmax

SEED_SOFTMAX, SEED_GELU, SEED_LN = 1000, 2000, 3000
SOFTMAX_ROWS = 512
SOFTMAX_LENGTHS = (16, 128, 197)
SOFTMAX_SCALES = (0.1, 0.03, 0.01)
GELU_SAMPLES = 1 << 16
GELU_SCALES = (0.1, 0.05, 0.02)
LN_ROWS = 256
LN_EPS = 1e-6

COLUMNS = ("intq max", "I-BERT max", "ratio", "intq mean", "I-BERT mean", "ratio", "grid max")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else ("1.00" if a == 0 else "inf")


def _row(label: str, ours: torch.Tensor, theirs: torch.Tensor, grid: torch.Tensor, extra: str = "") -> str:
    o_max, t_max = float(ours.max()), float(theirs.max())
    o_mean, t_mean = float(ours.mean()), float(theirs.mean())
    cells = (f"{o_max:.5f}", f"{t_max:.5f}", _ratio(o_max, t_max))
    cells += (f"{o_mean:.6f}", f"{t_mean:.6f}", _ratio(o_mean, t_mean), f"{float(grid.max()):.5f}")
    return f"{label:<34}" + "".join(f"{c:>12}" for c in cells) + (f"  {extra}" if extra else "")


def _table_head(title: str, extra: str = "") -> None:
    print(f"\n{title}")
    line = f"{'case':<34}" + "".join(f"{c:>12}" for c in COLUMNS) + (f"  {extra}" if extra else "")
    print(line)
    print("-" * len(line))


# ------------------------------------------------------------------ softmax


def _logits(kind: str, length: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "N(0,3^2)":
        return 3.0 * torch.randn(SOFTMAX_ROWS, length, generator=gen, dtype=torch.float64)
    # peaked: one key per row 8 above a N(0,1) background (a confident head)
    z = torch.randn(SOFTMAX_ROWS, length, generator=gen, dtype=torch.float64)
    peak = torch.randint(0, length, (SOFTMAX_ROWS, 1), generator=gen)
    return z.scatter_add(1, peak, torch.full((SOFTMAX_ROWS, 1), 8.0, dtype=torch.float64))


def softmax_section() -> None:
    _table_head("SOFTMAX  (error in probability; output int8 at 1/128)", "D | q_ln2")
    case = 0
    for kind in ("N(0,3^2)", "peaked +8"):
        for length in SOFTMAX_LENGTHS:
            for scale in SOFTMAX_SCALES:
                gen = torch.Generator().manual_seed(SEED_SOFTMAX + case)
                case += 1
                q = torch.round(_logits(kind, length, gen) / scale).to(torch.int32)
                p = torch.softmax(q.double() * scale, dim=-1)
                op = Shiftmax(scale)
                ours = (op(q).double() / 128 - p).abs()
                theirs = (ib.i_softmax(q, scale).double() / 128 - p).abs()
                grid = (torch.round(p * 128).clamp(0, 127) / 128 - p).abs()
                extra = f"{int(op.D)} | {math.floor(math.log(2) / scale)}"
                print(_row(f"{kind} L={length} S={scale}", ours, theirs, grid, extra))


# ------------------------------------------------------------------ GELU


def _gelu_inputs(kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "N(0,2^2)":
        return 2.0 * torch.randn(GELU_SAMPLES, generator=gen, dtype=torch.float64)
    # heavy-tailed: 1.5 * Student t with 3 degrees of freedom, shifted to the negative side like MLP pre-activations
    z = torch.randn(GELU_SAMPLES, generator=gen, dtype=torch.float64)
    chi2 = (torch.randn(GELU_SAMPLES, 3, generator=gen, dtype=torch.float64) ** 2).sum(-1)
    return 1.5 * z / (chi2 / 3).sqrt() - 0.5


def gelu_section() -> None:
    _table_head("GELU  (error in real units; int8 in at S, int8 out at S_out = S)", "clipped in")
    case = 0
    for kind in ("N(0,2^2)", "1.5*t3-0.5"):
        for scale in GELU_SCALES:
            gen = torch.Generator().manual_seed(SEED_GELU + case)
            case += 1
            x = _gelu_inputs(kind, gen)
            q = torch.round(x / scale).clamp(-128, 127).to(torch.int8)
            clipped = float((torch.round(x / scale).abs() > 127).double().mean())
            scale_out = scale
            ref = F.gelu(q.double() * scale).clamp(-128 * scale_out, 127 * scale_out)
            ours = (ShiftGELU(scale, scale_out)(q).double() * scale_out - ref).abs()
            theirs = (ib.i_gelu_int8(q, scale, scale_out).double() * scale_out - ref).abs()
            grid = (torch.round(ref / scale_out) * scale_out - ref).abs()
            print(_row(f"{kind} S={scale}", ours, theirs, grid, f"{100 * clipped:.1f}%"))


# ------------------------------------------------------------------ LayerNorm


def _residual(channels: int, outlier_range: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """A residual stream: per-channel mean/std, per-token gain, and a few outlier channels (real units)."""
    mean_c = 0.5 * torch.randn(channels, generator=gen, dtype=torch.float64)
    std_c = 0.5 + torch.rand(channels, generator=gen, dtype=torch.float64)
    n_out = channels // 128
    idx = torch.randperm(channels, generator=gen)[:n_out]
    lo, hi = outlier_range
    mag = lo + (hi - lo) * torch.rand(n_out, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(n_out, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    mean_c[idx] = sign * mag
    std_c[idx] = 0.1 * mag
    gain = 0.5 + 1.5 * torch.rand(LN_ROWS, 1, generator=gen, dtype=torch.float64)
    return gain * (mean_c + std_c * torch.randn(LN_ROWS, channels, generator=gen, dtype=torch.float64))


def layernorm_section() -> None:
    _table_head("LAYERNORM  (error in real units; int8 out at S_out = max|ref| / 127)", "S_in | S_out")
    cases = [
        (384, "int16", (20.0, 60.0)),
        (768, "int16", (20.0, 60.0)),
        (384, "int16", (100.0, 300.0)),
        (768, "int16", (100.0, 300.0)),
        (768, "int8", (20.0, 60.0)),
    ]
    for case, (channels, width, outliers) in enumerate(cases):
        gen = torch.Generator().manual_seed(SEED_LN + case)
        x = _residual(channels, outliers, gen)
        qmax = 32767 if width == "int16" else 127
        scale_in = float(x.abs().max()) / qmax
        q = torch.round(x / scale_in).clamp(-qmax - 1, qmax).to(torch.int16 if width == "int16" else torch.int8)
        gamma = (1 + 0.2 * torch.randn(channels, generator=gen, dtype=torch.float64)).numpy()
        beta = (0.1 * torch.randn(channels, generator=gen, dtype=torch.float64)).numpy()
        ref = F.layer_norm(
            q.double() * scale_in, (channels,), torch.from_numpy(gamma), torch.from_numpy(beta), eps=LN_EPS
        )
        scale_out = float(ref.abs().max()) / 127
        ours_q = ILayerNorm(gamma, beta, LN_EPS, scale_in, scale_out)(q)
        ours = (ours_q.double() * scale_out - ref).abs()
        theirs = (ib.i_layernorm(q, gamma, beta, scale_out).double() * scale_out - ref).abs()
        grid = (torch.round(ref / scale_out).clamp(-128, 127) * scale_out - ref).abs()
        label = f"{width} C={channels} outl.+-{outliers[0]:g}..{outliers[1]:g}"
        print(_row(label, ours, theirs, grid, f"{scale_in:.2e} | {scale_out:.3f}"))


def main() -> None:
    t0 = time.perf_counter()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print("intq (I-ViT shift-based ops) vs I-BERT (Kim et al. 2021, polynomial ops): error against float64")
    print("Both ops of a row read the same integers at the same scale and write the same int8 output format;")
    print("error = |dequantized output - float reference on the dequantized input|; max and mean over all elements;")
    print("ratio = intq / I-BERT (< 1: intq closer to float); grid = float reference rounded to the output grid.")
    print(f"softmax: {SOFTMAX_ROWS} rows per case, logits N(0,3^2) or N(0,1) + 8 at one key per row, int32 at scale S;")
    print(f"  ref torch.softmax; D = round(1/S) (Shiftmax), q_ln2 = floor(ln2/S) (i-exp); seeds {SEED_SOFTMAX}+case")
    print(f"GELU: {GELU_SAMPLES} samples per case, N(0,2^2) or 1.5*t3-0.5, int8 at S (clipped share shown, not an")
    print(f"  op error); ref exact-erf GELU; S_out = S; seeds {SEED_GELU}+case")
    print(f"LayerNorm: {LN_ROWS} tokens per case, residual stream with per-channel mean/std, per-token gain, C/128")
    print("  outlier channels of |mean| in the range shown; min-max scale to int16 (or int8); gamma ~ 1 + 0.2 N,")
    print(f"  beta ~ 0.1 N; eps {LN_EPS:g} (I-BERT's formula has none); ref torch layer_norm; seeds {SEED_LN}+case")
    print("I-BERT settings: int64 emulation of Algorithms 1-4; softmax 128 e / sum rounded by one integer division;")
    print("  GELU requantized by a 24-bit dyadic; LayerNorm: rounded integer mean, I-SQRT, 2**31 // std (INT32 n).")
    softmax_section()
    gelu_section()
    layernorm_section()
    print(f"\n{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
