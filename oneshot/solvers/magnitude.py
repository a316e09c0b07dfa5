"""Magnitude pruning: drop the smallest |W|, one threshold per layer (as the papers) or per row."""

from __future__ import annotations

import torch

from ..constraint import Constraint
from ..masks import apply_mask, select_mask
from .base import SolverResult, Stats, register


@register("magnitude", needs_hessian=False, needs_stats=False, summary="|W|; no calibration statistics used")
def magnitude(weight: torch.Tensor, stats: Stats | None, constraint: Constraint, options: dict) -> SolverResult:
    mask = select_mask(weight.abs(), constraint, scope=options.get("magnitude_scope", "layer"))
    return SolverResult(apply_mask(weight, mask), mask, {})
