"""RIA (Zhang et al., ICLR 2024, "Plug-and-Play"): relative importance and activations.

score_ij = (|W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj|) · (‖X_j‖₂)^a, a = 0.5, compared within each
output row (unstructured) or each group of M inputs (N:M); no weight update.

For N:M the paper also permutes input channels so that important channels do not crowd into the
same groups. ``ria_permute`` does that here: channels are dealt round-robin, in order of their total
score, across the groups (so each group holds one channel of every importance tier), the N:M mask is
chosen in that order, and the permutation is kept only where it retains more score than the natural
order. The weight is returned in the *original* channel order, so the checkpoint stays a drop-in for
transformers; it is N:M along the permuted order, which ``info["input_permutation"]`` records for
kernels that want to use it (``x[:, perm]`` before the sparse matmul).
"""

from __future__ import annotations

import torch

from ..constraint import Constraint
from ..masks import apply_mask, nm_mask, select_mask
from .base import SolverResult, Stats, register


def ria_score(weight: torch.Tensor, stats: Stats, alpha: float = 0.5) -> torch.Tensor:
    w = weight.abs()
    relative = w / w.sum(dim=1, keepdim=True).clamp_min(1e-30) + w / w.sum(dim=0, keepdim=True).clamp_min(1e-30)
    return relative * stats.sq_norms.sqrt().pow(alpha).unsqueeze(0)


def balanced_permutation(score: torch.Tensor, m: int) -> torch.Tensor:
    """Input-channel order that deals channels, by descending total score, round-robin over the
    ``cols / m`` groups: group g gets the channels ranked g, g + G, g + 2G, ..."""
    cols = score.shape[1]
    groups = cols // m
    order = torch.argsort(score.sum(dim=0), descending=True, stable=True)
    # rank r goes to group r % G, slot r // G  ->  position (r % G) * m + r // G
    ranks = torch.arange(cols, device=score.device)
    position = (ranks % groups) * m + ranks // groups
    perm = torch.empty_like(order)
    perm[position] = order
    return perm


@register("ria", needs_hessian=False, summary="relative importance x ‖X_j‖^0.5 (Zhang et al. 2024)")
def ria(weight: torch.Tensor, stats: Stats, constraint: Constraint, options: dict) -> SolverResult:
    score = ria_score(weight, stats, float(options.get("ria_alpha", 0.5)))
    info: dict = {}
    if constraint.is_nm and options.get("ria_permute", False):
        mask = nm_mask(score, constraint.n, constraint.m)
        kept_natural = float(score[~mask].sum())
        perm = balanced_permutation(score, constraint.m)
        mask_perm = nm_mask(score[:, perm], constraint.n, constraint.m)
        kept_perm = float(score[:, perm][~mask_perm].sum())
        if kept_perm > kept_natural:
            mask = torch.empty_like(mask_perm)
            mask[:, perm] = mask_perm  # back to the original channel order
            info["input_permutation"] = perm.tolist()
        info["permutation_score_gain"] = round(kept_perm / max(kept_natural, 1e-30) - 1, 6)
    else:
        mask = select_mask(score, constraint, scope="row")
    return SolverResult(apply_mask(weight, mask), mask, info)
