"""Solvers: pure functions ``(weight, stats, constraint, options) -> SolverResult``, by name.

A solver sees one weight matrix as fp32 ``[out_features, in_features]`` and the statistics of its
input; it returns the new weight and the mask of pruned entries. No hooks, no model, no I/O.
A new method is one new file plus one ``@register`` line.
"""

from __future__ import annotations

from .base import SOLVERS, SolverResult, SolverSpec, Stats, register  # noqa: F401
from . import magnitude, sparsegpt, wanda  # noqa: F401  (registration side effect)

__all__ = ["SOLVERS", "SolverResult", "SolverSpec", "Stats", "register"]
