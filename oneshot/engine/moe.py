"""Mixture-of-experts steps of one layer: removing whole experts (``--remove-experts``, scored by REAP
or routed-token frequency), and the fallback for experts the router sent too few tokens under
``--moe-calibrate routed``."""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import nn

from ..errors import OneshotError
from ..model.experts import EXPERT_COUNT_KEYS, TOP_K_KEYS, ExpertMatrix, ExpertRouting, expert_count, router_names
from ..tensors import call_layer
from .capture import Captured, layer_inputs

MIN_EXPERT_TOKENS = 64  # an expert matrix with fewer routed tokens is calibrated on every token (routed mode)


def removal_count(experts: int, fraction: float, groups: int = 1) -> int:
    """Experts to remove from a block of ``experts`` in ``groups`` routing groups (the same number
    from each group, so group-limited routing stays valid)."""
    per_group = experts // groups
    return groups * min(per_group - 1, round(fraction * per_group))


def routing_groups(config) -> int:
    groups = getattr(config, "n_group", None)
    return groups if isinstance(groups, int) and groups > 1 else 1


def check_removal(fraction: float, experts: list[int], config) -> None:
    """Before any weight loads: the fraction removes at least one expert and leaves at least one."""
    if not 0 < fraction < 1:
        raise OneshotError(f"--remove-experts must be a fraction strictly between 0 and 1, got {fraction}")
    groups = routing_groups(config)
    for count in experts:
        n = removal_count(count, fraction, groups)
        if n < 1:
            raise OneshotError(f"--remove-experts {fraction:g} of {count} experts removes none; ask for at least "
                               f"{math.ceil(0.5 / (count // groups) * 1000) / 1000:g}")


@torch.no_grad()
def score_experts(layer: nn.Module, i: int, prefix: str, captured: Captured, device, compute, saliency: bool,
                  group=None):
    """One dense pass of layer ``i`` recording, per experts module, routed tokens and the REAP sum
    (summed over the ranks of a torch.distributed ``group``)."""
    routing = ExpertRouting(layer, prefix, {})
    routing.record, routing.saliency = True, saliency
    with routing:
        for _, hidden, args, kwargs in layer_inputs(captured, i, device, compute):
            call_layer(layer, hidden, args, kwargs)
    if group is not None:
        for full in sorted(routing.blocks):
            group.all_reduce(routing.blocks[full].routed)
            group.all_reduce(routing.blocks[full].saliency)
    return routing


def _slice_rows(module: nn.Module, count: int, keep: torch.Tensor) -> None:
    """Every parameter and buffer of ``module`` (not its children) with one row per expert, cut to ``keep``."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.dim() >= 1 and param.shape[0] == count:
            setattr(module, name, nn.Parameter(param.data[keep.to(param.device)].clone(),
                                               requires_grad=param.requires_grad))
    for name, buf in list(module.named_buffers(recurse=False)):
        if buf is not None and buf.dim() >= 1 and buf.shape[0] == count:
            module.register_buffer(name, buf[keep.to(buf.device)].clone(), persistent=name not in
                                   module._non_persistent_buffers_set)


def _set_counts(obj, count: int, kept: int) -> None:
    for key in EXPERT_COUNT_KEYS:
        if getattr(obj, key, None) == count:
            setattr(obj, key, kept)
    for key in TOP_K_KEYS:
        value = getattr(obj, key, None)
        if isinstance(value, int) and value > kept:
            setattr(obj, key, kept)


def choose_removals(routing: ExpertRouting, fraction: float, score: str, config) -> dict[str, dict]:
    """Experts module -> the experts to remove (lowest score first, the same number from each routing
    group) and every expert's score and routed tokens."""
    groups = routing_groups(config)
    chosen = {}
    for full, block in routing.blocks.items():
        count, routed = block.count, block.routed
        scores = (block.saliency / routed.clamp(min=1)) if score == "reap" else routed.clone()
        n, size = removal_count(count, fraction, groups), count // groups
        drop = []
        for g in range(groups):  # ties go to the higher index: deterministic
            members = sorted(range(g * size, (g + 1) * size), key=lambda e: (float(scores[e]), -e))
            drop += members[: n // groups]
        chosen[full] = {"drop": sorted(drop), "scores": scores, "routed": routed}
    return chosen


def drop_experts(layer: nn.Module, path: str, drop: list[int], config) -> Counter:
    """Remove experts ``drop`` from the experts module at ``path`` in ``layer``, with their rows of the
    routers beside it, and set the expert counts (module attributes and ``config``); returns the
    parameters removed: ``all``, ``matrix`` (of two or more dimensions), ``expert`` (the experts' matrices)."""
    module = layer.get_submodule(path)
    count = expert_count(module)
    keep = torch.tensor([e for e in range(count) if e not in set(drop)], dtype=torch.long)
    removed = Counter()
    for p in module.parameters(recurse=False):
        if p.shape[0] == count:
            n = p.shape[1:].numel() * len(drop)
            removed["all"] += n
            removed["matrix"] += n if p.dim() >= 2 else 0
            removed["expert"] += n if p.dim() == 3 else 0
    parent_path = path.rpartition(".")[0]
    parent = layer.get_submodule(parent_path) if parent_path else layer
    routers = router_names(layer)
    _slice_rows(module, count, keep)
    _set_counts(module, count, len(keep))
    for name, child in parent.named_children():
        if (f"{parent_path}.{name}" if parent_path else name) in routers:
            for p in child.parameters(recurse=False):
                if p.shape[0] == count:
                    removed["all"] += p.shape[1:].numel() * len(drop)
                    removed["matrix"] += p.shape[1:].numel() * len(drop) if p.dim() >= 2 else 0
            _slice_rows(child, count, keep)
            _set_counts(child, count, len(keep))
    _set_counts(parent, count, len(keep))
    _set_counts(config, count, len(keep))
    return removed


def remove_experts(layer: nn.Module, prefix: str, routing: ExpertRouting, fraction: float, score: str,
                   config) -> list[dict]:
    """Remove the lowest-scoring experts of every experts module in ``layer``; the report's entries."""
    entries = []
    for full, c in choose_removals(routing, fraction, score, config).items():
        count, scores, routed = routing.blocks[full].count, c["scores"], c["routed"]
        removed = drop_experts(layer, full[len(prefix) + 1:], c["drop"], config)
        total = float(routed.sum()) or 1.0
        kept = [e for e in range(count) if e not in c["drop"]]
        entries.append({
            "block": full, "experts_before": count, "experts_after": len(kept), "score": score,
            "removed": [{"expert": e, "score": float(scores[e]), "token_share": float(routed[e]) / total}
                        for e in c["drop"]],
            "kept_scores": [float(scores[kept].min()), float(scores[kept].max())],
            "kept_token_share": float(routed[kept].sum()) / total,
            "removed_parameters": removed["all"],
            "removed_matrix_parameters": removed["matrix"],
            "removed_expert_parameters": removed["expert"],
            "kept": kept,
        })
    return entries


def replay_removals(model: nn.Module, entries: list[dict]) -> None:
    """A resumed run: remove the experts its partial run removed (the finished layers' shapes)."""
    from ..model.structure import find_decoder_layers

    path, layers = find_decoder_layers(model)
    config = getattr(model.config, "text_config", None) or model.config
    for entry in entries:
        prefix = f"{path}.{entry['layer']}"
        drop_experts(layers[entry["layer"]], entry["block"][len(prefix) + 1:], [r["expert"] for r in entry["removed"]],
                     config)


def expert_chunks(linears: dict, needs_hessian: bool, heldout: bool, budget: int) -> list[set[str]] | None:
    """The expert matrices in groups whose statistics fit ``budget`` bytes (an expert's matrices stay
    together), or None when all of them fit at once."""
    groups: dict[tuple, set[str]] = {}
    sizes: dict[tuple, int] = {}
    for name, module in linears.items():
        if isinstance(module, ExpertMatrix):
            key = (id(module.owner), module.index)
            d_in = module.shape[1]
            groups.setdefault(key, set()).add(name)
            sizes[key] = sizes.get(key, 0) + (d_in * d_in if needs_hessian else 3 * d_in) * 4 * (2 if heldout else 1)
    if sum(sizes.values()) <= budget:
        return None
    chunks, current, size = [], set(), 0
    for key, names in groups.items():
        if current and size + sizes[key] > budget:
            chunks.append(current)
            current, size = set(), 0
        current |= names
        size += sizes[key]
    return chunks + [current]


def underseen(linears: dict, stats, routing: ExpertRouting) -> dict[str, set[int]]:
    """Experts module -> experts whose matrices gathered fewer than :data:`MIN_EXPERT_TOKENS` tokens."""
    out: dict[str, set[int]] = {}
    for name, module in linears.items():
        if not isinstance(module, ExpertMatrix):
            continue
        lead = stats.leader.get(name, name)
        st = stats.stats.get(lead)
        if st is None or st.tokens < MIN_EXPERT_TOKENS:
            block = name.rsplit(".", 2)[0]
            out.setdefault(block, set()).add(module.index)
    return {b: e for b, e in out.items() if b in routing.blocks}
