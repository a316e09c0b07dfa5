"""SparseGPT (Frantar & Alistarh, 2023): optimal-brain-surgeon pruning with lazy batch updates.

Columns are processed left to right in blocks of ``blocksize``; inside a block each pruned weight's
error is spread over the not-yet-processed columns through the upper Cholesky factor of H⁻¹, and the
block's accumulated error is applied to the rest of the matrix at once. Unstructured masks are chosen
per block from w²/[H⁻¹]²_jj with exact counts (cumulative rounding, so the total is exact): by
default the same count in every output row (scope "row", the comparison group Wanda showed works
best for LLMs; on SmolLM2-135M 50% it lowered WikiText-2 perplexity from 43.5 to 42.2), or one
threshold over the whole block (scope "block", the reference code). N:M masks are chosen every M
columns inside the block: by default the pattern of each group with the least exact cost under the
solver's own updates (:func:`group_mask`), or by independent saliency ranks (``nm_select
"saliency"``, the reference code). For N:M the columns are by default processed in act-order
(decreasing H_jj, whole groups at a time: ``sparsegpt_order``).
"""

from __future__ import annotations

import itertools
import math

import torch

from ..constraint import Constraint
from ..masks import apply_mask, lowest_k, lowest_k_small, n_pruned
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
            # the upper Cholesky factor of H⁻¹ from one factorisation and one triangular inverse: with
            # J the reversal, JHJ = LLᵀ gives H⁻¹ = UᵀU for U = J L⁻¹ J (upper). No explicit H⁻¹ and no
            # second factorisation (cholesky_inverse, LAPACK's potri, measured 18x slower at width 1536)
            flipped = h.flip(0, 1)  # a copy
            flipped.diagonal().add_(damp)
            chol, info = torch.linalg.cholesky_ex(flipped)
            if info.item() == 0:
                eye = torch.eye(h.shape[0], dtype=dtype, device=h.device)
                upper = torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)
                if torch.isfinite(upper).all():
                    notes = {"dampening": dampening * step, "solve_dtype": str(dtype).replace("torch.", "")}
                    if tries:
                        notes["fallback"] = f"Cholesky failed {len(tries)}x ({', '.join(tries)}); used these settings"
                    return upper.to(torch.float32) if dtype == torch.float32 else upper, notes
            tries.append(f"{str(dtype).replace('torch.', '')} damp {dampening * step:g}")
    raise torch.linalg.LinAlgError(f"Cholesky failed at every dampening and in fp64 ({', '.join(tries)})")


def column_order(diag: torch.Tensor, group: int) -> torch.Tensor:
    """Input columns by decreasing H_jj (GPTQ's act-order), groups of ``group`` columns kept together
    and ranked by their sum (so N:M groups stay whole)."""
    score = diag.reshape(-1, group).sum(1) if group > 1 else diag
    ranks = torch.argsort(score, descending=True, stable=True)
    if group == 1:
        return ranks
    return (ranks.unsqueeze(1) * group + torch.arange(group, device=diag.device)).reshape(-1)


def _prepare(stats: Stats, dampening: float, order: str = "natural", group: int = 1):
    """(upper factor of H⁻¹, dead-input mask, notes, column permutation or None), computed once per
    input and cached in ``stats`` so that linears sharing an input (q/k/v, gate/up) share one
    factorisation. With ``order="hessian"`` the factor is of H with its columns permuted."""
    key = ("sparsegpt-factor", dampening, order, group)
    if key not in stats.cache:
        hessian = stats.hessian / max(stats.tokens, 1)
        dead = hessian.diagonal() == 0
        if dead.any():  # inputs that never fire: their weights do nothing, prune them first (as the paper)
            hessian = hessian.clone()
            hessian.diagonal()[dead] = 1.0
        perm = None
        if order == "hessian":
            perm = column_order(hessian.diagonal(), group)
            hessian, dead = hessian[perm][:, perm], dead[perm]
        factor, info = inverse_hessian_factor(hessian, dampening)
        info["dead_inputs"] = int(dead.sum())
        stats.cache[key] = (factor, dead, info, perm)
    return stats.cache[key]


MAX_PATTERNS = 70  # C(8, 4): exact N:M selection up to 4:8; larger groups fall back to saliency ranks


class NMPatterns:
    """Every way to prune ``pruned`` of ``m`` columns: ``mask`` ``[P, m]`` (True = pruned) and
    ``index`` ``[P, pruned]``, the pruned columns of each pattern in order."""

    def __init__(self, m: int, pruned: int, device):
        combos = list(itertools.combinations(range(m), pruned))
        self.index = torch.tensor(combos, device=device)
        self.mask = torch.zeros(len(combos), m, dtype=torch.bool, device=device)
        self.mask.scatter_(1, self.index, True)
        # U_SSᵀ of every pattern as positions in the flattened [m, m] block: [P, k, k]
        self.lower = (self.index.unsqueeze(1) * m + self.index.unsqueeze(2)).reshape(-1)
        self.flat = self.index.reshape(-1)
        self.k = pruned

    @classmethod
    def of(cls, m: int, pruned: int, device) -> NMPatterns | None:
        """None when there are more than :data:`MAX_PATTERNS`."""
        return cls(m, pruned, device) if math.comb(m, pruned) <= MAX_PATTERNS else None


def group_mask(w: torch.Tensor, u: torch.Tensor, patterns: NMPatterns) -> tuple[torch.Tensor, torch.Tensor]:
    """The N:M pattern of one group of ``m`` columns that adds the least to the layer's output error,
    for every row, and the solver's errors e under it (``[m, rows]`` each; e is 0 where kept).
    ``w``: ``[m, rows]``, the group's columns as the solver holds them when it reaches the group;
    ``u``: the group's ``[m, m]`` block of the upper Cholesky factor of H⁻¹.

    The solver prunes column t with error e_t = w_t / u_tt, which adds e_t² to the output error and
    moves the later columns by -e_t·u_t,·; kept columns stay as they are. For a pattern S that is
    w_S = U_SSᵀ e_S, so its exact cost is ‖U_SS⁻ᵀ w_S‖², one small triangular solve per pattern.
    The reference code ranks w_t²/u_tt² independently, as if the group's other pruned columns did
    not move it.
    """
    # (index_select and take: several times faster than advanced indexing on these small tensors)
    k = patterns.k
    lower = u.reshape(-1).take(patterns.lower).view(-1, k, k, 1)  # [P, k, k, 1]: U_SSᵀ
    ws = w.index_select(0, patterns.flat).view(-1, k, w.shape[1])  # [P, k, rows]
    # forward substitution by hand: batched solve_triangular is slow on small CPU problems with threads
    e = [ws[:, 0] / lower[:, 0, 0]]
    cost = e[0].square()
    for t in range(1, ws.shape[1]):
        r = ws[:, t].clone()
        for s in range(t):
            r.sub_(lower[:, t, s] * e[s])
        e.append(r.div_(lower[:, t, t]))
        cost.addcmul_(e[t], e[t])
    best = cost.min(0).indices  # [rows] (argmin along dim 0 is 15x slower on CPU)
    chosen = torch.stack(e, 1).gather(0, best.view(1, 1, -1).expand(1, k, -1)).squeeze(0)  # [k, rows]
    err = torch.zeros_like(w).scatter_(0, patterns.index.index_select(0, best).t(), chosen)
    return patterns.mask.index_select(0, best).t(), err


@register("sparsegpt", needs_hessian=True,
          summary="OBS reconstruction, 128-column lazy blocks (Frantar & Alistarh 2023)",
          rows_apart=lambda constraint, options: constraint.is_nm or options.get("sparsegpt_scope", "row") == "row")
def sparsegpt(weight: torch.Tensor, stats: Stats, constraint: Constraint, options: dict) -> SolverResult:
    blocksize = int(options.get("blocksize", 128))
    dampening = float(options.get("dampening", 0.01))
    scope = options.get("sparsegpt_scope", "row")
    rows, cols = weight.shape
    sub = 16
    if constraint.is_nm:  # N:M groups must not straddle blocks or sub-blocks
        blocksize = max(constraint.m, blocksize // constraint.m * constraint.m)
        sub = max(constraint.m, sub // constraint.m * constraint.m)

    order = options.get("sparsegpt_order", "auto")
    if order == "auto":  # act-order helps N:M (SmolLM2 2:4: 70.17 -> 62.84) but hurts unstructured masks
        order = "hessian" if constraint.is_nm else "natural"  # chosen per block, with equal counts per block
    hinv, dead, info, perm = _prepare(stats, dampening, order, constraint.m if constraint.is_nm else 1)
    info = dict(info, column_order=order)
    patterns = None
    if constraint.is_nm and options.get("nm_select", "exact") == "exact":
        patterns = NMPatterns.of(constraint.m, constraint.m - constraint.n, weight.device)
    if constraint.is_nm:
        info["nm_select"] = "exact" if patterns is not None else "saliency"
    # work on Wᵀ [cols, rows] so that a column of W is a contiguous row here
    Wt = weight.t().to(hinv.dtype)
    Wt = (Wt.index_select(0, perm) if perm is not None else Wt).contiguous()
    Wt[dead] = 0.0
    mask_t = torch.zeros(cols, rows, dtype=torch.bool, device=weight.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = Wt[i1:i2].clone()  # [count, rows]
        Err1 = torch.empty_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        if constraint.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        elif scope == "row":  # every row prunes the same count in every block
            k = n_pruned(i2, constraint.sparsity) - n_pruned(i1, constraint.sparsity)
            mask1 = lowest_k((W1 / d.unsqueeze(1)) ** 2, k, dim=0)
        else:  # one threshold over the block's rows and columns (the reference)
            k = n_pruned(rows * i2, constraint.sparsity) - n_pruned(rows * i1, constraint.sparsity)
            score = (W1 / d.unsqueeze(1)) ** 2
            mask1 = lowest_k(score.reshape(-1), k, dim=0).reshape(count, rows)
        # err = w / d where pruned, 0 where kept (exact N:M groups compute their own errors)
        scale = mask1 / d.unsqueeze(1) if patterns is None else None
        # two levels of lazy updates: rank-1 updates only inside a sub-block of `sub` columns, one
        # matmul for the rest of the block after each sub-block (the same arithmetic, less traffic)
        for j1 in range(0, count, sub):
            j2 = min(j1 + sub, count)
            for i in range(j1, j2, constraint.m if patterns is not None else 1):
                if patterns is not None:  # a whole N:M group at once: its pattern, errors and their update
                    m = constraint.m
                    mask1[i : i + m], Err1[i : i + m] = group_mask(W1[i : i + m], Hinv1[i : i + m, i : i + m], patterns)
                    W1[i:j2].addmm_(Hinv1[i : i + m, i:j2].t(), Err1[i : i + m], alpha=-1.0)
                    continue
                if constraint.is_nm and i % constraint.m == 0:  # saliency ranks (the reference)
                    m = constraint.m
                    score = (W1[i : i + m] / d[i : i + m].unsqueeze(1)) ** 2
                    mask1[i : i + m] = lowest_k_small(score, m - constraint.n)
                    scale[i : i + m] = mask1[i : i + m] / d[i : i + m].unsqueeze(1)
                torch.mul(W1[i], scale[i], out=Err1[i])
                W1[i:j2].addr_(Hinv1[i, i:j2], Err1[i], alpha=-1.0)  # the error onto this sub-block's later columns
            if j2 < count:
                W1[j2:].addmm_(Hinv1[j1:j2, j2:].t(), Err1[j1:j2], alpha=-1.0)
        Wt[i1:i2] = W1
        mask_t[i1:i2] = mask1
        if i2 < cols:
            Wt[i2:].addmm_(hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)

    if perm is not None:  # back to the checkpoint's column order
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        Wt, mask_t = Wt.index_select(0, inverse), mask_t.index_select(0, inverse)
    mask = mask_t.t()
    return SolverResult(apply_mask(Wt.t().to(torch.float32), mask), mask, info)
