"""The statistics pass(es) of one dense decoder layer, with what mixture-of-experts layers add:
every token through every expert (``--moe-calibrate all``), the fallback for experts the router
sent too few tokens (``routed``), and experts gathered in chunks when their statistics do not fit."""

from __future__ import annotations

from ..model.experts import ExpertMatrix, ExpertRouting
from ..runtime import available_bytes
from ..tensors import call_layer
from .layer import LayerPruner
from .moe import MIN_EXPERT_TOKENS, expert_chunks, underseen
from .state import RunState


def collect(plan, layer, linears: dict, pruner: LayerPruner, routing: ExpertRouting, inputs, state: RunState,
             prefix: str, want_targets: bool) -> tuple[int, list]:
    """The statistics pass(es) of the dense layer; returns the passes run and, if wanted, the dense
    layer's outputs. When the experts' statistics do not fit at once (a quarter of the free memory)
    they are gathered in chunks of experts, one pass each, and each chunk is solved and its
    statistics freed before the next (an expert's statistics depend only on what runs before it)."""
    chunks = None
    if routing and plan.group is None:
        budget = plan.moe.get("stats_budget") or available_bytes(plan.device) // 4
        chunks = expert_chunks(linears, plan.needs_hessian, plan.heldout_from is not None, budget)
    experts = {n for n, m in linears.items() if isinstance(m, ExpertMatrix)}
    passes_of = [None] if chunks is None else [(set(linears) - experts) | chunks[0]] + chunks[1:]
    passes, targets = 0, []
    for k, names in enumerate(passes_of):
        passes += 1
        pruner.only = names
        routing.only = None if names is None else by_block(names & experts, linears)
        routing.record, routing.quiet = k == 0, pruner.paused
        routing.all_tokens = plan.moe["calibrate"] == "all"
        try:
            with pruner.collecting():
                for offset, hidden, args, kwargs in inputs():
                    pruner.start_batch(offset)
                    out = call_layer(layer, hidden, args, kwargs)
                    if want_targets and k == 0:
                        targets.append(out.to(plan.store))
        finally:
            routing.record = routing.all_tokens = False
            routing.only = pruner.only = None
        pruner.stats.close()
        if routing and plan.moe["calibrate"] == "routed":
            passes += calibrate_underseen(pruner, layer, linears, routing, inputs, state, prefix, names)
        if chunks is not None:
            mine = experts & names
            pruner.solve_all(mine)
            pruner.stats.forget(mine)
    if plan.group is not None:  # routed tokens over every rank, for the report
        for full in sorted(routing.blocks):
            plan.group.all_reduce(routing.blocks[full].routed)
    if chunks is not None:
        state.notes.append(f"{prefix}: the experts' statistics were gathered in {len(chunks)} chunks to fit memory")
    return passes, targets


def by_block(names: set[str], linears: dict) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for name in names:
        out.setdefault(name.rsplit(".", 2)[0], set()).add(linears[name].index)
    return out


def calibrate_underseen(pruner: LayerPruner, layer, linears: dict, routing: ExpertRouting, inputs,
                         state: RunState, prefix: str, within: set[str] | None = None) -> int:
    """``--moe-calibrate routed``: experts the router sent fewer than MIN_EXPERT_TOKENS tokens are
    calibrated on every token instead (one more statistics pass, for them only); returns passes run."""
    if within is not None:
        linears = {n: m for n, m in linears.items() if n in within}
    few = underseen(linears, pruner.stats, routing)
    if not few:
        return 0
    names = {n for n, m in linears.items()
             if isinstance(m, ExpertMatrix) and m.index in few.get(n.rsplit(".", 2)[0], ())}
    names = {n for n in names if n not in pruner.entries}
    pruner.stats.forget(names)
    pruner.only, routing.only, routing.all_tokens = names, few, True
    try:
        with pruner.collecting():
            for offset, hidden, args, kwargs in inputs():
                pruner.start_batch(offset)
                call_layer(layer, hidden, args, kwargs)
    finally:
        pruner.only, routing.only, routing.all_tokens = None, None, False
    pruner.stats.close()
    experts = sum(len(e) for e in few.values())
    state.notes.append(f"{prefix}: {experts} expert(s) got fewer than {MIN_EXPERT_TOKENS} routed tokens and were "
                       "calibrated on every token (as --moe-calibrate all)")
    for name in names:
        pruner.extra.setdefault(name, {})["calibrated_on"] = "every token (too few routed)"
    return 1


def routed_tokens(entries: list[dict], routing: ExpertRouting) -> None:
    """Each expert matrix's routed tokens (the (token, slot) pairs its router sent it) in its entry."""
    for entry in entries:
        if "expert" in entry:
            block = routing.blocks.get(entry["name"].rsplit(".", 2)[0])
            if block is not None:
                entry["routed_tokens"] = int(block.routed[entry["expert"]])
