"""Group OBS: remove groups of a linear's input columns at the least output error on the calibration
inputs, and refit the kept columns (least squares, through the inverse Hessian)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def inverse_hessian(hessian: torch.Tensor, dampening: float = 0.01) -> torch.Tensor:
    """``(H + λI)⁻¹`` in float64 for accuracy, λ = ``dampening`` · mean(diag H); dead inputs (a zero
    diagonal) get 1 on the diagonal as SparseGPT does. Retries with 10× and 100× the dampening. Two
    float64 copies of H at most (an 8192-wide MLP: 0.5 GB each)."""
    h = hessian.to(torch.float64, copy=True)
    diagonal = h.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    mean = float(diagonal.mean())
    added = 0.0
    for step in (1.0, 10.0, 100.0):
        diagonal.add_(dampening * step * mean - added)
        added = dampening * step * mean
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            del h
            return torch.cholesky_inverse(chol)
        del chol
    raise torch.linalg.LinAlgError("the Hessian could not be factorised at any dampening")


def output_energy(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(W H Wᵀ)``: the squared output of ``W`` summed over the calibration tokens, in float32 a
    block of rows at a time (no float64 copy of H)."""
    h = hessian.to(torch.float32)
    total = 0.0
    for rows in weight.split(1024):
        r = rows.to(h.device, torch.float32)
        total += float(((r @ h) * r).sum(dtype=torch.float64))
    return total


@dataclass
class GroupRemoval:
    weight: torch.Tensor  # the consumer's weight with the removed groups' columns zero, the rest compensated
    removed: list[int]  # group indices, in the order they were removed
    error: float  # tr(ΔW H ΔWᵀ) of the whole change, on the (undamped) calibration Hessian
    baseline: float  # tr(W H Wᵀ): the output energy, so error / baseline is the relative output error


def group_errors(weight: torch.Tensor, hinv: torch.Tensor, group: int, candidates: torch.Tensor) -> torch.Tensor:
    """OBS cost of removing each candidate group alone: ``tr(W_G [H⁻¹]_GG⁻¹ W_Gᵀ)`` (for single columns
    ``‖W_j‖² / [H⁻¹]_jj``). Only the diagonal blocks of ``H⁻¹`` are read."""
    if group == 1:
        return (weight[:, candidates] ** 2).sum(0) / hinv.diagonal()[candidates]
    m = hinv.shape[0] // group
    diag = hinv.reshape(m, group, m, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1)[candidates]  # [c, g, g]
    w = weight.reshape(weight.shape[0], m, group)[:, candidates, :].permute(1, 2, 0)  # [c, g, d_out]
    solved = torch.linalg.solve(diag, w)
    return (w * solved).sum(dim=(1, 2))


def remove_groups(weight: torch.Tensor, hessian: torch.Tensor, group: int, count: int, dampening: float = 0.01,
                  steps: int = 64, choose=None, forced: list[int] | None = None) -> GroupRemoval:
    """Remove ``count`` groups of ``group`` adjacent columns from ``weight`` [d_out, n] greedily by OBS
    cost, compensating the kept columns. ``steps``: at most this many greedy steps (each removes
    ``ceil(count / steps)`` groups; 1 group per step when ``count <= steps``). ``choose(errors,
    alive)``: which of the alive groups to remove in one step (default: the cheapest ones), for
    constraints such as "one query head from every key/value group". ``forced``: remove exactly these
    (no choice: only the compensation)."""
    w = weight.to(torch.float64).clone()
    n = w.shape[1]
    if n % group:
        raise ValueError(f"{n} columns are not a whole number of groups of {group}")
    m = n // group
    if not 0 <= count <= m:
        raise ValueError(f"cannot remove {count} of {m} groups")
    hinv = inverse_hessian(hessian, dampening)
    alive = torch.ones(m, dtype=torch.bool, device=w.device)
    removed: list[int] = []
    per_step = max(1, math.ceil(count / max(1, steps)))
    todo = list(forced) if forced is not None else None
    while len(removed) < count:
        take = min(per_step, count - len(removed))
        candidates = alive.nonzero().squeeze(1)
        if todo is not None:
            chosen = todo[:take]
            todo = todo[take:]
        else:
            errors = group_errors(w, hinv, group, candidates)
            chosen = (choose(errors, candidates) if choose is not None
                      else candidates[torch.argsort(errors)[:take]].tolist())
        if not chosen:
            raise ValueError("nothing left to remove under the constraint")
        cols = (torch.tensor(chosen, device=w.device)[:, None] * group
                + torch.arange(group, device=w.device)).reshape(-1)
        block = hinv[cols][:, cols]
        update = torch.linalg.solve(block, hinv[cols, :])  # [|S|, n]
        w -= w[:, cols] @ update
        hinv -= hinv[:, cols] @ update
        w[:, cols] = 0.0
        hinv[cols, :] = 0.0
        hinv[:, cols] = 0.0
        alive[chosen] = False
        removed.extend(int(c) for c in chosen)
    del hinv
    error = output_energy(weight.to(torch.float64) - w, hessian)
    return GroupRemoval(w.to(weight.dtype), removed, error, output_energy(weight, hessian))
