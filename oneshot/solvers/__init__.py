"""Solvers: pure functions ``(weight, stats, constraint, options) -> SolverResult``, by name.

A solver sees one weight matrix as fp32 ``[out_features, in_features]`` and the statistics of its
input; it returns the new weight and the mask of pruned entries. No hooks, no model, no I/O.
A new method is one new file plus one ``@register`` line.
"""

from __future__ import annotations

from ..updates import WEIGHT_UPDATES
from . import dsnot, magnitude, ria, sparsegpt, wanda  # noqa: F401  (registration side effect)
from .base import SOLVERS, SolverResult, SolverSpec, Stats, get_solver, register

__all__ = ["SOLVERS", "SolverResult", "SolverSpec", "Stats", "get_solver", "register", "solver_needs_hessian"]


def solver_needs_hessian(method: str, options: dict) -> bool:
    """Whether a run of ``method`` with ``options`` needs Σ x xᵀ: the solver (or DSnoT's initial
    solver) asks for it, or a Hessian-based ``--update`` does."""
    spec = SOLVERS[method]
    if options.get("update", "none") in WEIGHT_UPDATES:
        return True
    if method == "dsnot":
        return SOLVERS[options.get("dsnot_init", "wanda")].needs_hessian
    return spec.needs_hessian
