"""Input statistics of one decoder layer's linears, accumulated in fp32 over every calibration batch.

One accumulator per distinct input: the first linear to read an input tensor is its *leader*; a
linear that reads the very same tensor object in the same forward (k/v after q, up after gate) is a
follower and shares its statistics (one Hessian, one factorisation). A leader's statistics are
complete once every calibration batch has passed through it.
"""

from __future__ import annotations

import time
import weakref

import torch

from ..errors import OneshotError
from ..solvers import Stats
from ..tensors import all_finite


def hessian_blocks(dim: int) -> list[int]:
    """Block edges for accumulating H = xᵀx by its lower block triangle only: about 384 columns a
    block, at most 4 blocks (10 of 16 blocks' flops); narrower inputs use one block. Speed against one
    full product: ``benchmarks/hessian_blocks.py``."""
    nb = max(1, min(4, round(dim / 384)))
    return [dim * i // nb for i in range(nb + 1)]


def accumulate_hessian(hessian: torch.Tensor, x: torch.Tensor) -> None:
    """H += xᵀx (fp32), filling only the diagonal blocks and those below them; :func:`finish_hessian`
    mirrors the rest once at the end."""
    edges = hessian_blocks(x.shape[1])
    for a in range(len(edges) - 1):
        xa = x[:, edges[a] : edges[a + 1]]
        for b in range(a + 1):
            xb = x[:, edges[b] : edges[b + 1]]
            hessian[edges[a] : edges[a + 1], edges[b] : edges[b + 1]].addmm_(xa.t(), xb)


def finish_hessian(hessian: torch.Tensor) -> None:
    edges = hessian_blocks(hessian.shape[0])
    for a in range(len(edges) - 1):
        for b in range(a):
            hessian[edges[b] : edges[b + 1], edges[a] : edges[a + 1]] = hessian[edges[a] : edges[a + 1],
                                                                                edges[b] : edges[b + 1]].t()


def new_stats(dim: int, device, hessian: bool) -> Stats:
    return Stats(
        tokens=0,
        sq_norms=torch.zeros(dim, dtype=torch.float32, device=device),
        hessian=torch.zeros(dim, dim, dtype=torch.float32, device=device) if hessian else None,
        sums=torch.zeros(dim, dtype=torch.float32, device=device),
    )


def add_inputs(st: Stats, x: torch.Tensor) -> None:
    """Add a batch of inputs ``[..., dim]`` to ``st``."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if x.shape[0] == 0:
        return
    st.tokens += x.shape[0]
    st.sums.add_(x.sum(0))
    if st.hessian is not None:
        accumulate_hessian(st.hessian, x)
    else:
        st.sq_norms.add_((x * x).sum(0))


def check_finite_weights(module: torch.nn.Module, prefix: str) -> None:
    """NaN/Inf where it first appears: a weight of the checkpoint, named, before any input is blamed."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and tensor.numel() and not all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise OneshotError(f"{prefix}.{name}: the checkpoint holds {bad} NaN/Inf value(s) in this weight; "
                               "the checkpoint is damaged: download or convert it again")


def overflow_advice(dtype: torch.dtype) -> str:
    """What to try when activations overflow in ``dtype``."""
    if dtype in (torch.float16, torch.bfloat16):
        return f"in {str(dtype).replace('torch.', '')}: try --dtype float32"
    return ("even in float32: the checkpoint is probably damaged or not a model of this architecture; "
            "oneshot verify / a forward pass with transformers will show the same")


def finish_stats(st: Stats) -> None:
    if st.hessian is not None:
        finish_hessian(st.hessian)
        st.sq_norms = st.hessian.diagonal().clone()


class LayerStatistics:
    """Leaders, followers and the statistics of each leader's input, for one decoder layer.

    ``heldout_from``: windows from this index on are held out (they only judge updates) and go to
    each leader's ``Stats.heldout`` instead.
    """

    def __init__(self, needs_hessian: bool, nbatches: int, heldout_from: int | None = None):
        self.needs_hessian, self.nbatches, self.heldout_from = needs_hessian, nbatches, heldout_from
        self.leader: dict[str, str] = {}
        self.stats: dict[str, Stats] = {}
        self.batches_in: dict[str, int] = {}
        self.inputs: list[tuple[weakref.ref, str]] = []  # this forward's leader inputs (not kept alive)
        self.window_offset = 0
        self.seconds = 0.0  # host time spent accumulating (the profile's "statistics")

    def start_batch(self, window_offset: int = 0) -> None:
        self.inputs.clear()
        self.window_offset = window_offset

    def leader_of(self, name: str, x: torch.Tensor) -> str:
        """``name``'s leader: fixed the first time it runs, by the identity of the tensor it reads."""
        leader = self.leader.get(name)
        if leader is None:
            leader = next((lead for t, lead in self.inputs if t() is x), name)
            self.leader[name] = leader
        return leader

    def seen(self, x: torch.Tensor, name: str) -> None:
        """Leader ``name`` read ``x`` in this forward (its followers will read the same object)."""
        self.inputs.append((weakref.ref(x), name))

    def complete(self, name: str) -> bool:
        return self.batches_in.get(name, 0) >= self.nbatches

    def add(self, name: str, x: torch.Tensor) -> None:
        t = time.perf_counter()
        try:
            self._add(name, x)
        finally:
            self.seconds += time.perf_counter() - t

    def _add(self, name: str, x: torch.Tensor) -> None:
        st = self.stats.get(name)
        if st is None:
            st = self.stats[name] = new_stats(x.shape[-1], x.device, self.needs_hessian)
            if self.heldout_from is not None:
                st.heldout = new_stats(x.shape[-1], x.device, self.needs_hessian)
            self.batches_in[name] = 0
        if self.heldout_from is not None and x.dim() == 3:  # [windows, seq, dim]: split off held-out windows
            k = max(0, min(x.shape[0], self.heldout_from - self.window_offset))
            add_inputs(st, x[:k])
            add_inputs(st.heldout, x[k:])
        else:
            add_inputs(st, x)
        self.batches_in[name] += 1
        if self.batches_in[name] == self.nbatches:
            finish_stats(st)
            if st.heldout is not None:
                finish_stats(st.heldout)
            if not all_finite(st.sq_norms):
                raise OneshotError(f"{name}: its inputs hold NaN/Inf (the layer's weights are finite, so its "
                                   f"activations overflow {overflow_advice(x.dtype)})")

    def close(self) -> None:
        """After a statistics pass: finish every leader that missed some batches (an expert the router
        sent no token in a batch runs in fewer batches than the layer)."""
        for name, st in self.stats.items():
            if self.batches_in[name] < self.nbatches:
                self.batches_in[name] = self.nbatches
                finish_stats(st)
                if st.heldout is not None:
                    finish_stats(st.heldout)

    def forget(self, names) -> None:
        """Drop the statistics of ``names`` (to gather them again another way)."""
        for name in names:
            self.stats.pop(name, None)
            self.batches_in.pop(name, None)

    def all_reduce(self, group) -> None:
        """Sum every leader's statistics over the ranks of a torch.distributed group."""
        for name in sorted(self.stats):
            st = self.stats[name]
            tokens = torch.tensor([float(st.tokens)], dtype=torch.float64)
            group.all_reduce(tokens)
            st.tokens = int(tokens.item())
            group.all_reduce(st.sums)
            if st.hessian is not None:
                group.all_reduce(st.hessian)
                st.sq_norms = st.hessian.diagonal().clone()
            else:
                group.all_reduce(st.sq_norms)

    def followers(self, relative) -> dict[str, list[str]]:
        """leader -> followers, names passed through ``relative`` (the next layer's joint-solve hint)."""
        out: dict[str, list[str]] = {}
        for n, lead in self.leader.items():
            if lead != n:
                out.setdefault(relative(lead), []).append(relative(n))
        return out
