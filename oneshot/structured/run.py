"""Structured removal at run time: Block Influence, dropping blocks, each layer's Hessians and cut, and
the :class:`Remover` the engine's layer loop drives."""

from __future__ import annotations

import torch
from torch import nn

from ..engine.layerio import LayerIO, onload, restore
from ..errors import OneshotError
from .plan import config_keys, plan_width
from .surgery import (
    ConsumerHessians,
    WidthPlan,
    attention_parts,
    cut_channels,
    cut_heads,
    expert_consumers,
    head_counts,
    mlp_parts,
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


