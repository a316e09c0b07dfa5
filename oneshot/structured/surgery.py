"""Cutting a decoder layer's modules: which linears make and read a channel or a head, what one costs
in parameters, and the cut itself (rows of the producers, compensated columns of the consumer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import OneshotError
from .obs import remove_groups


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (a view: GPT-2's Conv1D stores [in, out])."""
    return module.weight.data if isinstance(module, nn.Linear) else module.weight.data.t()


def _set_matrix(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give ``module`` this [out, in] ``weight`` (and ``bias``), its size attributes following."""
    stored = weight if isinstance(module, nn.Linear) else weight.t()
    module.weight = nn.Parameter(stored.contiguous(), requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    else:  # Conv1D: nf is its output width
        module.nf = weight.shape[0]


def keep_rows(linear: nn.Module, rows: torch.Tensor) -> None:
    """Keep these output rows (and bias entries) of ``linear``."""
    w = weight_matrix(linear)
    rows = rows.to(w.device)
    _set_matrix(linear, w[rows], linear.bias.data[rows] if linear.bias is not None else None)


def set_columns(linear: nn.Module, weight: torch.Tensor, columns: torch.Tensor) -> None:
    """``linear`` reads only these input columns, with the (compensated) ``weight`` [d_out, n] given."""
    w = weight_matrix(linear)
    _set_matrix(linear, weight[:, columns.to(weight.device)].to(w.dtype).to(w.device), None)


def in_width(linear: nn.Module) -> int:
    return weight_matrix(linear).shape[1]


def out_width(linear: nn.Module) -> int:
    return weight_matrix(linear).shape[0]


@dataclass
class MLPParts:
    producers: list[str]  # linears (or fused expert parameters) whose output rows are the channels
    consumer: str  # the linear (or fused expert parameter) that reads the channels (down / fc2)
    blocks: int = 1  # a producer's rows hold this many channel-sized blocks (gate and up fused: 2)
    interleaved: bool = False  # with blocks > 1: the blocks alternate row by row (gpt-oss) instead of following
    experts: str | None = None  # the fused experts module's path: every expert's own channels are cut

    def rows(self, kept: torch.Tensor, width: int) -> torch.Tensor:
        """A producer's rows for the ``kept`` channels of ``width``."""
        if self.blocks == 1:
            return kept
        if self.interleaved:
            return (kept[:, None] * self.blocks + torch.arange(self.blocks)).reshape(-1)
        return torch.cat([kept + b * width for b in range(self.blocks)])


@dataclass
class AttentionParts:
    attention: str  # the attention module
    q: str
    k: str  # the same name for all three: one fused projection holding q, then k, then v (Phi-3's qkv_proj)
    v: str
    o: str

    @property
    def fused(self) -> bool:
        return self.q == self.k == self.v


MLP_LAYOUTS = [
    MLPParts(["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj"),  # Llama, Mistral, Qwen, Gemma
    MLPParts(["mlp.fc1"], "mlp.fc2"),
    MLPParts(["fc1"], "fc2"),  # OPT
    MLPParts(["mlp.gate_up_proj"], "mlp.down_proj", blocks=2),  # Phi-3
    MLPParts(["mlp.dense_h_to_4h"], "mlp.dense_4h_to_h"),  # GPT-NeoX
    MLPParts(["mlp.c_fc"], "mlp.c_proj"),  # GPT-2 (Conv1D)
]
ATTENTION_LAYOUTS = [
    AttentionParts("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    AttentionParts("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    AttentionParts("self_attn", *["self_attn.qkv_proj"] * 3, "self_attn.o_proj"),  # Phi-3
]


def _has(layer: nn.Module, names: list[str]) -> bool:
    from ..model.structure import is_linear

    modules = dict(layer.named_modules())
    return all(is_linear(modules[n]) if n in modules else False for n in names)


def expert_parts(layer: nn.Module) -> MLPParts | None:
    """The fused experts of an MoE layer as channels: ``gate_up_proj`` (or separate gate/up) rows and
    ``down_proj`` columns of every expert."""
    from ..model.experts import experts_modules, fused_parameters

    found = experts_modules(layer)
    if len(found) != 1:
        return None
    path, module = next(iter(found.items()))
    params = list(fused_parameters(module))
    downs = [p for p in params if "down" in p]
    producers = [p for p in params if "down" not in p]
    if len(downs) != 1 or not producers:
        return None
    fused = len(producers) == 1 and "gate_up" in producers[0]
    return MLPParts(producers, downs[0], blocks=2 if fused else 1,
                    interleaved=fused and not getattr(module, "is_concatenated", True), experts=path)


def mlp_parts(layer: nn.Module) -> MLPParts | None:
    return next((p for p in MLP_LAYOUTS if _has(layer, p.producers + [p.consumer])), None) or expert_parts(layer)


def attention_parts(layer: nn.Module) -> AttentionParts | None:
    return next((p for p in ATTENTION_LAYOUTS if _has(layer, [p.q, p.k, p.v, p.o])), None)


def head_counts(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of a text config."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv, head_dim


def check_supported(layers: nn.ModuleList, structures: set[str], config) -> None:
    """One line before any weight is read when a requested structure has no layout oneshot can cut here."""
    layer = layers[0]
    if "channels" in structures and mlp_parts(layer) is None:
        raise OneshotError(f"--structure channels: {type(layer).__name__} has no MLP layout oneshot can cut "
                           "(gate/up/down, fc1/fc2, gate_up/down, dense_h_to_4h/dense_4h_to_h, c_fc/c_proj or "
                           "fused experts)")
    if "heads" in structures and attention_parts(layer) is None:
        raise OneshotError(f"--structure heads: {type(layer).__name__} has no q/k/v/o projections (separate, or "
                           "q, k, v fused one after the other) oneshot can cut")
    if "heads" in structures:
        heads, kv, _ = head_counts(config)
        if heads % kv:
            raise OneshotError(f"--structure heads: {heads} query heads are not a multiple of {kv} key/value heads")


def _params(module: nn.Module, names: list[str]) -> int:
    return sum(p.numel() for n in names for p in [getattr(module, n)] + [getattr(module, f"{n}_bias", None)]
               if isinstance(p, torch.Tensor))


def mlp_width(layer: nn.Module, parts: MLPParts) -> int:
    """MLP channels a layer has (an expert's, for fused experts)."""
    modules = dict(layer.named_modules())
    if parts.experts:
        owner = modules[parts.experts]
        from ..model.experts import fused_parameters

        down = getattr(owner, parts.consumer)
        return down.shape[1] if fused_parameters(owner)[parts.consumer] else down.shape[2]
    return in_width(modules[parts.consumer])


def channel_cost(layer: nn.Module, parts: MLPParts) -> int:
    """Parameters one MLP channel holds (for fused experts: one channel of every expert): its producer
    rows (with biases) and its consumer column."""
    modules = dict(layer.named_modules())
    width = mlp_width(layer, parts)
    if parts.experts:
        owner = modules[parts.experts]
        return (_params(owner, parts.producers) + getattr(owner, parts.consumer).numel()) // width
    rows = sum(p.numel() for n in parts.producers for p in modules[n].parameters())
    return rows // width + out_width(modules[parts.consumer])


def head_cost(layer: nn.Module, parts: AttentionParts, head_dim: int, with_kv: bool) -> int:
    """Parameters one query head holds (rows of q, columns of o; with its own k/v head, those rows too)."""
    modules = dict(layer.named_modules())
    names = [parts.q, parts.k, parts.v] if with_kv else [parts.q]
    q = modules[parts.q]
    cost = len(names) * head_dim * (in_width(q) + (1 if q.bias is not None else 0))
    return cost + head_dim * out_width(modules[parts.o])


@dataclass
class WidthPlan:
    channels: int  # MLP channels removed from every layer (from every expert)
    heads_per_group: int  # query heads removed from every key/value group (MHA: heads removed)


class ConsumerHessians:
    """Input Hessians ``Σ x xᵀ`` of the named linears while hooks are on."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.h: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
            if name not in self.h:  # fp32 sums, as SparseGPT's; the solve itself runs in float64
                self.h[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.h[name].addmm_(x.t(), x)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def per_group_choice(heads_per_kv: int, kv: int):
    """choose(): one query head from every key/value group per step (the cheapest in each group)."""
    def choose(errors: torch.Tensor, candidates: torch.Tensor) -> list[int]:
        chosen = []
        for g in range(kv):
            inside = (candidates // heads_per_kv) == g
            if inside.any():
                idx = candidates[inside]
                chosen.append(int(idx[torch.argmin(errors[inside])]))
        return chosen
    return choose


def _hessian_or_identity(hessians: dict, name: str, width: int, device) -> torch.Tensor:
    """The consumer's Hessian; the identity when only shapes matter (a journaled cut replayed: ``forced``)."""
    h = hessians.get(name)
    return h if h is not None else torch.eye(width, dtype=torch.float32, device=device)


def cut_channels(layer: nn.Module, parts: MLPParts, hessians: dict, count: int, dampening: float,
                 forced: list | None = None) -> dict:
    """Remove ``count`` MLP channels of ``layer`` by group OBS on the consumer (for fused experts:
    ``count`` of every expert's, each expert on its own tokens' Hessian); returns the entry.
    ``forced``: remove exactly these (per expert, for experts) instead of choosing."""
    if parts.experts:
        return _cut_expert_channels(layer, parts, hessians, count, dampening, forced)
    modules = dict(layer.named_modules())
    consumer = modules[parts.consumer]
    width = in_width(consumer)
    w = weight_matrix(consumer).float()
    result = remove_groups(w, _hessian_or_identity(hessians, parts.consumer, width, w.device), 1, count, dampening,
                           forced=forced)
    kept = torch.tensor(sorted(set(range(width)) - set(result.removed)), dtype=torch.long)
    for name in parts.producers:
        keep_rows(modules[name], parts.rows(kept, width))
    set_columns(consumer, result.weight, kept)
    return {"channels_before": width, "channels_after": len(kept), "removed_channels": sorted(result.removed),
            "relative_error": result.error / max(result.baseline, 1e-30)}


def channel_error(layer: nn.Module, parts: MLPParts, hessians: dict, count: int, dampening: float) -> float:
    """The OBS output error of removing ``count`` channels (of every expert), without cutting."""
    if not parts.experts:
        consumer = dict(layer.named_modules())[parts.consumer]
        return remove_groups(weight_matrix(consumer).float(), hessians[parts.consumer], 1, count, dampening).error
    total = 0.0
    for name, matrix in expert_consumers(layer, parts).items():
        w = matrix.weight.float()
        h = hessians.get(name, torch.zeros(w.shape[1], w.shape[1], device=w.device))
        total += remove_groups(w, h, 1, count, dampening).error
    return total


def expert_consumers(layer: nn.Module, parts: MLPParts) -> dict:
    """Name -> each expert's consumer matrix (an :class:`~oneshot.model.experts.ExpertMatrix`), for hooks."""
    from ..model.experts import expert_matrices

    suffix = f".{parts.consumer}"
    return {n: m for n, m in expert_matrices(layer, "").items()
            if n.startswith(f"{parts.experts}.") and n.endswith(suffix)}


def _cut_expert_channels(layer: nn.Module, parts: MLPParts, hessians: dict, count: int, dampening: float,
                         forced: list | None = None) -> dict:
    from ..model.experts import fused_parameters

    owner = dict(layer.named_modules())[parts.experts]
    transposed = fused_parameters(owner)
    width = mlp_width(layer, parts)
    down = getattr(owner, parts.consumer).data
    experts = down.shape[0]
    removed, errors, energy = [], 0.0, 0.0
    new_down, kept_rows = [], []
    for e in range(experts):
        w = (down[e].t() if transposed[parts.consumer] else down[e]).float()  # [out, in]
        h = hessians.get(f"{parts.experts}.{e}.{parts.consumer}")
        if h is None:  # no calibration token reached this expert: the cheapest by weight alone
            h = torch.zeros(width, width, dtype=torch.float32, device=w.device)
        result = remove_groups(w, h, 1, count, dampening, forced=None if forced is None else forced[e])
        kept = torch.tensor(sorted(set(range(width)) - set(result.removed)), dtype=torch.long)
        cut = result.weight[:, kept.to(w.device)].to(down.dtype)
        new_down.append(cut.t() if transposed[parts.consumer] else cut)
        kept_rows.append(parts.rows(kept, width))
        removed.append(sorted(result.removed))
        errors += result.error
        energy += result.baseline
    _set_fused(owner, parts.consumer, torch.stack(new_down))
    for name in parts.producers:
        p = getattr(owner, name).data
        rows = [r.to(p.device) for r in kept_rows]
        _set_fused(owner, name, torch.stack([(p[e][:, rows[e]] if transposed[name] else p[e][rows[e]])
                                             for e in range(experts)]))
        bias = getattr(owner, f"{name}_bias", None)
        if isinstance(bias, torch.Tensor):
            _set_fused(owner, f"{name}_bias", torch.stack([bias.data[e][rows[e]] for e in range(experts)]))
    after = width - count
    for key in ("intermediate_dim", "intermediate_size", "expert_dim", "moe_intermediate_size"):
        if getattr(owner, key, None) == width:
            setattr(owner, key, after)
    return {"channels_before": width, "channels_after": after, "experts": experts, "removed_channels": removed,
            "relative_error": errors / max(energy, 1e-30)}


def _set_fused(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(owner, name, nn.Parameter(value.contiguous(), requires_grad=False))


def cut_heads(layer: nn.Module, parts: AttentionParts, hessian: torch.Tensor | None, heads: int, kv: int,
              head_dim: int, per_group: int, dampening: float, forced: list[int] | None = None) -> dict:
    """Remove ``per_group`` query heads from every key/value group (MHA: ``per_group`` heads with their
    key/value heads) by group OBS on the output projection; returns the entry. ``forced``: remove
    exactly these heads (a journaled cut replayed; ``hessian`` may then be None)."""
    import copy

    modules = dict(layer.named_modules())
    o = modules[parts.o]
    mha = heads == kv
    w = weight_matrix(o).float()
    h = _hessian_or_identity({"o": hessian}, "o", w.shape[1], w.device)
    if mha:
        result = remove_groups(w, h, head_dim, per_group, dampening, forced=forced)
    else:
        result = remove_groups(w, h, head_dim, per_group * kv, dampening, steps=per_group,
                               choose=per_group_choice(heads // kv, kv), forced=forced)
    kept_heads = sorted(set(range(heads)) - set(result.removed))
    rows = torch.tensor([h * head_dim + d for h in kept_heads for d in range(head_dim)], dtype=torch.long)
    if parts.fused:  # q, then k, then v in one projection
        q_rows, kv_rows = heads * head_dim, kv * head_dim
        kept_kv = rows if mha else torch.arange(kv_rows)
        keep_rows(modules[parts.q], torch.cat([rows, q_rows + kept_kv, q_rows + kv_rows + kept_kv]))
    else:
        keep_rows(modules[parts.q], rows)
        if mha:
            keep_rows(modules[parts.k], rows)
            keep_rows(modules[parts.v], rows)
    set_columns(o, result.weight, rows)
    attention = modules[parts.attention]
    new_heads = len(kept_heads)
    new_kv = new_heads if mha else kv
    if hasattr(attention, "num_key_value_groups"):
        attention.num_key_value_groups = new_heads // new_kv
    for name, value in (("num_heads", new_heads), ("num_attention_heads", new_heads),
                        ("num_key_value_heads", new_kv)):
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, value)
    if getattr(attention, "config", None) is not None:  # forwards that read the head counts from the config
        attention.config = copy.copy(attention.config)
        attention.config.num_attention_heads, attention.config.num_key_value_heads = new_heads, new_kv
        attention.config.head_dim = head_dim
    return {"heads_before": heads, "heads_after": new_heads, "kv_heads_after": new_kv,
            "removed_heads": sorted(result.removed), "relative_error": result.error / max(result.baseline, 1e-30)}
