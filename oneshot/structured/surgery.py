"""Cutting a decoder layer's modules: which linears make and read a channel or a head, what one costs
in parameters, and the cut itself (rows of the producers, compensated columns of the consumer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import OneshotError
from .obs import remove_groups


def _set_linear(linear: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Keep these output rows (and bias entries) of ``linear``."""
    w = linear.weight.data
    _set_linear(linear, w[rows.to(w.device)], linear.bias.data[rows.to(w.device)] if linear.bias is not None else None)


def set_columns(linear: nn.Linear, weight: torch.Tensor, columns: torch.Tensor) -> None:
    """``linear`` reads only these input columns, with the (compensated) ``weight`` [d_out, n] given."""
    kept = weight[:, columns.to(weight.device)].to(linear.weight.dtype).to(linear.weight.device)
    _set_linear(linear, kept, None)


@dataclass
class MLPParts:
    producers: list[str]  # linears whose output rows are the channels (gate, up / fc1)
    consumer: str  # the linear that reads the channels (down / fc2)


@dataclass
class AttentionParts:
    attention: str  # the attention module
    q: str
    k: str
    v: str
    o: str


MLP_LAYOUTS = [
    MLPParts(["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj"),
    MLPParts(["mlp.fc1"], "mlp.fc2"),
]
ATTENTION_LAYOUTS = [
    AttentionParts("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
]


def _has(layer: nn.Module, names: list[str]) -> bool:
    modules = dict(layer.named_modules())
    return all(isinstance(modules.get(n), nn.Linear) for n in names)


def mlp_parts(layer: nn.Module) -> MLPParts | None:
    return next((p for p in MLP_LAYOUTS if _has(layer, p.producers + [p.consumer])), None)


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
        raise OneshotError(f"--structure channels: {type(layer).__name__} has no gate/up/down or fc1/fc2 MLP "
                           "oneshot can cut (its MLP layout is not supported yet)")
    if "heads" in structures and attention_parts(layer) is None:
        raise OneshotError(f"--structure heads: {type(layer).__name__} has no separate q/k/v/o projections "
                           "oneshot can cut (fused attention projections are not supported yet)")
    if "heads" in structures:
        heads, kv, _ = head_counts(config)
        if heads % kv:
            raise OneshotError(f"--structure heads: {heads} query heads are not a multiple of {kv} key/value heads")



def layer_linear_params(layer: nn.Module) -> int:
    """Parameters of a decoder layer's linears (weights and biases): what width pruning removes from."""
    return sum(p.numel() for m in layer.modules() if isinstance(m, nn.Linear) for p in m.parameters())


def channel_cost(layer: nn.Module, parts: MLPParts) -> int:
    """Parameters one MLP channel holds: a row of each producer (and its bias) and a consumer column."""
    modules = dict(layer.named_modules())
    cost = sum(modules[n].in_features + (1 if modules[n].bias is not None else 0) for n in parts.producers)
    return cost + modules[parts.consumer].out_features


def head_cost(layer: nn.Module, parts: AttentionParts, head_dim: int, with_kv: bool) -> int:
    """Parameters one query head holds (rows of q, columns of o; with its own k/v head, those rows too)."""
    modules = dict(layer.named_modules())
    names = [parts.q, parts.k, parts.v] if with_kv else [parts.q]
    cost = sum(head_dim * (modules[n].in_features + (1 if modules[n].bias is not None else 0)) for n in names)
    return cost + head_dim * modules[parts.o].out_features


@dataclass
class WidthPlan:
    channels: int  # MLP channels removed from every layer
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


def cut_channels(layer: nn.Module, parts: MLPParts, hessian: torch.Tensor, count: int, dampening: float) -> dict:
    """Remove ``count`` MLP channels of ``layer`` by group OBS on the consumer; returns the entry."""
    modules = dict(layer.named_modules())
    consumer = modules[parts.consumer]
    width = consumer.in_features
    result = remove_groups(consumer.weight.data.float(), hessian, 1, count, dampening)
    kept = torch.tensor(sorted(set(range(width)) - set(result.removed)), dtype=torch.long)
    for name in parts.producers:
        keep_rows(modules[name], kept)
    set_columns(consumer, result.weight, kept)
    return {"channels_before": width, "channels_after": len(kept), "removed_channels": sorted(result.removed),
            "relative_error": result.error / max(result.baseline, 1e-30)}


def cut_heads(layer: nn.Module, parts: AttentionParts, hessian: torch.Tensor, heads: int, kv: int, head_dim: int,
              per_group: int, dampening: float) -> dict:
    """Remove ``per_group`` query heads from every key/value group (MHA: ``per_group`` heads with their
    key/value heads) by group OBS on ``o_proj``; returns the entry."""
    modules = dict(layer.named_modules())
    o = modules[parts.o]
    mha = heads == kv
    if mha:
        result = remove_groups(o.weight.data.float(), hessian, head_dim, per_group, dampening)
    else:
        result = remove_groups(o.weight.data.float(), hessian, head_dim, per_group * kv, dampening,
                               steps=per_group, choose=per_group_choice(heads // kv, kv))
    kept_heads = sorted(set(range(heads)) - set(result.removed))
    rows = torch.tensor([h * head_dim + d for h in kept_heads for d in range(head_dim)], dtype=torch.long)
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
    return {"heads_before": heads, "heads_after": new_heads, "kv_heads_after": new_kv,
            "removed_heads": sorted(result.removed), "relative_error": result.error / max(result.baseline, 1e-30)}
