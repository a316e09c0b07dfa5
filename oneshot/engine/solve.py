"""Solving one linear: its solver's result (alone, or with the linears that read the same input as
one matrix of stacked rows), the per-linear update, and the pruned weight written into the module in
its stored dtype, with +0.0 in every pruned slot."""

from __future__ import annotations

import torch
from torch import nn

from ..constraint import Constraint
from ..errors import OneshotError
from ..masks import positive_zeros
from ..model.structure import get_weight, set_weight
from ..solvers import SolverResult, SolverSpec, Stats
from ..tensors import all_finite
from ..updates import WEIGHT_UPDATES
from ..updates.weights import update_weight


class LinearSolver:
    """Prunes the linears of one decoder layer, one call of :meth:`solve` each.

    Linears that share an input are solved as one matrix (their rows stacked) when the solver treats
    rows independently: one pass of its column loop instead of one per linear. Which linears share
    an input is known once they ran; ``hints`` (leader -> followers, names relative to the layer,
    from the layer before) lets a leader solve them before they run; each follower's own leader is
    checked when it arrives. ``hints=None`` turns joint solves off.
    """

    def __init__(self, spec: SolverSpec, constraint: Constraint, options: dict, device, *,
                 storage_dtype: torch.dtype | None = None, keep_dense: bool = False,
                 hints: dict[str, list[str]] | None = None, prefix: str = ""):
        self.spec, self.constraint, self.options, self.device = spec, constraint, options, device
        self.storage_dtype = storage_dtype  # the checkpoint's dtype when the layer computes in another
        self.keep_dense = keep_dense  # keep each dense weight (fp32) and mask for the block update
        self.hints, self.prefix = hints, prefix
        self.pending: dict[str, tuple[str, SolverResult]] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.dense: dict[str, torch.Tensor] = {}
        self.permutations: dict[str, torch.Tensor] = {}

    def relative(self, name: str) -> str:
        """``name`` relative to the layer (``self_attn.q_proj``)."""
        return name[len(self.prefix) + 1:] if self.prefix and name.startswith(self.prefix + ".") else name

    def solve(self, name: str, module: nn.Module, leader: str, stats: Stats | None,
              open_linears: dict[str, nn.Module], leaders: dict[str, str]) -> tuple[dict, dict, torch.Tensor]:
        """Prune ``module`` in place; returns its report entry (without timing and error), the solver's
        and the update's notes, and the change ``dense - written`` (fp32, on the compute device).

        ``open_linears``: the layer's linears not solved yet, in order; ``leaders``: every linear's
        leader known so far (for joint solves)."""
        dense = get_weight(module).to(self.device)
        if not all_finite(dense):
            raise OneshotError(f"{name}: the checkpoint's weight holds NaN/Inf values")
        try:
            result = self._result(name, leader, dense, stats, open_linears, leaders)
            weight, info = result.weight, dict(result.info)
            update = self.options.get("update", "none")
            if update in WEIGHT_UPDATES:
                weight, more = update_weight(update, dense, weight, result.mask, stats)
                info.update(more)
        except torch.linalg.LinAlgError as exc:
            raise OneshotError(f"{name}: {exc}") from exc
        if not all_finite(weight):
            raise OneshotError(f"{name}: the {self.spec.name} solve produced NaN/Inf weights")
        if "input_permutation" in info:
            self.permutations[name] = torch.tensor(info.pop("input_permutation"), dtype=torch.int32)
            info["permuted"] = True
        mask_sparsity = float(result.mask.float().mean())
        if self.keep_dense:  # the block update needs both (a whole layer of fp32 weights and masks)
            self.masks[name] = result.mask
            self.dense[name] = dense
        del result  # free the solver's copies before the next ones (streamed layers of big models)
        if self.storage_dtype is not None:  # round to what will be stored, so the layer runs with it
            weight = weight.to(self.storage_dtype)
        set_weight(module, weight)
        del weight
        written = get_weight(module)  # what is stored, after the cast to the model's dtype
        if (torch.signbit(written) & (written == 0)).any():
            written = positive_zeros(written)
            set_weight(module, written)
        zeros = int((written == 0).sum())
        delta = dense.clone() if self.keep_dense else dense
        delta.sub_(written.to(dense.device))
        shape = list(dense.shape)
        entry = {
            "name": name,
            "shape": shape,
            "shared_stats_with": leader if leader != name else None,
            "target_sparsity": self.constraint.sparsity,
            "mask_sparsity": mask_sparsity,
            "sparsity": zeros / (shape[0] * shape[1]),
            "zeros": zeros,
        }
        return entry, info, delta

    def _result(self, name: str, leader: str, dense: torch.Tensor, stats: Stats | None,
                open_linears: dict[str, nn.Module], leaders: dict[str, str]) -> SolverResult:
        """The solver's result for ``name``: solved with its followers as one matrix when it leads
        some that have not run yet, or taken from its leader's joint solve."""
        pending = self.pending.pop(name, None)
        if pending is not None and pending[0] == leader:
            return pending[1]
        if self.hints is None or leader != name:
            return self.spec.fn(dense, stats, self.constraint, self.options)
        known = {n for n, lead in leaders.items() if lead == name and n != name}
        hinted = {f"{self.prefix}.{r}" if self.prefix else r for r in self.hints.get(self.relative(name), [])}
        joint = [n for n, m in open_linears.items() if n != name and n in known | hinted
                 and leaders.get(n, name) == name and get_weight(m).shape[1] == dense.shape[1]]
        if not joint:
            return self.spec.fn(dense, stats, self.constraint, self.options)
        weights = [dense] + [get_weight(open_linears[n]).to(dense.device, dense.dtype) for n in joint]
        result = self.spec.fn(torch.cat(weights), stats, self.constraint, self.options)
        start = 0
        parts = []
        for k, w in enumerate(weights):
            rows = slice(start, start + w.shape[0])
            info = dict(result.info, solved_with=name) if k else dict(result.info)
            parts.append(SolverResult(result.weight[rows], result.mask[rows], info))
            start += w.shape[0]
        del result, weights
        for n, part in zip(joint, parts[1:]):
            self.pending[n] = (name, part)
        return parts[0]
