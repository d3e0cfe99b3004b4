"""The ILP benchmark's synthetic table is a valid table and its budgets are met (a small instance)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from intq.ilp.solve import solve

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "ilp_solve_time.py"
_SPEC = importlib.util.spec_from_file_location("ilp_solve_time", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_synthetic_table_budgets_are_met():
    table = bench.synthetic_table(60, seed=3)
    assert len(table.layers) == 60 and len({r.name for r in table.layers}) == 60 and table.ties
    for budget in bench.BUDGETS:
        result = solve(table, budget)
        for kind, frac in budget.items():
            assert table.total(kind, result) <= frac * table.reference_cost(kind) * (1 + 1e-9), (kind, budget)
        for group in table.ties:
            assert len({result[n] for n in group}) == 1
        assert result[table.layers[0].name] == result[table.layers[-1].name] == 8
