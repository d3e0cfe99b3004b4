"""Solve time of the HAWQV3 bit-width ILP on a synthetic 200-layer table.

The table (seeded) looks like a deep CNN: weight counts log-uniform from 1e3
to 2.5e6, MACs per weight from 10 to 3000 (spatial reuse), average Hessian
traces log-normal, ``||W - Q_4(W)||^2`` about 290x ``||W - Q_8(W)||^2`` (the
ratio of the squared steps, (127/7)^2 = 329, spread by the weight
distribution), 4-bit latency 45-75% of 8-bit, and 30 tie groups of two or
three consecutive layers (layers that read one activation).  The first and
last layers are pinned at 8 bits (the default).

Each budget is solved 5 times by ``intq.ilp.solve.solve`` (model build + CBC,
which runs as a subprocess); the median wall time, the solver status and the
achieved cost fractions are printed.  Target: under 1 s, Optimal.

    python benchmarks/ilp_solve_time.py [--layers 200] [--seed 0] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from intq.ilp import compat
from intq.ilp.solve import build_problem, minimum_fraction, solve
from intq.ilp.table import COSTS, LayerRow, Table

BUDGETS = [{"size": 0.6}, {"bops": 0.5}, {"latency": 0.7}, {"size": 0.6, "bops": 0.5, "latency": 0.7}]


def synthetic_table(layers: int, seed: int) -> Table:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(layers):
        params = int(10 ** rng.uniform(3, np.log10(2.5e6)))
        macs = params * int(10 ** rng.uniform(1, np.log10(3000)))
        d8 = params * float(rng.uniform(1e-8, 1e-6))
        lat8 = macs * 64 / 5e11 + 2e-6  # ~ 0.5 TOP/s of 8-bit work plus a launch cost
        rows.append(
            LayerRow(
                name=f"/stage{i // 20}/block{i % 20}/Conv",
                params=params,
                sensitivity=float(rng.lognormal(-6.0, 2.0)),
                delta_w={4: d8 * float(rng.uniform(200, 380)), 8: d8},
                size_bytes={4: -(-params // 2), 8: params},
                bops={4: macs * 16, 8: macs * 64},
                latency={4: lat8 * float(rng.uniform(0.45, 0.75)), 8: lat8},
            )
        )
    starts = sorted(rng.choice(np.arange(1, layers - 3, 6), size=min(30, (layers - 4) // 6), replace=False))
    ties = tuple(tuple(rows[s + k].name for k in range(int(rng.integers(2, 4)))) for s in starts)
    return Table(tuple(rows), ties=ties)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    table = synthetic_table(args.layers, args.seed)
    lows = ", ".join(f"{k} {minimum_fraction(table, k):.3f}" for k in COSTS)
    print(f"{len(table.layers)} layers, {len(table.ties)} tie groups; least feasible fractions: {lows}")
    print(f"{'budget':<34} {'median s':>9} {'min s':>7} {'status':>8} {'4-bit':>6}  achieved (size, bops, latency)")
    for budget in BUDGETS:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = solve(table, budget)
            times.append(time.perf_counter() - t0)
        problem = build_problem(table, budget)  # the status, from one more solve of the same model
        status = compat.status_name(problem.lp.solve(compat.cbc_solver()))
        achieved = ", ".join(f"{table.total(k, result) / table.reference_cost(k):.3f}" for k in COSTS)
        name = ", ".join(f"{k}={v}" for k, v in budget.items())
        fours = sum(b == 4 for b in result.values())
        print(f"{name:<34} {statistics.median(times):9.3f} {min(times):7.3f} {status:>8} {fours:6d}  {achieved}")


if __name__ == "__main__":
    main()
