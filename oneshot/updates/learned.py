"""``--learn-masks``: during the block refit the N:M masks move too.

Each group of M consecutive input weights of a row holds a score for each of its C(M, N) patterns
(6 for 2:4), started at the solver's pattern (+``KAPPA``, the others 0). Every step the forward uses
the hard pattern (the highest score) and the backward the softmax of the scores at a temperature
annealed from 1 to 0.05 (a straight-through estimator: a slot's pull is its weight times the
gradient of its output), stepped by Adam at a rate that lets a consistent pull carry a pattern at most
two head starts over the refit (:func:`score_lr`). The weights train with it: a slot the solver
pruned starts from its dense value, so a pattern that switches brings back a real weight. The
scores freeze for the last epoch, so the weights settle on the final masks, which are exact N:M by
construction (pruned slots +0.0).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

KAPPA = 1.0  # the solver's pattern's head start
REACH = 2.0  # the scores' Adam step is REACH * KAPPA / (steps that move them): at most twice the head start


def score_lr(moving_steps: int) -> float:
    """Adam moves a parameter by about its learning rate a step: over the steps that move the scores,
    a consistent pull can take a pattern at most ``REACH`` head starts, whatever the schedule's length
    (SmolLM2 at 32 windows, 4 epochs: 42 steps, 0.048)."""
    return REACH * KAPPA / max(moving_steps, 1)


def patterns(n: int, m: int) -> torch.Tensor:
    """[C(m, n), m] 0/1: every way to keep ``n`` weights of a group of ``m`` (N:M keeps N)."""
    rows = [[1.0 if j in keep else 0.0 for j in range(m)] for keep in itertools.combinations(range(m), n)]
    return torch.tensor(rows)


class NMMask:
    """One linear's learnable N:M mask: ``weight`` (the full matrix, a leaf) and ``scores``."""

    def __init__(self, module: nn.Linear, pruned: torch.Tensor, dense: torch.Tensor, keep: int, m: int):
        out_f, in_f = module.weight.shape
        self.module, self.m = module, m
        self.table = patterns(keep, m).to(module.weight.device)  # [P, m]
        kept = (~pruned).to(module.weight.device).float().view(out_f, in_f // m, m)
        # the solver's pattern in each group: the one that agrees with every kept slot
        match = torch.einsum("ogm,pm->ogp", kept, self.table) + torch.einsum("ogm,pm->ogp", 1 - kept, 1 - self.table)
        start = match.argmax(-1)
        self.scores = torch.zeros(out_f, in_f // m, self.table.shape[0], device=module.weight.device)
        self.scores.scatter_(-1, start.unsqueeze(-1), KAPPA)
        self.scores.requires_grad_(True)
        with torch.no_grad():
            full = torch.where(pruned.to(module.weight.device), dense.to(module.weight), module.weight.detach())
        self.weight = full.clone().requires_grad_(True)
        self.start = start

    def hard(self) -> torch.Tensor:
        """[out, in] 0/1 of the current highest-scoring patterns."""
        pick = self.scores.detach().argmax(-1)
        return self.table[pick].view(self.weight.shape)

    def effective(self, tau: float) -> torch.Tensor:
        """The weight the forward uses: hard pattern forward, softmax(scores / tau) backward."""
        soft = torch.softmax(self.scores / tau, dim=-1) @ self.table  # [out, groups, m]
        soft = soft.view(self.weight.shape)
        hard = self.hard()
        return self.weight * (hard + soft - soft.detach())

    def final(self) -> torch.Tensor:
        """The weight with the hard masks, +0.0 where pruned."""
        with torch.no_grad():
            return (self.weight * self.hard()).masked_fill(self.hard() == 0, 0.0)

    def changed(self) -> float:
        """Fraction of groups whose pattern is not the solver's."""
        return float((self.scores.detach().argmax(-1) != self.start).float().mean())


def learnable(linears: dict[str, nn.Module], masks: dict[str, torch.Tensor], dense: dict[str, torch.Tensor],
              keep: int, m: int) -> dict[str, NMMask]:
    """The linears whose masks can move: plain ``nn.Linear`` [out, in] weights whose input width is a
    multiple of M, with their dense weights at hand (others keep the solver's masks)."""
    out = {}
    for name, module in linears.items():
        if isinstance(module, nn.Linear) and name in dense and module.weight.shape[1] % m == 0:
            out[name] = NMMask(module, masks[name], dense[name], keep, m)
    return out


def temperature(step: int, total: int) -> float:
    """Annealed geometrically from 1 to 0.05 over the steps that move the scores."""
    return math.exp(math.log(0.05) * min(1.0, step / max(total - 1, 1)))


def learn_options(block: dict, solver) -> dict | None:
    """``--learn-masks``: what the refit needs to move a layer's N:M masks (its dense weights, from the
    solver that pruned it), or None (not asked, or not N:M)."""
    if not block.get("learn_masks") or solver is None or not solver.constraint.is_nm:
        return None
    dense = {name: w for name, w in solver.dense.items() if name not in solver.permutations}
    return {"n": solver.constraint.n, "m": solver.constraint.m, "dense": dense}
