"""SparseGPT (Frantar & Alistarh, 2023): optimal-brain-surgeon pruning with lazy batch updates.

Columns are processed left to right in blocks of ``blocksize``; inside a block each pruned weight's
error is spread over the not-yet-processed columns through the upper Cholesky factor of H⁻¹, and the
block's accumulated error is applied to the rest of the matrix at once. Unstructured masks are chosen
per block from w²/[H⁻¹]²_jj (exact count per block, cumulative rounding so the layer total is exact);
N:M masks are chosen every M columns inside the block.
"""

from __future__ import annotations

import torch

from ..config import Constraint
from ..masks import apply_mask, lowest_k, n_pruned
from .base import SolverResult, Stats, register

DAMP_STEPS = (1.0, 10.0, 100.0)


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, dict]:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = dampening · mean(diag H).

    A failed factorisation retries with 10× and 100× the dampening, then all of that again in fp64.
    Raises if every attempt fails: the identity is never substituted.
    """
    mean_diag = hessian.diagonal().mean().item()
    tries = []
    for dtype in (torch.float32, torch.float64):
        h = hessian.to(dtype)
        for step in DAMP_STEPS:
            damp = dampening * step * mean_diag
            hd = h.clone()
            hd.diagonal().add_(damp)
            chol, info = torch.linalg.cholesky_ex(hd)
            if info.item() == 0:
                inv = torch.cholesky_inverse(chol)
                upper, info = torch.linalg.cholesky_ex(inv, upper=True)
                if info.item() == 0 and torch.isfinite(upper).all():
                    notes = {"dampening": dampening * step, "solve_dtype": str(dtype).replace("torch.", "")}
                    if tries:
                        notes["fallback"] = f"Cholesky failed {len(tries)}x ({', '.join(tries)}); used these settings"
                    return upper.to(torch.float32) if dtype == torch.float32 else upper, notes
            tries.append(f"{str(dtype).replace('torch.', '')} damp {dampening * step:g}")
    raise torch.linalg.LinAlgError(f"Cholesky failed at every dampening and in fp64 ({', '.join(tries)})")


@register("sparsegpt", needs_hessian=True, summary="OBS reconstruction, 128-column lazy blocks (Frantar & Alistarh 2023)")
def sparsegpt(weight: torch.Tensor, stats: Stats, constraint: Constraint, options: dict) -> SolverResult:
    blocksize = int(options.get("blocksize", 128))
    dampening = float(options.get("dampening", 0.01))
    rows, cols = weight.shape
    if constraint.is_nm:  # N:M groups must not straddle blocks
        blocksize = max(constraint.m, blocksize // constraint.m * constraint.m)

    hessian = stats.hessian / max(stats.tokens, 1)
    W = weight.clone().to(torch.float32)
    dead = hessian.diagonal() == 0
    if dead.any():  # inputs that never fire: their weights do nothing, prune them first (as the paper)
        hessian = hessian.clone()
        hessian.diagonal()[dead] = 1.0
        W[:, dead] = 0.0
    hinv, info = inverse_hessian_factor(hessian, dampening)
    W = W.to(hinv.dtype)
    info["dead_inputs"] = int(dead.sum())

    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if not constraint.is_nm:
            k = n_pruned(rows * i2, constraint.sparsity) - n_pruned(rows * i1, constraint.sparsity)
            score = (W1 / d.unsqueeze(0)) ** 2
            mask1 = lowest_k(score.reshape(-1), k, dim=0).reshape(rows, count)
        for i in range(count):
            if constraint.is_nm and i % constraint.m == 0:
                score = (W1[:, i : i + constraint.m] / d[i : i + constraint.m].unsqueeze(0)) ** 2
                mask1[:, i : i + constraint.m] = lowest_k(score, constraint.m - constraint.n, dim=1)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros((), dtype=w.dtype, device=w.device), w)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:].sub_(err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:].sub_(Err1 @ hinv[i1:i2, i2:])

    return SolverResult(apply_mask(W.to(torch.float32), mask), mask, info)
