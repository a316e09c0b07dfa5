"""Mask selection shared by every solver. ``True`` in a mask means *pruned* (set to zero).

Counts are exact: the lowest-scoring ``k`` entries are chosen by index (ties broken by position),
never by a threshold that could catch more or fewer.
"""

from __future__ import annotations

import torch

from .constraint import Constraint


def n_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a ``sparsity`` fraction prunes (rounded to nearest)."""
    return int(round(numel * sparsity))


CHUNK = 1 << 22  # entries per topk call when selecting along the rows of a big matrix


def lowest_k(score: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Boolean mask of the ``k`` smallest entries of ``score`` along ``dim``."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k <= 0:
        return mask
    if score.dim() == 2 and dim in (1, -1) and score.numel() > CHUNK:  # rows are independent: bound the
        step = max(1, CHUNK // score.shape[1])  # topk values and int64 indices to a few MB at a time
        for r in range(0, score.shape[0], step):
            idx = torch.topk(score[r : r + step], k, dim=1, largest=False, sorted=False).indices
            mask[r : r + step].scatter_(1, idx, True)
        return mask
    idx = torch.topk(score, k, dim=dim, largest=False, sorted=False).indices
    return mask.scatter_(dim, idx, True)


def lowest_k_small(score: torch.Tensor, k: int) -> torch.Tensor:
    """``lowest_k(score, k, dim=0)`` for a short first dimension (an N:M group of M rows): each
    entry's rank from pairwise comparisons (ties go to the lower index), which on CPU is several
    times faster than ``topk`` along a strided dimension."""
    m = score.shape[0]
    idx = torch.arange(m, device=score.device)
    earlier = (idx.view(1, m) < idx.view(m, 1)).view(m, m, *([1] * (score.dim() - 1)))  # [j, i]: i before j
    a, b = score.unsqueeze(0), score.unsqueeze(1)  # a[., i] against b[j, .]
    rank = ((a < b) | ((a == b) & earlier)).sum(1)
    return rank < k


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune ``m - n`` of every ``m`` consecutive input columns (last dim) of each row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"input dimension {cols} is not divisible by M={m}")
    groups = score.reshape(rows, cols // m, m)
    return lowest_k(groups, m - n, dim=-1).reshape(rows, cols)


def select_mask(score: torch.Tensor, constraint: Constraint, scope: str = "row") -> torch.Tensor:
    """The mask of the lowest scores that meets ``constraint``.

    ``scope`` is where unstructured sparsity is exact: ``"row"`` (every output row, as Wanda
    compares) or ``"layer"`` (one threshold over the whole matrix, as magnitude pruning does).
    N:M patterns are always per group along the input dimension.
    """
    if constraint.is_nm:
        return nm_mask(score, constraint.n, constraint.m)
    if scope == "row":
        return lowest_k(score, n_pruned(score.shape[1], constraint.sparsity), dim=1)
    if scope == "layer":
        flat = lowest_k(score.reshape(-1), n_pruned(score.numel(), constraint.sparsity), dim=0)
        return flat.reshape(score.shape)
    raise ValueError(f"unknown mask scope {scope!r}")


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` with pruned entries set to +0.0 (never -0.0, which some 2:4 kernels read)."""
    return torch.where(mask, torch.zeros((), dtype=weight.dtype, device=weight.device), weight)


def positive_zeros(weight: torch.Tensor) -> torch.Tensor:
    """Replace every -0.0 by +0.0 (a cast to a narrower dtype can round tiny negatives to -0.0)."""
    return torch.where(weight == 0, torch.zeros((), dtype=weight.dtype, device=weight.device), weight)


def check_constraint(weight: torch.Tensor, constraint: Constraint) -> str | None:
    """``None`` when ``weight`` meets ``constraint``, else a one-line reason (used by tests and verify)."""
    zeros = weight == 0
    if constraint.is_nm:
        rows, cols = weight.shape
        nonzero = (~zeros).reshape(rows, cols // constraint.m, constraint.m).sum(-1)
        bad = int((nonzero > constraint.n).sum())
        return None if bad == 0 else f"{bad} groups of {constraint.m} hold more than {constraint.n} non-zeros"
    want = n_pruned(weight.numel(), constraint.sparsity)
    got = int(zeros.sum())
    return None if got >= want else f"{got} zeros, expected at least {want}"
