"""Structured pruning of a whole model: the plan from the request, Block Influence, and the layer loop
that removes heads and channels on the calibration inputs the pruned layers before produce."""

from __future__ import annotations

import torch
from torch import nn

from ..engine.layerio import LayerIO, onload, restore
from ..errors import OneshotError
from .obs import remove_groups
from .surgery import (
    AttentionParts,
    ConsumerHessians,
    MLPParts,
    WidthPlan,
    attention_parts,
    channel_cost,
    channel_error,
    check_supported,
    cut_channels,
    cut_heads,
    expert_consumers,
    head_cost,
    head_counts,
    in_width,
    mlp_parts,
    mlp_width,
    out_width,
    per_group_choice,
    weight_matrix,
)


def batches_of(input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(input_ids.split(max(1, batch_size or 8)))


def _run_layer(layer, captured, i: int, device, dtype, replace: bool, experts: dict | None = None):
    """Every captured batch through layer ``i``; yields (hidden in, hidden out). ``replace``: the
    outputs become the next layer's inputs. ``experts``: expert matrices whose hooks must see each
    expert's own tokens (the experts run their per-expert loop)."""
    import contextlib

    from ..engine.capture import layer_inputs
    from ..model.experts import ExpertRouting
    from ..tensors import call_layer

    with ExpertRouting(layer, "", experts) if experts else contextlib.nullcontext():
        for b, (_, hidden, args, kwargs) in enumerate(layer_inputs(captured, i, device, dtype)):
            out = call_layer(layer, hidden, args, kwargs)
            yield hidden, out
            if replace:
                captured.hidden[b] = out.to(captured.hidden[b].device, captured.hidden[b].dtype)


def _hessians(layer, captured, i: int, device, dtype, consumers: dict, group=None) -> dict:
    """Input Hessians of the ``consumers`` (name -> module) of layer ``i`` on its calibration inputs
    (under torchrun: summed over the ranks' windows, so every rank removes the same units)."""
    from ..model.experts import ExpertMatrix

    hooks = ConsumerHessians(consumers)
    experts = {n: m for n, m in consumers.items() if isinstance(m, ExpertMatrix)}
    for _ in _run_layer(layer, captured, i, device, dtype, replace=False, experts=experts):
        pass
    hooks.close()
    if group is not None:
        for name in sorted(consumers):  # every rank the same tensors in the same order
            h = hooks.h.get(name)
            if h is None:  # an expert no token of this rank reached
                width = consumers[name].weight.shape[1]
                h = hooks.h[name] = torch.zeros(width, width, dtype=torch.float32, device=device)
            group.all_reduce(h)
    return hooks.h


def _on(i: int, layer: nn.Module, device, dtype, io: LayerIO | None = None) -> dict:
    """Layer ``i`` on ``device`` in ``dtype``, as the engine loads a layer; returns what :func:`_off` needs."""
    return onload(io or LayerIO(), i, layer, device, dtype)


def _off(i: int, layer: nn.Module, device, stored: dict, io: LayerIO | None = None) -> None:
    restore(layer, stored)
    (io or LayerIO()).release(i, layer, torch.device(device))


@torch.no_grad()
def block_influence(model, layers: nn.ModuleList, batches, device, dtype, group=None,
                    io: LayerIO | None = None) -> list[float]:
    """ShortGPT's Block Influence of every decoder block on the dense model: 1 − mean over calibration
    tokens of cos(block input, block output) (under torchrun, over every rank's tokens). ``io``: where
    the layers come from (streamed from the checkpoint, one at a time)."""
    from ..engine.capture import capture_inputs

    io = io or LayerIO()
    captured = capture_inputs(model, layers, batches, device, torch.device("cpu"), io)
    io.captured(model)
    scores = []
    for i, layer in enumerate(layers):
        stored = _on(i, layer, device, dtype, io)
        total, count = 0.0, 0
        for hidden, out in _run_layer(layer, captured, i, device, dtype, replace=True):
            cos = torch.nn.functional.cosine_similarity(hidden.float(), out.float(), dim=-1)
            total += float(cos.sum())
            count += cos.numel()
        _off(i, layer, device, stored, io)
        if group is not None:
            sums = torch.tensor([total, float(count)], dtype=torch.float64)
            group.all_reduce(sums)
            total, count = float(sums[0]), int(sums[1])
        scores.append(1.0 - total / max(count, 1))
    if not io.streaming:
        model.to("cpu")
    return scores


def drop_blocks(model, path: str, layers: nn.ModuleList, drop: list[int]) -> None:
    """Remove these decoder blocks; the config's layer count and ``layer_types`` follow, and the kept
    blocks are renumbered (their attention's ``layer_idx`` indexes the cache)."""
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    kept = nn.ModuleList([layers[i] for i in keep])
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], kept)
    for new, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.num_hidden_layers = len(keep)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[i] for i in keep]


def plan_width(layer, mlp: MLPParts | None, attn: AttentionParts | None, budget: float, heads: int, kv: int,
               head_dim: int, hessians: dict | None, dampening: float, align: int = 1) -> tuple[WidthPlan, list[dict]]:
    """How many channels and heads every layer gives up for ``budget`` parameters a layer: with both
    structures, each feasible head count is tried on this layer (the first) and the split with the least
    total OBS error (both errors are changes of the residual stream, comparable) is kept."""
    mha = heads == kv
    max_per_group = (heads - 1) if mha else (heads // kv - 1)
    modules = dict(layer.named_modules())
    ccost = channel_cost(layer, mlp) if mlp else 0
    hcost = head_cost(layer, attn, head_dim, mha) if attn else 0
    width = mlp_width(layer, mlp) if mlp else 0
    step = 1 if mha else kv  # query heads removed per unit of heads_per_group
    if mlp is None:  # heads alone: the count closest to the budget
        most = max_per_group * step * hcost
        if budget > most * 1.05:
            raise OneshotError(f"--structure heads can remove at most {most:,.0f} parameters a decoder block (all but "
                               f"one query head per key/value group), {budget:,.0f} asked: use a smaller --remove "
                               "or add channels")
        r = min(range(max_per_group + 1), key=lambda k: abs(budget - k * step * hcost))
        return WidthPlan(0, r), [{"heads_per_group": r, "channels": 0}]
    tried = []
    for r in (range(max_per_group + 1) if attn else [0]):
        rest = budget - r * step * hcost
        if rest < 0 and r:
            break
        channels = int(round(max(rest, 0) / ccost))
        if channels > width - align:
            continue
        if channels:  # the kept width a multiple of `align` (N:M groups, fast GEMM shapes)
            kept = max(align, int(round((width - channels) / align)) * align)
            channels = max(0, width - kept)
        tried.append({"heads_per_group": r, "channels": channels})
    if not tried:
        raise OneshotError(f"--remove asks for more than the MLP channels of a decoder block hold ({width - align} of "
                           f"{width} at most): use a smaller fraction, or add heads or blocks to --structure")
    if len(tried) > 1 and hessians is not None:
        for option in tried:
            error = 0.0
            if option["heads_per_group"]:
                o = weight_matrix(modules[attn.o]).float()
                count = option["heads_per_group"] * (1 if mha else kv)
                error += remove_groups(o, hessians[attn.o], head_dim, count, dampening,
                                       steps=option["heads_per_group"],
                                       choose=None if mha else per_group_choice(heads // kv, kv)).error
            if option["channels"]:
                error += channel_error(layer, mlp, hessians, option["channels"], dampening)
            option["error"] = error
        best = min(tried, key=lambda o: o["error"])
    elif hessians is None:  # checking the request only (no statistics yet)
        best = tried[-1]
    else:
        best = tried[0]
    return WidthPlan(best["channels"], best["heads_per_group"]), tried


class Remover:
    """Structured removal a layer at a time, for the in-memory loop here and the engine's streaming
    loop alike: the budget and layouts from the model (its meta skeleton will do), the blocks to drop
    (:meth:`choose_blocks`), the width plan decided on the first layer cut, each layer's cut
    (:meth:`cut`), what went (:meth:`state`, journaled) and the config and report at the end."""

    def __init__(self, model, structures: set[str], remove: float, align: int = 1, dampening: float = 0.01,
                 trust_remote_code: bool = False, group=None):
        from ..model.structure import find_decoder_layers

        _, layers = find_decoder_layers(model)
        self.structures, self.remove, self.align, self.dampening, self.group = \
            structures, remove, align, dampening, group
        self.heads, self.kv, self.head_dim = head_counts(model.config.get_text_config())
        self.layers_before = len(layers)
        self.block_params = sum(p.numel() for p in layers.parameters())
        self.per_block = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        width = structures & {"heads", "channels"}
        self.mlp = mlp_parts(layers[0]) if "channels" in width else None
        self.attn = attention_parts(layers[0]) if "heads" in width else None
        self.keys = config_keys(model.config, width, layers[0], align, trust_remote_code) if width else {}
        self.drop: list[int] = []
        self.scores: list[float] | None = None
        self.plan: WidthPlan | None = None
        self.tried: list[dict] = []
        self.entries: list[dict] = []

    def blocks_to_drop(self) -> int:
        if "blocks" not in self.structures:
            return 0
        budget = self.remove * self.block_params
        share = budget if self.structures == {"blocks"} else budget / 2
        count = int(round(share / (self.block_params / self.layers_before)))
        if count >= self.layers_before:
            raise OneshotError(f"--remove {self.remove}: that is {count} of the {self.layers_before} decoder "
                               "blocks; keep at least one")
        return count

    def choose_blocks(self, model, layers, batches, device, dtype, io: LayerIO | None = None) -> None:
        """The blocks of least Block Influence on the dense model go."""
        count = self.blocks_to_drop()
        if count:
            self.scores = block_influence(model, layers, batches, device, dtype, self.group, io)
            self.drop = sorted(sorted(range(len(layers)), key=lambda i: self.scores[i])[:count])

    @property
    def per_layer(self) -> float:
        """Parameters each kept layer gives up as heads and channels."""
        left = self.remove * self.block_params - sum(self.per_block[i] for i in self.drop)
        return left / (self.layers_before - len(self.drop)) if self.mlp or self.attn else 0.0

    def new_index(self, i: int) -> int:
        """Layer ``i``'s index once the dropped blocks are gone."""
        return i - sum(1 for d in self.drop if d < i)

    def cut(self, i: int, layer: nn.Module, captured, device, dtype, index: int | None = None) -> dict | None:
        """Remove this layer's heads and channels on its calibration inputs (``captured``, layer ``i``):
        heads first, then the MLP's channels on the inputs the cut attention gives it. ``index``: the
        layer's number in the output (default: ``i`` once the dropped blocks are gone)."""
        if self.per_layer <= 0:
            return None
        mlp, attn = self.mlp, self.attn
        modules = dict(layer.named_modules())
        mlp_consumers = ({} if mlp is None else expert_consumers(layer, mlp) if mlp.experts
                         else {mlp.consumer: modules[mlp.consumer]})
        attn_consumers = {attn.o: modules[attn.o]} if attn else {}
        hessians = _hessians(layer, captured, i, device, dtype, {**attn_consumers, **mlp_consumers}, self.group)
        if self.plan is None:
            self.plan, self.tried = plan_width(layer, mlp, attn, self.per_layer, self.heads, self.kv, self.head_dim,
                                               hessians, self.dampening, self.align)
        entry = {"layer": self.new_index(i) if index is None else index}
        if attn is not None and self.plan.heads_per_group:
            entry["attention"] = cut_heads(layer, attn, hessians[attn.o], self.heads, self.kv, self.head_dim,
                                           self.plan.heads_per_group, self.dampening)
            if mlp is not None and self.plan.channels:  # the MLP's inputs as the cut attention makes them
                hessians = _hessians(layer, captured, i, device, dtype, mlp_consumers, self.group)
        if mlp is not None and self.plan.channels:
            entry["mlp"] = cut_channels(layer, mlp, hessians, self.plan.channels, self.dampening)
        self.entries.append(entry)
        return entry

    def replay(self, i: int, layer: nn.Module) -> bool:
        """Cut layer ``i`` (a layer a partial run finished) to the shapes the journal says it was cut to,
        without statistics: its tensors are loaded next. False for a dropped block (no tensors)."""
        if i in self.drop:
            return False
        k = self.new_index(i)
        entry = self.entries[k] if k < len(self.entries) else {}
        if "attention" in entry:
            att = entry["attention"]
            cut_heads(layer, self.attn, None, self.heads, self.kv, self.head_dim, self.plan.heads_per_group,
                      self.dampening, forced=att["removed_heads"])
        if "mlp" in entry:
            cut_channels(layer, self.mlp, {}, self.plan.channels, self.dampening,
                         forced=entry["mlp"]["removed_channels"])
        return True

    def state(self) -> dict:
        """What went so far, for a journal (:meth:`restore` reads it back)."""
        plan = None if self.plan is None else [self.plan.channels, self.plan.heads_per_group]
        return {"drop": self.drop, "scores": self.scores, "plan": plan, "tried": self.tried, "entries": self.entries}

    def restore(self, state: dict) -> None:
        self.drop, self.scores, self.tried, self.entries = \
            list(state["drop"]), state["scores"], state["tried"], list(state["entries"])
        self.plan = None if state["plan"] is None else WidthPlan(*state["plan"])

    def finish(self, model, dropped: bool = False) -> dict:
        """The dropped blocks out of ``model`` (unless ``dropped`` already) and its config's sizes updated;
        returns the report's ``structured`` entry."""
        from ..model.structure import find_decoder_layers

        path, layers = find_decoder_layers(model)
        if self.drop and not dropped:
            drop_blocks(model, path, layers, self.drop)
            path, layers = find_decoder_layers(model)
        text = model.config.get_text_config()
        first = self.entries[0] if self.entries else {}
        for config in {id(c): c for c in (model.config, text)}.values():
            if "mlp" in first:
                setattr(config, self.keys["mlp"], first["mlp"]["channels_after"])
            if "attention" in first:
                config.num_attention_heads = first["attention"]["heads_after"]
                config.num_key_value_heads = first["attention"]["kv_heads_after"]
                config.head_dim = self.head_dim
        report: dict = {"structures": sorted(self.structures), "remove": self.remove,
                        "decoder_parameters_before": self.block_params, "layers_before": self.layers_before}
        if "blocks" in self.structures:
            report["blocks"] = {"criterion": "block influence (1 - cos(input, output))",
                                "scores": [round(s, 6) for s in self.scores or []], "removed": self.drop}
        if self.plan is not None:
            report["width_plan"] = {"channels": self.plan.channels, "heads_per_group": self.plan.heads_per_group,
                                    "tried_on_layer_0": self.tried}
            report["layers"] = self.entries
        report["layers_after"] = len(layers)
        report["decoder_parameters_after"] = sum(p.numel() for p in layers.parameters())  # meta ones count too
        return report


STRUCTURES = ("heads", "channels", "blocks")


def parse_structures(text: str) -> set[str]:
    parts = {p.strip() for p in str(text).split(",") if p.strip()}
    if not parts or parts - set(STRUCTURES):
        raise OneshotError(f"--structure takes heads, channels, blocks or a comma list of them, got {text!r}")
    return parts


MLP_WIDTH_KEYS = ("moe_intermediate_size", "intermediate_size", "ffn_dim", "n_inner")


def _skeleton_layer(hf_config, changes: dict, trust_remote_code: bool = False):
    """The first decoder layer of a meta-device model built from ``hf_config`` with ``changes`` to its
    text config; None when transformers refuses that config."""
    import copy

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..model.structure import find_decoder_layers

    config = copy.deepcopy(hf_config)
    for key, value in changes.items():
        setattr(config.get_text_config(), key, value)
    try:
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - an inconsistent config is the answer "cannot hold this"
        return None
    return find_decoder_layers(skeleton)[1][0]


def config_keys(hf_config, structures: set[str], layer, align: int = 8, trust_remote_code: bool = False) -> dict:
    """Which config entries hold the new sizes, proven on meta-device models built with smaller values:
    ``mlp``, the key of the MLP width (``intermediate_size``, ``ffn_dim``, ``n_inner``,
    ``moe_intermediate_size``), found when set a little smaller it makes the layer's MLP that much
    narrower; heads, when a config with fewer heads and the same ``head_dim`` gives projections of that
    size (OPT's and GPT-2's derive the head size from the hidden size instead: refused)."""
    text = hf_config.get_text_config()
    keys: dict = {}
    if "channels" in structures:
        mlp = mlp_parts(layer)
        width = mlp_width(layer, mlp)
        smaller = width - (align if width > align else 1)
        for key in MLP_WIDTH_KEYS:
            value = getattr(text, key, None)
            if value != width and not (key == "n_inner" and value is None and width == 4 * text.hidden_size):
                continue
            probe = _skeleton_layer(hf_config, {key: smaller}, trust_remote_code)
            parts = mlp_parts(probe) if probe is not None else None
            if parts is not None and mlp_width(probe, parts) == smaller:
                keys["mlp"] = key
                break
        if "mlp" not in keys:
            raise OneshotError(f"--structure channels: no entry of {type(text).__name__} sets the MLP width "
                               f"({width}) of {type(layer).__name__}, so a narrower checkpoint would not load")
    if "heads" in structures:
        heads, kv, head_dim = head_counts(text)
        new_heads = heads - (1 if heads == kv else kv)
        new_kv = new_heads if heads == kv else kv
        probe = _skeleton_layer(hf_config, {"num_attention_heads": new_heads, "num_key_value_heads": new_kv,
                                            "head_dim": head_dim}, trust_remote_code)
        parts = attention_parts(probe) if probe is not None else None
        modules = dict(probe.named_modules()) if parts is not None else {}
        q_rows = (new_heads + 2 * new_kv) * head_dim if parts is not None and parts.fused else new_heads * head_dim
        if parts is None or out_width(modules[parts.q]) != q_rows or in_width(modules[parts.o]) != new_heads * head_dim:
            raise OneshotError(f"--structure heads: {type(text).__name__} derives the head size from hidden_size / "
                               "heads, so a checkpoint with fewer heads would not load; use channels or blocks")
    return keys


def check_request(hf_config, structures: set[str], remove: float, trust_remote_code: bool = False,
                  align: int = 1) -> dict:
    """The request against the model's shapes on the meta device, before any weight is read: the layouts
    can be cut, and the fraction can be reached (blocks: at least one kept; heads: at most all but one per
    key/value group; channels: all but one). Returns the block and width budgets."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..model.structure import find_decoder_layers

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    _, layers = find_decoder_layers(skeleton)
    text = skeleton.config.get_text_config()
    check_supported(layers, structures, text)
    sizes = {sum(p.numel() for p in layer.parameters()) for layer in layers}
    if len(sizes) > 1 and structures & {"heads", "channels"}:
        raise OneshotError("--structure heads/channels: the decoder blocks differ in size; only blocks can be "
                           "removed from this model for now")
    block_params = sum(p.numel() for p in layers.parameters())
    budget = remove * block_params
    blocks = 0
    if "blocks" in structures:
        share = budget if structures == {"blocks"} else budget / 2
        blocks = int(round(share / (block_params / len(layers))))
        if blocks >= len(layers):
            raise OneshotError(f"--remove {remove}: that is {blocks} of the {len(layers)} decoder blocks; keep at "
                               "least one")
        budget -= blocks * block_params / len(layers)
    width = structures & {"heads", "channels"}
    if width and budget > 0:
        heads, kv, head_dim = head_counts(text)
        layer = layers[0]
        config_keys(hf_config, width, layer, align, trust_remote_code)
        plan_width(layer, mlp_parts(layer) if "channels" in width else None,
                   attention_parts(layer) if "heads" in width else None,
                   budget / (len(layers) - blocks), heads, kv, head_dim, None, 0.01, align)
    return {"blocks": blocks, "width_budget": budget}


def channel_alignment(cfg) -> int:
    """The kept MLP width is a multiple of this: 8 (GEMM-friendly shapes), or M of an N:M pattern pruned
    afterwards when that is larger."""
    nm = cfg.nm if cfg.unstructured else None
    return max(8, nm[1] if nm else 1)
