"""HAWQV3's bit-width integer linear program, built with PuLP and solved by CBC.

For layers ``i`` (rows of an ``ilp.table.Table``) and candidate widths ``b``,
binary variables ``x[i,b]`` (named ``bits_<layer>_<b>``) choose one width each:

    minimise    sum_{i,b} Omega[i,b] x[i,b] / Omega_max,   Omega[i,b] = (Tr(H_i)/n_i) * ||W_i - Q_b(W_i)||^2
    subject to  one_<layer>:          sum_b x[i,b] = 1
                pin_<layer>:          x[i,p_i] = 1                     (pinned layers)
                tie_<first>_<layer>_<b>: x[i,b] = x[first,b]           (every b; ``first`` the group's first layer)
                budget_<kind>:        sum_{i,b} (c_kind[i,b] / C_kind) x[i,b] <= beta_kind

``kind`` is ``size``, ``bops`` or ``latency``, in any combination; ``beta`` is a
fraction of ``C_kind = sum_i c_kind[i, 8]``, the all-INT8 (widest width) cost.
``c_kind[i,b]`` is ``Table.cost(kind, i, b)``: the row's size or BOPs, and for
latency the layer's kernel time plus its share of the change of the time
outside the kernels at that width (``ilp.table``, "The remainder"), so that
``sum_i c_latency[i, b_i]`` is the predicted model time less its all-INT8
remainder, linear in the binaries; ``C_latency`` is the layers' all-INT8
kernel time, where every share is 0.
Dividing the objective by its largest coefficient ``Omega_max`` (and each
budget row by ``C_kind``) keeps the numbers near 1 for CBC's absolute
tolerances; the argmin is unchanged.

A budget below what the pins and ties allow raises ``InfeasibleBudgetError``
(a ``ValueError``) naming, for each kind requested, the smallest feasible
fraction: alone, ``sum over groups of min over allowed widths of the group's
cost`` (groups are independent once the budget is the only coupling), and,
when the budgets are only infeasible together, the least ``C_kind`` fraction
reachable while the other budgets hold (a second ILP per kind).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pulp

from intq.ilp import compat
from intq.ilp.table import COSTS, Table


@dataclasses.dataclass(frozen=True)
class Budget:
    """Cost limits as fractions of the all-INT8 cost; None: no limit of that kind."""

    size: float | None = None
    bops: float | None = None
    latency: float | None = None

    def __post_init__(self):
        for kind in COSTS:
            v = getattr(self, kind)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(
                    f"Budget {kind}={v!r}: give a positive fraction of the all-INT8 {kind} (e.g. 0.6), or None."
                )

    def requested(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in COSTS if getattr(self, k) is not None}

    @classmethod
    def coerce(cls, budget: Budget | Mapping[str, float] | None) -> Budget:
        if budget is None:
            return cls()
        if isinstance(budget, Budget):
            return budget
        unknown = sorted(set(budget) - set(COSTS))
        if unknown:
            raise ValueError(f"Budget kinds {unknown} are unknown; use any of {list(COSTS)}.")
        return cls(**budget)


class InfeasibleBudgetError(ValueError):
    """The budget cannot be met; ``minimum`` maps each requested kind to its smallest feasible fraction
    (None where no value of that kind helps while the other budgets hold)."""

    def __init__(self, message: str, minimum: dict[str, float | None]):
        super().__init__(message)
        self.minimum = minimum


@dataclasses.dataclass
class IlpProblem:
    """The PuLP model and its variables: ``choice[layer][bits]``."""

    lp: pulp.LpProblem
    choice: dict[str, dict[int, pulp.LpVariable]]

    def assignment(self) -> dict[str, int]:
        """The chosen width per layer (after a solve)."""
        out = {}
        for layer, xs in self.choice.items():
            chosen = [b for b, x in xs.items() if (x.value() or 0.0) > 0.5]
            if len(chosen) != 1:
                raise RuntimeError(f"ILP: layer {layer!r} got widths {chosen} from the solver; expected exactly one.")
            out[layer] = chosen[0]
        return out


def _identifiers(names) -> dict[str, str]:
    """LP-safe, unique identifiers: letters, digits and '_' (PuLP would rewrite the rest and could collide)."""
    out, used = {}, set()
    for name in names:
        ident = re.sub(r"[^A-Za-z0-9_]", "_", name) or "layer"
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        if len(ident) > 60:  # PuLP's LP writer rejects variable names over 100 characters
            ident = f"{ident[:51]}_{digest}"
        if ident in used:
            ident = f"{ident[:51]}_{digest}"
        used.add(ident)
        out[name] = ident
    return out


def build_problem(
    table: Table, budget: Budget | Mapping[str, float] | None, objective: str | None = None
) -> IlpProblem:
    """The ILP of the module docstring.  ``objective``: a cost kind to minimise instead of Omega
    (used to find the smallest feasible budget)."""
    budget = Budget.coerce(budget)
    ident = _identifiers(r.name for r in table.layers)
    lp = pulp.LpProblem("hawqv3_bits" if objective is None else f"min_{objective}", pulp.LpMinimize)
    choice = {r.name: {b: compat.new_binary(lp, f"bits_{ident[r.name]}_{b}") for b in table.bits} for r in table.layers}
    if objective is None:
        omega_max = max((r.objective(b) for r in table.layers for b in table.bits), default=0.0) or 1.0
        lp += (
            pulp.lpSum(r.objective(b) / omega_max * choice[r.name][b] for r in table.layers for b in table.bits),
            "omega",
        )
    else:
        ref = _reference(table, objective)
        lp += (
            pulp.lpSum(
                table.cost(objective, r.name, b) / ref * choice[r.name][b] for r in table.layers for b in table.bits
            ),
            f"cost_{objective}",
        )
    for r in table.layers:
        lp += (pulp.lpSum(choice[r.name].values()) == 1, f"one_{ident[r.name]}")
    for name, b in table.resolved_pins().items():
        lp += (choice[name][b] == 1, f"pin_{ident[name]}")
    for group in table.groups():
        first = group[0]
        for name in group[1:]:
            for b in table.bits:
                lp += (choice[name][b] == choice[first][b], f"tie_{ident[first]}_{ident[name]}_{b}")
    for kind, frac in budget.requested().items():
        ref = _reference(table, kind)
        row = pulp.lpSum(
            table.cost(kind, r.name, b) / ref * choice[r.name][b] for r in table.layers for b in table.bits
        )
        lp += (row <= frac, f"budget_{kind}")
    return IlpProblem(lp, choice)


def _reference(table: Table, kind: str) -> float:
    ref = table.reference_cost(kind)
    if not ref > 0:
        raise ValueError(f"ILP: the all-INT8 {kind} of the table is {ref}; a {kind} budget needs positive costs.")
    return ref


def minimum_fraction(table: Table, kind: str) -> float:
    """The least ``kind`` cost the pins and ties allow, as a fraction of the all-INT8 cost (exact: per group)."""
    pins = table.resolved_pins()
    total = 0.0
    for group in table.groups():
        pinned = {pins[n] for n in group if n in pins}
        allowed = sorted(pinned) if pinned else table.bits
        total += min(math.fsum(table.cost(kind, n, b) for n in group) for b in allowed)
    return total / _reference(table, kind)


def _solve(problem: IlpProblem, time_limit: float | None) -> int:
    return problem.lp.solve(compat.cbc_solver(time_limit))


def solve(
    table: Table,
    budget: Budget | Mapping[str, float] | None,
    debug_lp_path: str | os.PathLike | None = None,
    time_limit: float | None = None,
) -> dict[str, int]:
    """The width per layer that minimises Omega within ``budget`` (a ``Budget`` or ``{"size": 0.6, ...}``).

    ``debug_lp_path``: also write the model as an LP file (only when a solution is found).
    """
    budget = Budget.coerce(budget)
    requested = budget.requested()
    alone = {kind: minimum_fraction(table, kind) for kind in requested}
    short = {k: v for k, v in alone.items() if requested[k] < v * (1 - 1e-9)}
    if short:
        raise InfeasibleBudgetError(_message(table, requested, alone, together=False), alone)
    problem = build_problem(table, budget)
    status = _solve(problem, time_limit)
    if status == compat.STATUS_INFEASIBLE:
        together = {kind: _min_given_others(table, kind, requested, time_limit) for kind in requested}
        raise InfeasibleBudgetError(_message(table, requested, together, together=True), together)
    if not compat.proven_optimal(problem.lp, status):
        raise RuntimeError(
            f"ILP: CBC ended with status {compat.status_name(status)} (optimality not proven) on "
            f"{len(table.layers)} layers; "
            "raise time_limit or write the model with debug_lp_path to inspect it."
        )
    result = problem.assignment()
    if debug_lp_path is not None:
        _write_atomic(problem.lp, Path(debug_lp_path))
    return result


def _min_given_others(table: Table, kind: str, requested: dict[str, float], time_limit) -> float | None:
    others = {k: v for k, v in requested.items() if k != kind}
    problem = build_problem(table, others, objective=kind)
    if not compat.proven_optimal(problem.lp, _solve(problem, time_limit)):
        return None
    return table.total(kind, problem.assignment()) / _reference(table, kind)


def _ceil4(v: float) -> str:
    return f"{math.ceil(v * 1e4 * (1 - 1e-12)) / 1e4:.4f}"


def _message(table: Table, requested, minimum, together: bool) -> str:
    asked = ", ".join(f"{k}={v:g}" for k, v in requested.items())
    lines = [
        f"The bit-width budget ({asked}, fractions of the all-INT8 cost) cannot be met"
        + (" by all its limits together" if together else " under the pinned and tied layers")
        + "."
    ]
    for kind, m in minimum.items():
        if m is None:
            lines.append(f"  {kind}: no {kind} budget helps while the other limits hold; relax those first.")
        else:
            cond = " while the other limits hold" if together else ""
            met = ", met" if not together and requested[kind] >= m * (1 - 1e-9) else ""
            lines.append(
                f"  {kind}: the smallest feasible budget{cond} is {_ceil4(m)} (asked {requested[kind]:g}{met})."
            )
    pins = table.resolved_pins()
    held = ", ".join(f"{n} at {b}" for n, b in pins.items())
    why = "" if not pins else f" or unpin layers ({held}{'; the default pins' if table.pins is None else ''})"
    lines.append(f"Raise the budget(s) to at least these values{why}.")
    return "\n".join(lines)


def _write_atomic(lp: pulp.LpProblem, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".lp", dir=path.parent)
    os.close(fd)
    try:
        compat.write_lp(lp, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
