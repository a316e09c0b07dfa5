"""One decoder layer being pruned: hooks on its linears that gather statistics, solve, and measure.

By default (``sequential="layer"``) the loop first runs the windows through the dense layer inside
:meth:`LayerPruner.collecting`, where the hooks only gather statistics, then calls
:meth:`LayerPruner.solve_all`. With ``sequential="linear"`` each linear is pruned in its pre-hook
just before it first runs: a leader whose statistics are still incomplete stops the forward of its
batch there (:class:`StopForward`); when the last batch completes them the linear is solved and that
batch goes on, through the pruned linear, to the next unsolved one. So each linear sees inputs
produced by the already-pruned linears before it, and with one batch the whole layer is pruned and
propagated in a single forward pass. Inside :meth:`LayerPruner.paused` the hooks do nothing (the
block update's and the dense stream's own forwards).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from ..constraint import Constraint
from ..errors import OneshotError
from ..masks import positive_zeros
from ..model.experts import ExpertMatrix
from ..model.structure import get_weight, set_weight
from .capture import StopForward
from .error import ErrorMeter
from .solve import LinearSolver
from .statistics import LayerStatistics

PRUNE, COLLECT, PAUSED = "prune", "collect", "paused"


class LayerPruner:
    """Forward hooks on the linears of one decoder layer (see the module docstring); use it as a
    context manager so the hooks are removed whatever happens."""

    def __init__(self, linears: dict[str, nn.Module], spec, constraint: Constraint, options: dict,
                 nbatches: int, device, error_tokens: int, *, needs_stats: bool | None = None,
                 needs_hessian: bool | None = None,
                 heldout_from: int | None = None, storage_dtype: torch.dtype | None = None,
                 keep_dense: bool = False, group=None, error_from_hessian: bool = False,
                 followers: dict[str, list[str]] | None = None, prefix: str = ""):
        self.linears, self.spec, self.device, self.group = linears, spec, device, group
        needs_hessian = spec.needs_hessian if needs_hessian is None else needs_hessian
        self.needs_stats = spec.needs_stats if needs_stats is None else needs_stats
        self.stats = LayerStatistics(needs_hessian, nbatches, heldout_from)
        joint = spec.rows_apart is not None and spec.rows_apart(constraint, options) and group is None
        self.solver = LinearSolver(spec, constraint, options, device, storage_dtype=storage_dtype,
                                   keep_dense=keep_dense, hints=(followers or {}) if joint else None, prefix=prefix)
        self.errors = ErrorMeter(linears, device, error_tokens)
        self.storage_dtype = storage_dtype
        # the solve's Hessian holds exactly the inputs the pruned linear will see (--sequential linear, no
        # held-out windows): its output error over every token is tr(ΔHΔᵀ), no forward hook needed
        self.error_from_hessian = error_from_hessian and needs_hessian and heldout_from is None
        self.entries: dict[str, dict] = {}
        self.solve_seconds = 0.0
        self.mode = PRUNE
        self.only: set[str] | None = None  # when set, the pre-hooks gather statistics for these names only
        self.extra: dict[str, dict] = {}  # more for a linear's report entry
        self.handles = []
        for name, module in linears.items():
            if self.needs_stats:
                self.handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self.handles.append(module.register_forward_hook(self._error_hook(name)))

    # -- modes
    @contextlib.contextmanager
    def _mode(self, mode: str):
        before, self.mode = self.mode, mode
        try:
            yield self
        finally:
            self.mode = before

    def collecting(self):
        """Forwards inside gather statistics from the dense layer and solve nothing."""
        return self._mode(COLLECT)

    def paused(self):
        """Forwards inside are ignored by every hook."""
        return self._mode(PAUSED)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # -- hooks
    def start_batch(self, window_offset: int = 0) -> None:
        self.stats.start_batch(window_offset)

    def _pre_hook(self, name):
        def hook(module, args):
            if self.mode == PAUSED or (self.only is not None and name not in self.only):
                return None
            x = args[0]
            if name in self.entries:  # solved: runs pruned
                if self.stats.leader[name] == name:
                    self.stats.seen(x, name)
                return None
            leader = self.stats.leader_of(name, x)
            if leader == name:
                self.stats.add(name, x)
                self.stats.seen(x, name)
                if self.mode == COLLECT:
                    return None
                if not self.stats.complete(name):
                    raise StopForward
            elif self.mode == COLLECT:
                return None
            elif not self.stats.complete(leader):  # cannot happen: followers appear with complete leaders
                raise RuntimeError(f"{name}: statistics of {leader} incomplete")
            self.solve(name, module)
            return None

        return hook

    def _error_hook(self, name):
        def hook(module, args, output):
            if self.mode != PAUSED:
                self.errors.measure(name, module, args[0], output)

        return hook

    # -- solving
    def solve(self, name: str, module: nn.Module) -> None:
        t = time.perf_counter()
        leader = self.stats.leader.get(name, name)
        stats = self.stats.stats.get(leader)
        open_linears = {n: m for n, m in self.linears.items() if n not in self.entries}
        entry, info, delta = self.solver.solve(name, module, leader, stats, open_linears, self.stats.leader)
        hessian = stats.hessian if stats is not None and self.error_from_hessian else None
        self.errors.record(name, delta, module, hessian, stats.tokens if stats is not None else 0,
                           self.storage_dtype or module.weight.dtype)
        del delta
        elapsed = time.perf_counter() - t
        self.solve_seconds += elapsed
        entry["seconds"] = round(elapsed, 4)
        entry["tokens"] = stats.tokens if stats is not None else 0
        if isinstance(module, ExpertMatrix):
            entry.update(expert=module.index, matrix=module.param, tensor=name.rsplit(".", 2)[0] + "." + module.param,
                         **({"transposed": True} if module.transposed else {}))
        entry.update(info)
        self.entries[name] = entry

    def _release(self, leader: str) -> None:
        """Free a leader's statistics once every linear that reads them is solved (a layer of 128
        experts holds 2.4 GB of Hessians at Qwen3-30B-A3B's sizes). Only after a statistics pass, when
        every linear's leader is known."""
        sharing = [n for n, lead in self.stats.leader.items() if lead == leader]
        if all(n in self.entries for n in sharing) and (leader in self.entries or leader not in self.linears):
            self.stats.stats.pop(leader, None)

    def solve_all(self, names=None) -> None:
        """Solve every linear (or those in ``names``) now: with no statistics (magnitude) or after a
        :meth:`collecting` pass."""
        names = [n for n in self.linears if n not in self.entries and (names is None or n in names)]
        for name in names:
            if self.needs_stats and name not in self.stats.leader:
                raise OneshotError(f"{name}: never ran in the layer's forward pass; --ignore them")
        if self.group is not None:
            self._solve_distributed(names)
            return
        for name in names:
            self.solve(name, self.linears[name])
            self._release(self.stats.leader.get(name, name))

    def _solve_distributed(self, names: list[str]) -> None:
        """Sum every leader's statistics over the ranks, solve linear k on rank k mod world, and
        broadcast each pruned weight and its report entry from its owner."""
        group = self.group
        self.stats.all_reduce(group)
        for k, name in enumerate(names):
            if k % group.world == group.rank:
                self.solve(name, self.linears[name])
        for k, name in enumerate(names):
            owner, module = k % group.world, self.linears[name]
            dense = None if owner == group.rank else get_weight(module)
            weight = module.weight.data.to(torch.float32).contiguous()  # gloo has no bfloat16
            group.broadcast(weight, owner)
            entry, perm = group.broadcast_object((self.entries.get(name), self.solver.permutations.get(name)), owner)
            if dense is None:
                continue
            module.weight.data.copy_(weight.to(module.weight.dtype))
            self.entries[name] = entry
            if perm is not None:
                self.solver.permutations[name] = perm
            self.errors.expect(name, (dense - get_weight(module)).to(self.storage_dtype or module.weight.dtype))

    def refresh(self) -> None:
        """After the block update changed the weights: clean zeros, new changes and sparsities."""
        for name, module in self.linears.items():
            written = positive_zeros(get_weight(module))
            set_weight(module, written)
            delta = self.solver.dense[name] - written.to(self.solver.dense[name].device)
            self.errors.expect(name, delta.to(self.storage_dtype or module.weight.dtype))
            self.entries[name]["sparsity"] = float((written == 0).float().mean())
            self.entries[name]["zeros"] = int((written == 0).sum())

    # -- results
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self.solver.masks

    @property
    def permutations(self) -> dict[str, torch.Tensor]:
        return self.solver.permutations

    def followers_map(self) -> dict[str, list[str]]:
        """leader -> followers among this layer's linears, relative to the layer (the next layer's hint)."""
        return self.stats.followers(self.solver.relative)

    def report(self) -> list[dict]:
        results = self.errors.results(self.group)
        out = []
        for name in self.linears:
            entry = self.entries[name]
            entry["relative_error"], entry["error_tokens"] = results[name]
            entry.update(self.extra.get(name, {}))
            out.append(entry)
        return out
