"""Wanda (Sun et al., 2023): score |W_ij|·‖X_j‖₂, compared within each output row; no update."""

from __future__ import annotations

import torch

from ..constraint import Constraint
from ..masks import apply_mask, select_mask
from .base import SolverResult, Stats, register


def wanda_score(weight: torch.Tensor, stats: Stats) -> torch.Tensor:
    return weight.abs() * stats.sq_norms.sqrt().unsqueeze(0)


@register("wanda", needs_hessian=False, summary="|W|·‖X_j‖₂ per output row (Sun et al. 2023)")
def wanda(weight: torch.Tensor, stats: Stats, constraint: Constraint, options: dict) -> SolverResult:
    mask = select_mask(wanda_score(weight, stats), constraint, scope="row")
    return SolverResult(apply_mask(weight, mask), mask, {})
