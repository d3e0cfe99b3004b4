"""The PuLP names that move between versions, in one place.

PuLP 3.3 warns about its 4.0 changes: variables are made by
``prob.add_variable`` instead of ``LpVariable(...)``, and ``prob.constraints``
becomes a method returning a list instead of a name -> constraint dict.

PuLP 3.x ships a CBC binary (``PULP_CBC_CMD``) and deprecates it for 4.0,
where CBC comes from the ``cbcbox`` package (``pip install 'pulp[cbc]'``)
through ``COIN_CMD``.  ``cbc_solver`` takes the bundled one while it exists
(its deprecation warning silenced: it is the solver we mean to use) and
``COIN_CMD`` otherwise.
"""

from __future__ import annotations

import warnings

import pulp

STATUS_OPTIMAL = pulp.LpStatusOptimal
STATUS_INFEASIBLE = pulp.LpStatusInfeasible


def cbc_solver(time_limit: float | None = None):
    """CBC with its log off."""
    if hasattr(pulp, "PULP_CBC_CMD"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="PULP_CBC_CMD is deprecated", category=DeprecationWarning)
            solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit)
        if solver.available():
            return solver
    solver = pulp.COIN_CMD(msg=False, timeLimit=time_limit)
    if not solver.available():
        raise RuntimeError("No CBC solver found for the bit-width ILP: install it with pip install 'pulp[cbc]'.")
    return solver


def new_binary(problem: pulp.LpProblem, name: str) -> pulp.LpVariable:
    """A binary variable of ``problem`` (PuLP 3.3 deprecates constructing ``LpVariable`` directly)."""
    if hasattr(problem, "add_variable"):
        return problem.add_variable(name, cat=pulp.LpBinary)
    return pulp.LpVariable(name, cat=pulp.LpBinary)


def constraint_names(problem: pulp.LpProblem) -> list[str]:
    """Names of the constraints, in insertion order (PuLP 4.0 makes ``constraints`` a method returning a list)."""
    if callable(problem.constraints):
        return [c.name for c in problem.constraints()]
    return list(problem.constraints)


def proven_optimal(problem: pulp.LpProblem, status: int) -> bool:
    """Optimal and proven so: with a time limit CBC may report status Optimal for a merely feasible solution,
    which PuLP (2.x and later) marks in ``sol_status``."""
    sol = getattr(problem, "sol_status", pulp.LpSolutionOptimal)
    return status == STATUS_OPTIMAL and sol == pulp.LpSolutionOptimal


def status_name(status: int) -> str:
    return pulp.LpStatus.get(status, str(status))


def write_lp(problem: pulp.LpProblem, path: str) -> None:
    problem.writeLP(path)
