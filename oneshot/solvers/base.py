"""The solver contract: statistics in, weight and mask out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..constraint import Constraint
from ..errors import OneshotError


@dataclass
class Stats:
    """Statistics of one linear's input, accumulated in fp32 over every calibration token.

    ``sq_norms[j]`` is Σ x_j² (so ‖X_j‖₂ = sqrt); ``sums[j]`` is Σ x_j (DSnoT's input means);
    ``hessian`` is Σ x xᵀ when the solver or the update asks for it. With held-out calibration
    windows (``--update``), these come from the fitting windows only and ``heldout`` holds the same
    statistics of the held-out windows, to judge updates on data they were not fitted to.
    """

    tokens: int
    sq_norms: torch.Tensor
    hessian: torch.Tensor | None = None
    sums: torch.Tensor | None = None
    heldout: Stats | None = None
    cache: dict = field(default_factory=dict)  # derived results shared by linears with the same input

    def mean(self) -> torch.Tensor:
        return self.sums / max(self.tokens, 1)

    def variance(self) -> torch.Tensor:
        mean = self.mean()
        return (self.sq_norms / max(self.tokens, 1) - mean * mean).clamp_min(0.0)


class SolverResult(NamedTuple):
    weight: torch.Tensor  # fp32 [out, in], pruned entries exactly +0.0
    mask: torch.Tensor  # bool [out, in], True = pruned
    info: dict  # anything the report should say (dampening used, fallbacks)


@dataclass(frozen=True)
class SolverSpec:
    name: str
    fn: Callable[[torch.Tensor, Stats, Constraint, dict], SolverResult]
    needs_hessian: bool
    needs_stats: bool = True
    summary: str = field(default="")
    # (constraint, options) -> whether each output row is solved on its own, so that linears sharing
    # an input can be solved as one matrix of their stacked rows
    rows_apart: Callable[[Constraint, dict], bool] | None = None


SOLVERS: dict[str, SolverSpec] = {}


def register(name: str, *, needs_hessian: bool, summary: str, needs_stats: bool = True, rows_apart=None):
    """Decorator: make a solver function available as ``--method name``.

    ``needs_stats=False`` (magnitude) skips the calibration pass that gathers input statistics;
    ``needs_hessian`` asks for Σ x xᵀ instead of the cheaper per-channel Σ x².
    """

    def wrap(fn):
        SOLVERS[name] = SolverSpec(name, fn, needs_hessian, needs_stats, summary, rows_apart)
        return fn

    return wrap


def get_solver(name: str) -> SolverSpec:
    """The solver registered as ``name``; an unknown name is one line that lists the known ones."""
    if name not in SOLVERS:
        raise OneshotError(f"unknown --method {name!r}; choose one of: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]
