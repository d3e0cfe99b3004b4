"""The bit-width ILP against an independent brute-force enumeration on small tables, plus its infeasibility
message, ties, pins, named constraints and the debug LP file."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest

from intq.ilp import compat
from intq.ilp.solve import Budget, InfeasibleBudgetError, build_problem, solve
from intq.ilp.table import LayerRow, Table


def make_table(seed: int, n: int = 7, ties=(), pins=None) -> Table:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        params = int(rng.integers(50, 5000))
        macs = params * int(rng.integers(1, 50))
        d8 = float(rng.uniform(0.01, 0.1))
        lat8 = float(rng.uniform(1e-4, 1e-3))
        rows.append(
            LayerRow(
                name=f"/blk{i}/Conv",
                params=params,
                sensitivity=float(rng.lognormal(0.0, 1.5)),
                delta_w={4: d8 * float(rng.uniform(100, 400)), 8: d8},
                size_bytes={4: math.ceil(params / 2), 8: params},
                bops={4: macs * 16, 8: macs * 64},
                # some layers run slower at 4 bits (unpacking), as measured tables can say
                latency={4: lat8 * float(rng.uniform(0.4, 1.3)), 8: lat8},
            )
        )
    return Table(tuple(rows), ties=ties, pins=pins)


def brute_force(table: Table, budget: dict, pins: dict | None = None, remainder: dict | None = None):
    """Every assignment, checked directly on the rows: the optimum (objective, assignment) or None.

    ``remainder``: ``{8: r8, 4: r4}``, the time outside the layers at all-8 and all-4; the latency budget then
    holds the predicted model time less r8, ``r8 + (r4 - r8) * (8-bit latency share at 4 bits) + kernels``.
    """
    rows = table.layers
    if pins is None:
        pins = {rows[0].name: 8, rows[-1].name: 8}
    columns = {"size": "size_bytes", "bops": "bops", "latency": "latency"}
    ref = {k: sum(getattr(r, columns[k])[8] for r in rows) for k in budget}
    best = None
    for bits in itertools.product((4, 8), repeat=len(rows)):
        a = {r.name: b for r, b in zip(rows, bits, strict=True)}
        if any(a[n] != b for n, b in pins.items()):
            continue
        if any(len({a[n] for n in g}) > 1 for g in table.ties):
            continue
        total = {k: sum(getattr(r, columns[k])[a[r.name]] for r in rows) for k in budget}
        if remainder is not None and "latency" in total:
            share = sum(r.latency[8] for r in rows if a[r.name] == 4) / sum(r.latency[8] for r in rows)
            total["latency"] += (remainder[4] - remainder[8]) * share
        if any(total[k] > frac * ref[k] * (1 + 1e-12) for k, frac in budget.items()):
            continue
        obj = sum(r.sensitivity * r.delta_w[a[r.name]] for r in rows)
        if best is None or obj < best[0]:
            best = (obj, a)
    return best


def min_fraction(table: Table, kind: str, others: dict, pins: dict | None = None) -> float | None:
    """Brute force: the least ``kind`` fraction over assignments meeting the pins, ties and ``others``."""
    rows = table.layers
    columns = {"size": "size_bytes", "bops": "bops", "latency": "latency"}
    if pins is None:
        pins = {rows[0].name: 8, rows[-1].name: 8}
    ref = {k: sum(getattr(r, columns[k])[8] for r in rows) for k in (*others, kind)}
    best = None
    for bits in itertools.product((4, 8), repeat=len(rows)):
        a = {r.name: b for r, b in zip(rows, bits, strict=True)}
        if any(a[n] != b for n, b in pins.items()) or any(len({a[n] for n in g}) > 1 for g in table.ties):
            continue
        if any(
            sum(getattr(r, columns[k])[a[r.name]] for r in rows) > f * ref[k] * (1 + 1e-12) for k, f in others.items()
        ):
            continue
        v = sum(getattr(r, columns[kind])[a[r.name]] for r in rows) / ref[kind]
        best = v if best is None else min(best, v)
    return best


# budgets placed between each table's least feasible fraction (0) and the all-INT8 cost (1)
BUDGETS = [
    {"size": 0.3},
    {"size": 0.05},
    {"bops": 0.3},
    {"latency": 0.4},
    {"size": 0.4, "bops": 0.4},
    {"size": 0.5, "bops": 0.5, "latency": 0.5},
    {},
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("between", BUDGETS, ids=lambda b: "+".join(f"{k}{v}" for k, v in b.items()) or "none")
def test_optimum_matches_enumeration(seed, between):
    table = make_table(seed)
    budget = {}
    for kind, t in between.items():
        lo = min_fraction(table, kind, {})
        budget[kind] = lo + t * (1 - lo)
    expect = brute_force(table, budget)
    if expect is None:
        assert len(budget) > 1, "a single budget above its minimum is feasible"
        with pytest.raises(InfeasibleBudgetError, match="together"):
            solve(table, budget)
        return
    got = solve(table, budget)
    assert list(got) == [r.name for r in table.layers]
    obj = sum(r.sensitivity * r.delta_w[got[r.name]] for r in table.layers)
    assert math.isclose(obj, expect[0], rel_tol=1e-9), (got, expect)
    assert got == expect[1]


def test_hand_checked_table():
    """Sizes 100/200/100 bytes at 8 bits, half at 4; a 0.75 budget needs 100 bytes back: layer b alone
    (objective +3 * (2 - 1)) or a and c (+1 + 1.5): the ILP must drop a and c."""

    def row(name, params, s):
        return LayerRow(name, params, s, {4: 2.0, 8: 1.0}, {4: params / 2, 8: params}, {4: 16 * params, 8: 64 * params})

    table = Table((row("a", 100, 1.0), row("b", 200, 3.0), row("c", 100, 1.5)), pins={})
    assert solve(table, {"size": 0.75}) == {"a": 4, "b": 8, "c": 4}
    assert solve(table, {"size": 0.5}) == {"a": 4, "b": 4, "c": 4}
    assert solve(table, None) == {"a": 8, "b": 8, "c": 8}


# tables and budgets where the remainder's change moves the optimum (the test asserts it does)
@pytest.mark.parametrize(
    ("seed", "change", "latency"), [(10, 1e-3, 0.95), (13, -1e-3, 0.8), (14, -4e-4, 0.85), (11, -4e-4, 0.9)]
)
def test_latency_budget_counts_the_remainder_change(seed, change, latency):
    """The time outside the kernels longer (shorter) at all-4 than at all-8: the ILP's optimum is the enumeration's
    with each assignment's remainder interpolated by its share of the 8-bit layer time at 4 bits."""
    base = make_table(seed)
    remainder = {8: 2e-3, 4: 2e-3 + change}
    table = Table(base.layers, remainder_s=remainder)
    budget = {"latency": latency}
    expect = brute_force(table, budget, remainder=remainder)
    got = solve(table, budget)
    assert got == expect[1]
    plain = brute_force(base, budget)  # the constant remainder: a different optimum on these tables
    assert plain is not None and plain[1] != got, "the remainder's change does not move this optimum"


def test_hand_checked_remainder_change():
    """Kernels 1 s at 8 bits, 0.6 s at 4, in both layers; sensitivities 1 (a) and 3 (b).  With the time outside the
    kernels the same at every width a latency budget of 0.8 is met by a alone at 4 (1.6 s of 2).  With it 0.4 s
    longer at all-4, a alone at 4 costs 0.6 + 0.4 / 2 = 0.8 s (0.9 of 2), so both go to 4 bits (1.6 of 2)."""

    def row(name, s):
        return LayerRow(name, 100, s, {4: 2.0, 8: 1.0}, {4: 50, 8: 100}, {4: 1, 8: 4}, {4: 0.6, 8: 1.0})

    rows = (row("a", 1.0), row("b", 3.0))
    assert solve(Table(rows, pins={}), {"latency": 0.8}) == {"a": 4, "b": 8}
    table = Table(rows, pins={}, remainder_s={8: 1.0, 4: 1.4})
    assert solve(table, {"latency": 0.8}) == {"a": 4, "b": 4}
    assert table.predicted_latency({"a": 4, "b": 4}) == pytest.approx(2.6)  # 1.4 + 0.6 + 0.6
    with pytest.raises(InfeasibleBudgetError, match=r"latency: the smallest feasible budget is 0\.8000") as info:
        solve(table, {"latency": 0.7})
    assert info.value.minimum == {"latency": pytest.approx(0.8)}
    assert "budget_latency" in compat.constraint_names(build_problem(table, {"latency": 0.8}).lp)


def test_infeasible_budget_names_the_minimum(tmp_path):
    table = make_table(3)
    m = min_fraction(table, "size", {})
    path = tmp_path / "x.lp"
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(table, {"size": 0.3, "bops": 0.9}, debug_lp_path=path)
    assert isinstance(info.value, ValueError)
    assert math.isclose(info.value.minimum["size"], m, rel_tol=1e-12)
    shown = f"{math.ceil(m * 1e4) / 1e4:.4f}"
    assert f"size: the smallest feasible budget is {shown} (asked 0.3)" in str(info.value)
    assert "bops: the smallest" in str(info.value)  # every requested kind is reported
    assert "/blk0/Conv at 8" in str(info.value) and "/blk6/Conv at 8" in str(info.value)
    assert not path.exists(), "nothing is written when the budget is infeasible"
    # the value shown is feasible, and a little less is not
    solve(table, {"size": float(shown)})
    with pytest.raises(InfeasibleBudgetError):
        solve(table, {"size": m - 1e-4})


def test_budgets_infeasible_only_together():
    """Latency at 4 bits is slower than at 8 for two layers: a tight size budget and a tight latency budget
    conflict, though each alone can be met.  The minimum for each holds the other."""
    rows = []
    for i, (lat4, lat8) in enumerate([(1.0, 1.0), (3.0, 1.0), (3.0, 1.0), (0.5, 1.0), (1.0, 1.0)]):
        rows.append(
            LayerRow(f"L{i}", 100, 1.0 + i, {4: 2.0, 8: 1.0}, {4: 50, 8: 100}, {4: 1, 8: 4}, {4: lat4, 8: lat8})
        )
    table = Table(tuple(rows))
    budget = {"size": 0.75, "latency": 0.95}
    assert min_fraction(table, "size", {}) <= 0.75 and min_fraction(table, "latency", {}) <= 0.95
    assert brute_force(table, budget) is None
    with pytest.raises(InfeasibleBudgetError, match="together") as info:
        solve(table, budget)
    for kind, others in (("size", {"latency": 0.95}), ("latency", {"size": 0.75})):
        assert math.isclose(info.value.minimum[kind], min_fraction(table, kind, others), rel_tol=1e-9), kind


def test_ties_are_honoured():
    base = make_table(4)
    budget = {"size": 0.7}
    free = solve(base, budget)
    # tie two layers the free optimum splits
    a = next(n for n, b in free.items() if b == 4)
    b = next(n for n, b in free.items() if b == 8 and n not in (base.layers[0].name, base.layers[-1].name))
    tied = Table(base.layers, ties=((a, b),))
    got = solve(tied, budget)
    assert got[a] == got[b]
    expect = brute_force(tied, budget)
    assert got == expect[1]


def test_tie_with_a_pin_and_overlapping_groups():
    table = make_table(5, ties=(("/blk0/Conv", "/blk2/Conv"), ("/blk2/Conv", "/blk3/Conv")))
    got = solve(table, {"size": 0.85})
    assert got["/blk0/Conv"] == got["/blk2/Conv"] == got["/blk3/Conv"] == 8  # blk0 is pinned (first layer)
    assert set(got.values()) == {4, 8}
    assert got == brute_force(table, {"size": 0.85})[1]


def test_pins_are_honoured():
    table = make_table(6)
    budget = {"size": min_fraction(table, "size", {}) + 0.01}  # tight: only the pins keep 8-bit layers
    got = solve(table, budget)
    assert got[table.layers[0].name] == 8 and got[table.layers[-1].name] == 8
    assert got == brute_force(table, budget)[1]
    pinned = Table(table.layers, pins={"/blk3/Conv": 4})
    got = solve(pinned, None)  # no budget: everything else prefers 8 bits
    assert got["/blk3/Conv"] == 4 and sum(b == 4 for b in got.values()) == 1
    unpinned = Table(table.layers, pins={})
    all4 = sum(r.size_bytes[4] for r in table.layers) / sum(r.size_bytes[8] for r in table.layers)
    assert set(solve(unpinned, {"size": all4}).values()) == {4}  # without pins all layers may go to 4 bits


def test_named_constraints_and_variables():
    table = make_table(7, ties=(("/blk1/Conv", "/blk2/Conv"),))
    problem = build_problem(table, Budget(size=0.7, bops=0.6))
    names = compat.constraint_names(problem.lp)
    for i in range(7):
        assert f"one__blk{i}_Conv" in names
    assert {"pin__blk0_Conv", "pin__blk6_Conv", "budget_size", "budget_bops"} <= set(names)
    assert {"tie__blk1_Conv__blk2_Conv_4", "tie__blk1_Conv__blk2_Conv_8"} <= set(names)
    assert "budget_latency" not in names
    assert problem.choice["/blk3/Conv"][4].name == "bits__blk3_Conv_4"


def test_debug_lp_file(tmp_path):
    path = tmp_path / "debug" / "bits.lp"
    table = make_table(8)
    solve(table, {"bops": min_fraction(table, "bops", {}) + 0.05}, debug_lp_path=path)
    text = path.read_text()
    assert "budget_bops:" in text and "one__blk0_Conv:" in text and "bits__blk0_Conv_4" in text
    assert sorted(p.name for p in path.parent.iterdir()) == ["bits.lp"]


def test_names_that_collide_after_sanitizing_and_long_names():
    long = "/encoder/" + "very_long_block_name/" * 8 + "MatMul"
    rows = [
        LayerRow(n, 10, s, {4: 2.0, 8: 1.0}, {4: 5, 8: 10}, {4: 16, 8: 64})
        for n, s in (("a/b", 1.0), ("a_b", 2.0), ("a-b", 3.0), (long, 4.0))
    ]
    table = Table(tuple(rows), pins={})
    got = solve(table, {"size": 0.75}, debug_lp_path=None)
    assert got == brute_force(table, {"size": 0.75}, pins={})[1]
    assert len({v.name for xs in build_problem(table, None).choice.values() for v in xs.values()}) == 8


def test_budget_validation():
    with pytest.raises(ValueError, match="Budget size=0"):
        Budget(size=0)
    with pytest.raises(ValueError, match=r"unknown; use any of \['size', 'bops', 'latency'\]"):
        solve(make_table(0), {"memory": 0.5})


def test_latency_budget_needs_latencies():
    t = make_table(0)
    rows = list(t.layers)
    rows[2] = LayerRow(
        rows[2].name, rows[2].params, rows[2].sensitivity, rows[2].delta_w, rows[2].size_bytes, rows[2].bops
    )
    table = Table(tuple(rows))
    solve(table, {"size": 0.8})  # fine without latency
    with pytest.raises(ValueError, match=r"layer '/blk2/Conv' has no measured latency"):
        solve(table, {"latency": 0.8})


def test_no_pulp_deprecation_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        solve(make_table(1), {"size": 0.7, "bops": 0.6})


def test_unproven_optimum_is_an_error(monkeypatch):
    """A time-limited CBC can stop with a feasible, unproven solution: that is not an answer."""
    import pulp

    from intq.ilp import solve as solve_mod

    def stopped(problem, time_limit):
        problem.lp.sol_status = pulp.LpSolutionIntegerFeasible
        return pulp.LpStatusOptimal

    monkeypatch.setattr(solve_mod, "_solve", stopped)
    with pytest.raises(RuntimeError, match="optimality not proven"):
        solve(make_table(0), {"size": 0.9}, time_limit=0.01)
