"""The layer-by-layer loop. Knows nothing about any one solver.

1. capture what every decoder layer receives (hidden states of layer 0; for each layer its own
   positional and keyword arguments: masks, position embeddings, positions) by running the model
   once per batch with the layers replaced by recorders that pass hidden states through;
2. for each layer: onload it; forward the windows through it with a pre-hook on every linear
   (:class:`_LayerPruner`) gathering fp32 statistics of its input (one shared Hessian for linears
   that read the same input tensor); solve every linear; forward the windows again through the
   *pruned* layer to make the next layer's inputs, measuring each linear's output error on the way;
   offload it. With ``sequential="linear"`` each linear is instead solved in its pre-hook as soon as
   its statistics are complete, so later linears see pruned inputs and one pass can do it all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import Constraint, OneshotError
from .masks import positive_zeros
from .memory import free_memory, reuse_host_heap
from .model_io import find_decoder_layers, find_linears, get_weight, is_linear, linear_shape, set_weight
from .solvers import SOLVERS, SolverResult, Stats
from .solvers.update import update_weight

ERROR_TOKENS = 2048  # the forward hook measures each linear's output error on this many calibration tokens


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during capture: records its inputs, passes them on."""

    def __init__(self, index: int, sink: list, last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.sink.append((self.index, hidden, rest, kwargs))
        if self.last:
            raise _StopForward
        return hidden


@dataclass
class Captured:
    """Per batch: the hidden states entering the current layer, and every layer's own (args, kwargs)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    layer_args: list[list[tuple[tuple, dict]]] = field(default_factory=list)



def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``: one fp32 sum (NaN and Inf propagate into it) instead of a mask pass; the
    full check only when the sum is not finite (an overflowing sum of finite values)."""
    if bool(torch.isfinite(torch.sum(t, dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())

def _to(obj, device, dtype: torch.dtype | None = None):
    """``obj`` (tensors, nested in tuples, lists and dicts) on ``device``; floating tensors also cast
    to ``dtype`` when it is given (the compute dtype of a layer run in another dtype than stored)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


class LayerIO:
    """Where the engine's decoder layers come from and where they go once pruned. This one keeps the
    whole model in memory; :class:`oneshot.stream.StreamIO` reads each layer from the checkpoint's
    safetensors shards when it is needed and frees it once it is written."""

    streaming = False

    def prepare(self, model, device) -> None:
        """Before capture: everything outside the decoder layers on the compute device."""
        model.to(device)

    def captured(self, model) -> None:
        """After capture: what sits outside the decoder layers is no longer needed."""

    def load(self, i: int, layer: nn.Module, device) -> None:
        layer.to(device)

    def release(self, i: int, layer: nn.Module, device) -> None:
        if device.type != "cpu":
            layer.to("cpu")

    def finish(self, model) -> None:
        model.to("cpu")


@torch.no_grad()
def capture_inputs(model, layers: nn.ModuleList, batches: list[torch.Tensor], device, store,
                   io: LayerIO | None = None) -> Captured:
    """Run the model with recorders in place of its layers; returns what each layer receives."""
    io = io or LayerIO()
    originals = list(layers)
    sink: list = []
    for i in range(len(layers)):
        layers[i] = _Recorder(i, sink, last=i == len(layers) - 1)
    captured = Captured()
    try:
        io.prepare(model, device)  # only embeddings, rotary tables and norms are left: the layers are recorders
        for ids in batches:
            sink.clear()
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
            if len(sink) != len(layers):
                raise OneshotError(
                    f"{type(model).__name__}: {len(sink)} of {len(layers)} decoder layers were called during a "
                    "forward pass; this layout is not supported"
                )
            captured.hidden.append(sink[0][1].to(store))
            captured.layer_args.append([(_to(rest, store), _to(kw, store)) for _, _, rest, kw in sink])
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return captured


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
            hessian[edges[b] : edges[b + 1], edges[a] : edges[a + 1]] = hessian[edges[a] : edges[a + 1], edges[b] : edges[b + 1]].t()


class _LayerPruner:
    """Forward pre-hooks on the linears of one decoder layer: statistics, solving, output error.

    By default (``sequential="layer"``) the engine first runs a ``collect_only`` pass, in which the
    hooks only gather statistics from the dense layer, then calls :meth:`solve_all`. With
    ``sequential="linear"`` each linear is pruned in its pre-hook just before it first runs:

    Statistics belong to a *leader*: the first linear to read a given input tensor. A linear that
    reads the very same tensor object in the same forward (k/v after q, up after gate) is its
    follower and shares its statistics (one Hessian, one factorisation). A leader's statistics are
    complete once every calibration batch has passed through it; until then the forward of a batch
    stops right there (``_StopForward``). When the last batch completes them the linear is solved
    and that batch goes on, through the pruned linear, to the next unsolved one. So each linear
    sees inputs produced by the already-pruned linears before it (true sequential pruning), and with
    one batch the whole layer is pruned and propagated in a single forward pass.
    """

    def __init__(self, linears: dict[str, nn.Module], spec, constraint: Constraint, options: dict,
                 nbatches: int, device, error_tokens: int, *, needs_hessian: bool | None = None,
                 heldout_from: int | None = None, storage_dtype: torch.dtype | None = None,
                 keep_dense: bool = False, group=None, error_from_hessian: bool = False,
                 followers: dict[str, list[str]] | None = None, prefix: str = ""):
        self.linears, self.spec, self.constraint, self.options = linears, spec, constraint, options
        self.nbatches, self.device, self.error_tokens = nbatches, device, error_tokens
        self.needs_hessian = spec.needs_hessian if needs_hessian is None else needs_hessian
        self.heldout_from = heldout_from  # windows from this index on are held out (judge updates only)
        self.storage_dtype = storage_dtype  # the checkpoint's dtype when the layer computes in another
        self.keep_dense = keep_dense  # keep each dense weight (fp32) for refresh() after the block update
        self.group = group  # torch.distributed: statistics summed, linears solved round robin (oneshot.distributed)
        self.window_offset = 0
        # linears that read one input are solved as one matrix (their rows stacked) when the solver
        # treats rows independently: one pass of its column loop instead of one per linear. Which
        # linears share an input is known once they ran; `followers` (leader -> followers, names
        # relative to the layer, from the layer before) lets a leader solve them before they run, and
        # each follower checks on arrival that it really reads its leader's input.
        rows_apart = spec.rows_apart is not None and spec.rows_apart(constraint, options)
        self.followers = (followers or {}) if rows_apart and group is None else None
        self.prefix = prefix
        self.pending: dict[str, tuple[str, SolverResult]] = {}
        # the solve's Hessian holds exactly the inputs the pruned linear will see (--sequential linear, no
        # held-out windows): its output error over every token is tr(ΔHΔᵀ), no forward hook needed
        self.error_from_hessian = error_from_hessian and self.needs_hessian and heldout_from is None
        self.masks: dict[str, torch.Tensor] = {}
        self.dense: dict[str, torch.Tensor] = {}
        self.permutations: dict[str, torch.Tensor] = {}
        self.leader: dict[str, str] = {}
        self.stats: dict[str, Stats] = {}
        self.batches_in: dict[str, int] = {}
        self.inputs: list[tuple[torch.Tensor, str]] = []  # this forward's leader inputs
        self.entries: dict[str, dict] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        # Σ‖xΔᵀ‖², Σ‖xWᵀ‖² (fp64 on the compute device: no host round trip per batch), tokens
        self.err = {name: [torch.zeros((), dtype=torch.float64, device=device),
                           torch.zeros((), dtype=torch.float64, device=device), 0] for name in linears}
        self.stats_seconds = 0.0  # host time in the statistics hooks and the error hooks (the profile)
        self.error_seconds = 0.0
        self.solve_seconds = 0.0
        self.collect_only = False  # True: gather statistics from the dense layer, solve nothing yet
        self.paused = False  # True while the block update runs its own forwards
        self.handles = []
        for name, module in linears.items():
            if spec.needs_stats:
                self.handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self.handles.append(module.register_forward_hook(self._error_hook(name)))

    # -- statistics and solving
    def start_batch(self, window_offset: int = 0) -> None:
        self.inputs.clear()
        self.window_offset = window_offset

    def _pre_hook(self, name):
        def hook(module, args):
            if self.paused:
                return None
            x = args[0]
            if name in self.entries:  # solved: runs pruned
                if self.leader[name] == name:
                    self.inputs.append((x, name))
                return None
            leader = self.leader.get(name)
            if leader is None:
                leader = next((lead for t, lead in self.inputs if t is x), name)
                self.leader[name] = leader
            if leader == name:
                self._accumulate(name, x)
                self.inputs.append((x, name))
                if self.collect_only:
                    return None
                if self.batches_in[name] < self.nbatches:
                    raise _StopForward
            elif self.collect_only:
                return None
            elif self.batches_in[leader] < self.nbatches:  # cannot happen: followers appear with complete leaders
                raise RuntimeError(f"{name}: statistics of {leader} incomplete")
            self.solve(name, module)
            return None

        return hook

    def _new_stats(self, dim: int, device) -> Stats:
        return Stats(
            tokens=0,
            sq_norms=torch.zeros(dim, dtype=torch.float32, device=device),
            hessian=torch.zeros(dim, dim, dtype=torch.float32, device=device) if self.needs_hessian else None,
            sums=torch.zeros(dim, dtype=torch.float32, device=device),
        )

    @staticmethod
    def _add(st: Stats, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if x.shape[0] == 0:
            return
        st.tokens += x.shape[0]
        st.sums.add_(x.sum(0))
        if st.hessian is not None:
            accumulate_hessian(st.hessian, x)
        else:
            st.sq_norms.add_((x * x).sum(0))

    @staticmethod
    def _finish(st: Stats) -> None:
        if st.hessian is not None:
            finish_hessian(st.hessian)
            st.sq_norms = st.hessian.diagonal().clone()

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        t = time.perf_counter()
        try:
            self._accumulate_timed(name, x)
        finally:
            self.stats_seconds += time.perf_counter() - t

    def _accumulate_timed(self, name: str, x: torch.Tensor) -> None:
        st = self.stats.get(name)
        if st is None:
            st = self.stats[name] = self._new_stats(x.shape[-1], x.device)
            if self.heldout_from is not None:
                st.heldout = self._new_stats(x.shape[-1], x.device)
            self.batches_in[name] = 0
        if self.heldout_from is not None and x.dim() == 3:  # [windows, seq, dim]: split off held-out windows
            k = max(0, min(x.shape[0], self.heldout_from - self.window_offset))
            self._add(st, x[:k])
            self._add(st.heldout, x[k:])
        else:
            self._add(st, x)
        self.batches_in[name] += 1
        if self.batches_in[name] == self.nbatches:
            self._finish(st)
            if st.heldout is not None:
                self._finish(st.heldout)
            if not all_finite(st.sq_norms):
                raise OneshotError(f"{name}: its inputs overflow to NaN/Inf in this dtype; try --dtype float32")

    def solve(self, name: str, module: nn.Module) -> None:
        t = time.perf_counter()
        dense = get_weight(module).to(self.device)
        if not all_finite(dense):
            raise OneshotError(f"{name}: the checkpoint's weight holds NaN/Inf values")
        leader = self.leader.get(name, name)
        stats = self.stats.get(leader)
        try:
            result = self._result(name, leader, dense, stats)
            weight, info = result.weight, dict(result.info)
            update = self.options.get("update", "none")
            if update in ("lstsq", "admm"):
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
        # the change, for the output error: kept in the stored dtype (a whole layer of them is held)
        delta = dense.clone() if self.keep_dense else dense
        delta.sub_(written.to(dense.device))
        del written
        hessian = stats.hessian if stats is not None and self.error_from_hessian else None
        if hessian is not None and delta.shape[1] < min(self.error_tokens, stats.tokens):  # cheaper: in² < tokens·in
            self.err[name] = [self._trace(delta, hessian), self._trace(get_weight(module) + delta, hessian),
                              stats.tokens]
        else:
            self.deltas[name] = delta.to(self.storage_dtype or module.weight.dtype)
        shape = list(dense.shape)
        del dense, delta
        elapsed = time.perf_counter() - t
        self.solve_seconds += elapsed
        entry = {
            "name": name,
            "shape": shape,
            "shared_stats_with": leader if leader != name else None,
            "target_sparsity": self.constraint.sparsity,
            "mask_sparsity": mask_sparsity,
            "sparsity": zeros / (shape[0] * shape[1]),
            "zeros": zeros,
            "seconds": round(elapsed, 4),
        }
        entry.update(info)
        self.entries[name] = entry

    def _relative(self, name: str) -> str:
        return name[len(self.prefix) + 1:] if self.prefix and name.startswith(self.prefix + ".") else name

    def _result(self, name: str, leader: str, dense: torch.Tensor, stats: Stats | None) -> SolverResult:
        """The solver's result for ``name``: solved with its followers as one matrix when it leads
        some that have not run yet, or taken from its leader's joint solve."""
        pending = self.pending.pop(name, None)
        if pending is not None and pending[0] == leader:
            return pending[1]
        if self.followers is None or leader != name:
            return self.spec.fn(dense, stats, self.constraint, self.options)
        known = {n for n, lead in self.leader.items() if lead == name and n != name}
        hinted = {f"{self.prefix}.{r}" if self.prefix else r for r in self.followers.get(self._relative(name), [])}
        joint = [n for n in self.linears if n in known | hinted and n not in self.entries
                 and self.leader.get(n, name) == name and get_weight(self.linears[n]).shape[1] == dense.shape[1]]
        if not joint:
            return self.spec.fn(dense, stats, self.constraint, self.options)
        weights = [dense] + [get_weight(self.linears[n]).to(dense.device, dense.dtype) for n in joint]
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

    def followers_map(self) -> dict[str, list[str]]:
        """leader -> followers among this layer's linears, relative to the layer (the next layer's hint)."""
        out: dict[str, list[str]] = {}
        for n, lead in self.leader.items():
            if lead != n:
                out.setdefault(self._relative(lead), []).append(self._relative(n))
        return out

    @staticmethod
    def _trace(w: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        """Σ‖x wᵀ‖² over the tokens summed in ``hessian`` = tr(w H wᵀ)."""
        w = w.to(torch.float32)
        return ((w @ hessian) * w).sum(dtype=torch.float64)

    def refresh(self) -> None:
        """After the block update changed the weights: clean zeros, new deltas and sparsities."""
        for name, module in self.linears.items():
            written = positive_zeros(get_weight(module))
            set_weight(module, written)
            delta = self.dense[name] - written.to(self.dense[name].device)
            self.deltas[name] = delta.to(self.storage_dtype or module.weight.dtype)
            self.entries[name]["sparsity"] = float((written == 0).float().mean())
            self.entries[name]["zeros"] = int((written == 0).sum())

    def solve_all(self) -> None:
        """Solve every linear now: with no statistics (magnitude) or after a ``collect_only`` pass."""
        for name, module in self.linears.items():
            if self.spec.needs_stats and name not in self.leader:
                raise OneshotError(f"{name}: never ran in the layer's forward pass; --ignore them")
        if self.group is not None:
            self._solve_distributed()
            return
        for name, module in self.linears.items():
            self.solve(name, module)

    def _solve_distributed(self) -> None:
        """Sum every leader's statistics over the ranks, solve linear k on rank k mod world, and
        broadcast each pruned weight and its report entry from its owner."""
        group = self.group
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
        names = list(self.linears)
        for k, name in enumerate(names):
            if k % group.world == group.rank:
                self.solve(name, self.linears[name])
        for k, name in enumerate(names):
            owner, module = k % group.world, self.linears[name]
            dense = None if owner == group.rank else get_weight(module)
            weight = module.weight.data.to(torch.float32).contiguous()  # gloo has no bfloat16
            group.broadcast(weight, owner)
            entry, perm = group.broadcast_object((self.entries.get(name), self.permutations.get(name)), owner)
            if dense is None:
                continue
            module.weight.data.copy_(weight.to(module.weight.dtype))
            self.entries[name] = entry
            if perm is not None:
                self.permutations[name] = perm
            written = get_weight(module)
            self.deltas[name] = (dense - written).to(self.storage_dtype or module.weight.dtype)

    # -- output error of every pruned linear, on inputs that reach it after it was pruned
    def _error_hook(self, name):
        def hook(module, args, output):
            acc = self.err[name]
            if self.paused or name not in self.deltas or acc[2] >= self.error_tokens:  # not solved, or measured
                return
            t = time.perf_counter()
            x = args[0].reshape(-1, args[0].shape[-1])[: self.error_tokens - acc[2]].to(torch.float32)
            y = output.reshape(-1, output.shape[-1])[: x.shape[0]].to(torch.float32)
            bias = getattr(module, "bias", None)
            if bias is not None:
                y = y - bias.to(torch.float32)
            e = x @ self.deltas[name].t().to(torch.float32)
            acc[0] += (e * e).sum(dtype=torch.float64)
            acc[1] += ((y + e) ** 2).sum(dtype=torch.float64)
            acc[2] += x.shape[0]
            self.error_seconds += time.perf_counter() - t

        return hook

    def report(self) -> list[dict]:
        if self.group is not None:  # each rank measured its share of the same first tokens
            for name in self.linears:
                err, ref, tokens = self.err[name]
                acc = torch.stack([err, ref, torch.tensor(float(tokens), dtype=torch.float64, device=err.device)])
                self.group.all_reduce(acc)
                self.err[name] = [acc[0], acc[1], int(acc[2])]
        out = []
        for name in self.linears:
            entry = self.entries[name]
            err, ref, tokens = self.err[name]
            err, ref = float(err), float(ref)
            entry["relative_error"] = err / ref if ref > 0 else 0.0
            entry["error_tokens"] = tokens
            out.append(entry)
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _forward(layer, hidden, args, kwargs):
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _peak_memory() -> dict:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"host_rss_bytes": int(rss if sys.platform == "darwin" else rss * 1024)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["device_bytes"] = int(torch.cuda.max_memory_allocated())
    return peak


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def forward_bytes_per_token(layer: nn.Module, seqlen: int, heads: int, dtype_bytes: int) -> int:
    """A generous estimate of the activation memory one token costs in one layer's forward."""
    widths = [max(linear_shape(m)) for m in layer.modules() if is_linear(m)] or [1]
    widest = max(widths)
    return 4 * (8 * widest + sum(widths)) + 2 * heads * seqlen * max(dtype_bytes, 4)


def plan_batches(input_ids: torch.Tensor, layer: nn.Module, heads: int, dtype_bytes: int, device: torch.device,
                 batch_size: int) -> int:
    """Windows per forward: ``batch_size`` if given, else all of them when a forward over every
    window fits in a quarter of the free memory (one pass per layer), else as many as do."""
    nsamples, seqlen = input_ids.shape
    if batch_size:
        return min(batch_size, nsamples)
    per_window = forward_bytes_per_token(layer, seqlen, heads, dtype_bytes) * seqlen
    return int(max(1, min(nsamples, _available_bytes(device) // 4 // per_window)))


def activation_store(device: torch.device, captured_bytes: int, offload: bool = False) -> torch.device:
    """Keep activations on the compute device when two copies fit in half of its free memory (and
    ``--offload-activations`` was not given): else in host memory, one batch at a time on the device."""
    if device.type != "cuda" or offload:
        return torch.device("cpu")
    return device if 2 * captured_bytes < _available_bytes(device) // 2 else torch.device("cpu")


def _layer_inputs(captured: Captured, i: int, device, dtype: torch.dtype | None = None):
    """(window offset, hidden, args, kwargs) of every captured batch for layer ``i``, floating
    tensors in ``dtype`` when given."""
    offset = 0
    for b, hidden in enumerate(captured.hidden):
        args, kwargs = captured.layer_args[b][i]
        yield offset, _to(hidden, device, dtype), _to(args, device, dtype), _to(kwargs, device, dtype)
        offset += hidden.shape[0]


def compute_dtype_for(storage: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a layer runs in: float32 for 16-bit weights on the CPU (where bfloat16 matmuls without
    AVX512-BF16/AMX run at a fraction of a GFLOP/s, ``benchmarks/cpu_dtypes.py``), else the stored one.
    Weights are rounded to the stored dtype as they are pruned, so the output is the same dtype."""
    if device.type == "cpu" and storage in (torch.float16, torch.bfloat16):
        return torch.float32
    return storage


def _onload(io: LayerIO, i: int, layer: nn.Module, device, compute: torch.dtype | None) -> dict:
    """Layer ``i`` on ``device`` with its floating parameters in ``compute`` (when given); returns
    each cast parameter's stored dtype for :func:`_restore`."""
    io.load(i, layer, device)
    stored = {}
    if compute is not None:
        for name, param in layer.named_parameters():
            if param.is_floating_point() and param.dtype != compute:
                stored[name] = param.dtype
                param.data = param.data.to(compute)
    return stored


def _restore(layer: nn.Module, stored: dict) -> None:
    """Parameters back in their stored dtype (exact: pruned weights were rounded to it already)."""
    for name, param in layer.named_parameters():
        if name in stored:
            param.data = param.data.to(stored[name])


@torch.no_grad()
def owl_densities(layers, path: str, captured: Captured, device, ignore, m: float, store,
                  io: LayerIO | None = None, compute: torch.dtype | None = None) -> tuple[list[float], list[int]]:
    """OWL's pre-pass: run the *dense* model layer by layer (its own copy of the activations) and
    measure each layer's outlier density and pruned parameter count."""
    from .allocation import outlier_density

    io = io or LayerIO()
    hidden = [h.clone() for h in captured.hidden]
    dens, params = [], []
    for i, layer in enumerate(layers):
        stored = _onload(io, i, layer, device, compute)
        linears = find_linears(layer, f"{path}.{i}", ignore)
        sums = {name: None for name in linears}

        def hook(name):
            def fn(module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sq = (x * x).sum(0)
                sums[name] = sq if sums[name] is None else sums[name] + sq

            return fn

        handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in linears.items()]
        try:
            view = Captured(hidden, captured.layer_args)
            hidden = [_forward(layer, h, a, kw).to(store) for _, h, a, kw in _layer_inputs(view, i, device, compute)]
        finally:
            for h in handles:
                h.remove()
        names = [n for n in linears if sums[n] is not None]
        if names:
            dens.append(outlier_density([get_weight(linears[n]) for n in names], [sums[n] for n in names], m))
        else:
            dens.append(0.0)
        params.append(sum(linear_shape(mod)[0] * linear_shape(mod)[1] for mod in linears.values()))
        _restore(layer, stored)
        io.release(i, layer, device)
    return dens, params


@torch.no_grad()
def prune_layers(*args, device: torch.device, **kwargs) -> dict:
    """:func:`_prune_layers`, with the host heap kept for reuse while the layers run on the CPU."""
    with reuse_host_heap(torch.device(device).type == "cpu"):
        return _prune_layers(*args, device=device, **kwargs)


def _prune_layers(model, input_ids: torch.Tensor, method: str, constraint: Constraint, options: dict, *,
                 device: torch.device, ignore=(), batch_size: int = 0, sequential: str = "layer",
                 progress: bool = True, allocation: dict | None = None, heldout: int = 0,
                 block: dict | None = None, io: LayerIO | None = None, compute_dtype: torch.dtype | None = None,
                 resume: dict | None = None, on_layer=None, group=None, first_window: int = 0,
                 offload_activations: bool = False) -> dict:
    """Prune every linear inside the decoder layers of ``model`` in place; returns the report's body.

    ``allocation``: ``{"kind": "owl", "m": .., "lambda": ..}`` for per-layer sparsities (unstructured);
    ``heldout``: the last windows that only judge updates (``options["update"]`` lstsq/admm, or
    ``block``: ``{"epochs", "lr", "batch_windows", "target": "layer"|"model", "seed"}``).
    ``io``: where layers come from and go (:class:`LayerIO`: in memory); ``compute_dtype``: run each
    layer in this dtype (weights are still rounded to the stored one).
    ``on_layer(i, layer, state)``: called once layer ``i`` is pruned, in its stored dtype, with the
    run's state so far (what a journal needs to resume: :func:`run_state`); ``resume``: such a state,
    to continue from its next layer. ``group``: a torch.distributed group (:mod:`oneshot.distributed`);
    ``input_ids`` are then this rank's windows, the first of them window ``first_window`` of all.
    """
    from tqdm.auto import tqdm

    from .reconstruct import reconstruct_block
    from .solvers import solver_needs_hessian

    io = io or LayerIO()
    spec = SOLVERS[method]
    nsamples, seqlen = input_ids.shape
    path, layers = find_decoder_layers(model)
    config = getattr(model.config, "text_config", None) or model.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    storage = model.dtype
    compute = compute_dtype if compute_dtype is not None and compute_dtype != storage else None
    dtype_bytes = torch.finfo(compute or storage).bits // 8
    per_batch = plan_batches(input_ids, layers[0], heads, dtype_bytes, device, batch_size)
    batches = list(input_ids.split(per_batch))
    hidden_size = model.get_input_embeddings().weight.shape[1]
    store = activation_store(device, nsamples * seqlen * hidden_size * dtype_bytes, offload_activations)
    phases = {"capture": 0.0, "prune_and_propagate": 0.0, "solve": 0.0}
    needs_hessian = solver_needs_hessian(method, options)
    heldout_from = nsamples - heldout if heldout else None
    if block is not None and sequential != "layer":
        raise OneshotError("--update block needs --sequential layer")
    if group is not None and sequential != "layer":
        raise OneshotError("a distributed run sums the statistics of the dense layer: it needs --sequential layer")

    t0 = time.perf_counter()
    captured = capture_inputs(model, layers, batches, device, store, io)
    io.captured(model)
    if io.streaming:
        free_memory()
    phases["capture"] = time.perf_counter() - t0

    constraints = [constraint] * len(layers)
    if resume is not None:
        allocation = resume.get("allocation") or allocation
    if allocation and allocation.get("kind") == "owl":
        from .allocation import owl_sparsities

        if "layer_sparsity" not in allocation:
            t = time.perf_counter()
            dens, params = owl_densities(layers, path, captured, device, ignore, float(allocation["m"]), store, io,
                                         compute)
            try:
                layer_sparsity = owl_sparsities(dens, params, constraint.sparsity, float(allocation["lambda"]))
            except ValueError as exc:
                raise OneshotError(str(exc)) from None
            phases["allocation"] = time.perf_counter() - t
            allocation = {**allocation, "outlier_density": dens, "layer_sparsity": layer_sparsity}
        constraints = [Constraint(sparsity=s) for s in allocation["layer_sparsity"]]
    dense_stream = [h.clone() for h in captured.hidden] if block and block.get("target") == "model" else None

    reports, notes, passes, blocks = [], [], [], []
    permutations: dict[str, torch.Tensor] = {}
    followers: dict[str, list[str]] = {}  # which linears read one input, from the layer before (joint solves)
    start = 0
    if resume is not None:
        start = int(resume["finished"])
        captured.hidden = list(resume["hidden"])
        if dense_stream is not None:
            dense_stream = list(resume["dense_stream"])
        reports, notes, passes, blocks = (list(resume[k]) for k in ("reports", "notes", "passes", "blocks"))
        permutations = dict(resume["permutations"])
        followers = resume.get("followers") or {}
    bar = tqdm(total=len(layers), initial=start, desc=f"{method} {constraint.describe()}", unit="layer",
               disable=not progress)
    for i, layer in enumerate(layers):
        if i < start:
            continue
        prefix = f"{path}.{i}"
        t = time.perf_counter()
        stored = _onload(io, i, layer, device, compute)
        phases["layer_io"] = phases.get("layer_io", 0.0) + time.perf_counter() - t
        linears = find_linears(layer, prefix, ignore)
        for b, hidden in enumerate(captured.hidden):
            if not all_finite(hidden):
                raise OneshotError(
                    f"non-finite values (NaN/Inf) reach decoder layer {i} ({prefix}) in calibration batch {b}; "
                    "the model overflows in this dtype: try --dtype float32"
                )
        pruner = _LayerPruner(linears, spec, constraints[i], options, len(batches), device,
                              max(0, ERROR_TOKENS - first_window * seqlen),  # the same first tokens on any rank count
                              needs_hessian=needs_hessian, heldout_from=heldout_from,
                              storage_dtype=storage if compute is not None else None, keep_dense=block is not None,
                              group=group, error_from_hessian=sequential == "linear", followers=followers,
                              prefix=prefix)
        outputs: list[torch.Tensor | None] = [None] * len(batches)
        targets: list[torch.Tensor] = []
        layer_passes = 0

        def inputs(view=captured):
            return _layer_inputs(view, i, device, compute)

        try:
            if dense_stream is not None:  # the dense model's hidden state after this layer: the block's target
                view = Captured(dense_stream, captured.layer_args)
                pruner.paused = True  # the dense layer on the dense stream: no statistics, no solving
                dense_stream = [_forward(layer, h, a, kw).to(store) for _, h, a, kw in inputs(view)]
                pruner.paused = False
                targets = dense_stream
            if spec.needs_stats and sequential == "layer":  # the reference way: all statistics from the dense layer
                layer_passes += 1
                pruner.collect_only = True
                for offset, hidden, args, kwargs in inputs():
                    pruner.start_batch(offset)
                    out = _forward(layer, hidden, args, kwargs)
                    if block is not None and dense_stream is None:
                        targets.append(out.to(store))
                pruner.collect_only = False
            elif block is not None and dense_stream is None:
                targets = [_forward(layer, h, a, kw).to(store) for _, h, a, kw in inputs()]
            if not spec.needs_stats or sequential == "layer":
                pruner.solve_all()
            if block is not None and linears:
                tb = time.perf_counter()
                pruner.paused = True
                info = reconstruct_block(
                    layer, linears, pruner.masks, [_to(h, store, compute) for h in captured.hidden],
                    [_to(captured.layer_args[b][i], store, compute) for b in range(len(batches))],
                    targets, heldout or max(1, nsamples // 8), epochs=int(block["epochs"]), lr=float(block["lr"]),
                    batch_windows=int(block["batch_windows"]), seed=int(block.get("seed", 0)) + i, device=device,
                )
                pruner.paused = False
                if compute is not None:  # the trained weights, rounded to the stored dtype
                    for module in linears.values():
                        module.weight.data = module.weight.data.to(storage).to(compute)
                pruner.refresh()
                blocks.append({"layer": prefix, **info})
                phases["block_update"] = phases.get("block_update", 0.0) + time.perf_counter() - tb
            while any(o is None for o in outputs):
                layer_passes += 1
                if layer_passes > len(linears) + 3:  # no progress: some linear is never reached
                    break
                for b, (offset, hidden, args, kwargs) in enumerate(inputs()):
                    if outputs[b] is not None:
                        continue
                    pruner.start_batch(offset)
                    try:
                        outputs[b] = _forward(layer, hidden, args, kwargs).to(store)
                    except _StopForward:
                        pass
        finally:
            pruner.remove()
        missing = sorted(set(linears) - set(pruner.entries))
        if missing or any(o is None for o in outputs):
            raise OneshotError(f"{', '.join(missing) or prefix}: never ran in the layer's forward pass; --ignore them")
        captured.hidden = outputs
        layer_linears = pruner.report()
        permutations.update(pruner.permutations)
        followers = pruner.followers_map()
        for entry in layer_linears:
            if "fallback" in entry:
                notes.append(f"{entry['name']}: {entry['fallback']}")
        phases["solve"] += pruner.solve_seconds
        phases["statistics"] = phases.get("statistics", 0.0) + pruner.stats_seconds
        phases["error_measure"] = phases.get("error_measure", 0.0) + pruner.error_seconds
        passes.append(layer_passes)
        del pruner, targets
        reports.extend(layer_linears)
        _restore(layer, stored)
        phases["prune_and_propagate"] += time.perf_counter() - t
        tw = time.perf_counter()
        if on_layer is not None:
            on_layer(i, layer, run_state(i + 1, captured.hidden, dense_stream, reports, notes, passes, blocks,
                                         permutations, allocation, followers))
        io.release(i, layer, device)
        if io.streaming:  # a full collection costs ~0.2 s with a whole model in memory: only when streaming
            free_memory()
        phases["layer_io"] = phases.get("layer_io", 0.0) + time.perf_counter() - tw
        if layer_linears:
            bar.set_postfix(err=f"{sum(e['relative_error'] for e in layer_linears) / len(layer_linears):.3g}")
        bar.update(1)
    bar.close()
    io.finish(model)
    body = {
        "layers_path": path,
        "num_layers": len(layers),
        "linears": reports,
        "notes": notes,
        "phases_seconds": {k: round(v, 3) for k, v in phases.items()},
        "peak_memory": _peak_memory(),
        "forward_batch": per_batch,
        "forward_passes_per_layer": max(passes) if passes else 0,
        "activations_on": str(store),
        "compute_dtype": str(compute or storage).replace("torch.", ""),
        "error_tokens": ERROR_TOKENS,
        "permutations": permutations,
    }
    if allocation:
        body["allocation"] = allocation
    if heldout_from is not None:
        body["heldout_windows"] = heldout
    if blocks:
        body["block_update"] = blocks
    if start:
        body["resumed_at_layer"] = start
    return body


def run_state(finished: int, hidden, dense_stream, reports, notes, passes, blocks, permutations, allocation,
              followers=None) -> dict:
    """What a resumed run needs: layers done, the activations entering the next one, the report so far."""
    return {"finished": finished, "hidden": hidden, "dense_stream": dense_stream, "reports": reports,
            "notes": notes, "passes": passes, "blocks": blocks, "permutations": permutations,
            "allocation": allocation, "followers": followers or {}}
