"""Planning a structured removal before and while it runs: the request checked on the model's meta
skeleton (layouts, reachable fractions, the config entries that hold the new sizes) and how many
heads and channels every layer gives up."""

from __future__ import annotations

from ..errors import OneshotError
from .obs import remove_groups
from .surgery import (
    AttentionParts,
    MLPParts,
    WidthPlan,
    attention_parts,
    channel_cost,
    channel_error,
    check_supported,
    head_cost,
    head_counts,
    in_width,
    mlp_parts,
    mlp_width,
    out_width,
    per_group_choice,
    weight_matrix,
)


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
