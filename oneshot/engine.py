"""The layer-by-layer loop. Knows nothing about any one solver.

1. capture what every decoder layer receives (hidden states of layer 0; for each layer its own
   positional and keyword arguments: masks, position embeddings, positions) by running the model
   once per batch with the layers replaced by recorders that pass hidden states through;
2. for each layer: onload it, forward all windows with hooks on its linears to gather fp32
   statistics (one shared Hessian for linears that read the same input tensor), solve every
   linear, forward again through the *pruned* layer to make the next layer's inputs (measuring each
   linear's output error on the way), offload it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import Constraint, OneshotError
from .masks import positive_zeros
from .model_io import find_decoder_layers, find_linears, get_weight, set_weight
from .solvers import SOLVERS, Stats

TOKENS_PER_BATCH = 8192  # default forward batch: as many windows as make this many tokens
ERROR_TOKENS = 8192  # the per-linear output error is measured on this many calibration tokens


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


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_inputs(model, layers: nn.ModuleList, batches: list[torch.Tensor], device, store) -> Captured:
    """Run the model with recorders in place of its layers; returns what each layer receives."""
    originals = list(layers)
    sink: list = []
    for i in range(len(layers)):
        layers[i] = _Recorder(i, sink, last=i == len(layers) - 1)
    captured = Captured()
    try:
        model.to(device)  # only embeddings, rotary tables and norms are left: the layers are recorders
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


class _StatsHooks:
    """Forward hooks on a layer's linears accumulating fp32 input statistics.

    Linears that read the very same input tensor (q/k/v, gate/up) are grouped on the first batch and
    share one accumulator, filled once by the first of them to run.
    """

    def __init__(self, linears: dict[str, nn.Module], need_hessian: bool):
        self.need_hessian = need_hessian
        self.leader: dict[str, str] = {}
        self.stats: dict[str, Stats] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name):
        def hook(module, args, output):
            x = args[0]
            if name not in self.leader:
                leader = next((lead for t, lead in self._seen if t is x), None)
                if leader is None:
                    leader = name
                    self._seen.append((x, name))
                self.leader[name] = leader
            if self.leader[name] != name:
                return
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            st = self.stats.get(name)
            if st is None:
                dim = x.shape[1]
                st = self.stats[name] = Stats(
                    tokens=0,
                    sq_norms=torch.zeros(dim, dtype=torch.float32, device=x.device),
                    hessian=torch.zeros(dim, dim, dtype=torch.float32, device=x.device) if self.need_hessian else None,
                )
            st.tokens += x.shape[0]
            if st.hessian is not None:
                st.hessian.addmm_(x.t(), x)
            else:
                st.sq_norms.add_((x * x).sum(0))

        return hook

    def end_batch(self):
        self._seen.clear()  # drop references to the first batch's tensors

    def result(self, name: str) -> Stats:
        st = self.stats[self.leader[name]]
        if st.hessian is not None:
            st.sq_norms = st.hessian.diagonal().clone()
        return st

    def remove(self):
        for handle in self.handles:
            handle.remove()


class _ErrorHooks:
    """Relative output error ‖x(W−Ŵ)ᵀ‖² / ‖xWᵀ‖² of each pruned linear, on its inputs in the pruned model."""

    def __init__(self, linears: dict[str, nn.Module], deltas: dict[str, torch.Tensor], budget: int):
        self.deltas, self.budget = deltas, budget
        self.err = {name: 0.0 for name in linears}
        self.ref = {name: 0.0 for name in linears}
        self.seen = {name: 0 for name in linears}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name):
        def hook(module, args, output):
            if self.seen[name] >= self.budget:
                return
            x = args[0].reshape(-1, args[0].shape[-1])[: self.budget - self.seen[name]].to(torch.float32)
            y = output.reshape(-1, output.shape[-1])[: x.shape[0]].to(torch.float32)
            bias = getattr(module, "bias", None)
            if bias is not None:
                y = y - bias.to(torch.float32)
            e = x @ self.deltas[name].t()
            self.err[name] += float((e * e).sum())
            self.ref[name] += float(((y + e) ** 2).sum())
            self.seen[name] += x.shape[0]

        return hook

    def relative(self, name: str) -> float:
        return self.err[name] / self.ref[name] if self.ref[name] > 0 else 0.0

    def remove(self):
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


def activation_store(device: torch.device, captured_bytes: int) -> torch.device:
    """Keep activations on the compute device when two copies fit in half of its free memory."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if 2 * captured_bytes < free // 2 else torch.device("cpu")


@torch.no_grad()
def prune_layers(model, input_ids: torch.Tensor, method: str, constraint: Constraint, options: dict, *,
                 device: torch.device, ignore=(), batch_size: int = 0, progress: bool = True) -> dict:
    """Prune every linear inside the decoder layers of ``model`` in place; returns the report's body."""
    from tqdm.auto import tqdm

    spec = SOLVERS[method]
    nsamples, seqlen = input_ids.shape
    per_batch = batch_size or max(1, TOKENS_PER_BATCH // seqlen)
    batches = list(input_ids.split(per_batch))
    path, layers = find_decoder_layers(model)
    hidden_size = model.get_input_embeddings().weight.shape[1]
    act_bytes = nsamples * seqlen * hidden_size * torch.finfo(model.dtype).bits // 8
    store = activation_store(device, act_bytes)
    phases = {"capture": 0.0, "statistics": 0.0, "solve": 0.0, "propagate": 0.0}

    t0 = time.perf_counter()
    captured = capture_inputs(model, layers, batches, device, store)
    phases["capture"] = time.perf_counter() - t0

    reports, notes = [], []
    bar = tqdm(total=len(layers), desc=f"{method} {constraint.describe()}", unit="layer", disable=not progress)
    for i, layer in enumerate(layers):
        prefix = f"{path}.{i}"
        layer.to(device)
        linears = find_linears(layer, prefix, ignore)
        for b, hidden in enumerate(captured.hidden):
            if not torch.isfinite(hidden).all():
                raise OneshotError(
                    f"non-finite values (NaN/Inf) reach decoder layer {i} ({prefix}) in calibration batch {b}; "
                    "the model overflows in this dtype: try --dtype float32"
                )

        t = time.perf_counter()
        stats_hooks = None
        if spec.needs_stats and linears:
            stats_hooks = _StatsHooks(linears, spec.needs_hessian)
            try:
                for b, hidden in enumerate(captured.hidden):
                    args, kwargs = captured.layer_args[b][i]
                    _forward(layer, hidden.to(device), _to(args, device), _to(kwargs, device))
                    stats_hooks.end_batch()
            finally:
                stats_hooks.remove()
        phases["statistics"] += time.perf_counter() - t

        deltas, layer_linears = {}, []
        for name, module in linears.items():
            t = time.perf_counter()
            dense = get_weight(module).to(device)
            if not torch.isfinite(dense).all():
                raise OneshotError(f"{name}: the checkpoint's weight holds NaN/Inf values")
            if stats_hooks and name not in stats_hooks.leader:
                raise OneshotError(f"{name} was never called during the layer's forward pass; --ignore it")
            stats = stats_hooks.result(name) if stats_hooks else None
            if stats is not None and not torch.isfinite(stats.sq_norms).all():
                raise OneshotError(f"{name}: its inputs overflow to NaN/Inf in this dtype; try --dtype float32")
            try:
                result = spec.fn(dense, stats, constraint, options)
            except torch.linalg.LinAlgError as exc:
                raise OneshotError(f"{name}: {exc}") from exc
            if not torch.isfinite(result.weight).all():
                raise OneshotError(f"{name}: the {method} solve produced NaN/Inf weights")
            set_weight(module, result.weight)
            written = get_weight(module)  # what is stored, after the cast to the model's dtype
            if (written == 0).any():
                set_weight(module, positive_zeros(written))
            deltas[name] = dense - get_weight(module).to(device)
            elapsed = time.perf_counter() - t
            phases["solve"] += elapsed
            entry = {
                "name": name,
                "shape": list(dense.shape),
                "shared_stats_with": stats_hooks.leader[name] if stats_hooks and stats_hooks.leader[name] != name else None,
                "target_sparsity": constraint.sparsity,
                "mask_sparsity": float(result.mask.float().mean()),
                "sparsity": float((written == 0).float().mean()),
                "seconds": round(elapsed, 4),
            }
            entry.update(result.info)
            if "fallback" in result.info:
                notes.append(f"{name}: {result.info['fallback']}")
            layer_linears.append(entry)
        del stats_hooks

        t = time.perf_counter()
        error_hooks = _ErrorHooks(linears, deltas, ERROR_TOKENS)
        try:
            for b, hidden in enumerate(captured.hidden):
                args, kwargs = captured.layer_args[b][i]
                out = _forward(layer, hidden.to(device), _to(args, device), _to(kwargs, device))
                captured.hidden[b] = out.to(store)
        finally:
            error_hooks.remove()
        for entry in layer_linears:
            entry["relative_error"] = error_hooks.relative(entry["name"])
        phases["propagate"] += time.perf_counter() - t
        del deltas, error_hooks

        if device.type != "cpu":
            layer.to("cpu")
        reports.extend(layer_linears)
        if layer_linears:
            bar.set_postfix(err=f"{sum(e['relative_error'] for e in layer_linears) / len(layer_linears):.3g}")
        bar.update(1)
    bar.close()
    model.to("cpu")
    return {
        "layers_path": path,
        "num_layers": len(layers),
        "linears": reports,
        "notes": notes,
        "phases_seconds": {k: round(v, 3) for k, v in phases.items()},
        "peak_memory": _peak_memory(),
        "forward_batch": per_batch,
        "activations_on": str(store),
    }
