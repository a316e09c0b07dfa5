"""The layer-by-layer loop. Knows nothing about any one solver.

1. capture what every decoder layer receives (:mod:`.capture`);
2. for each layer: onload it; forward the windows through it with hooks on every linear
   (:class:`.layer.LayerPruner`) that gather fp32 statistics of its input and solve it; optionally
   refit the block (``--update block``); forward the windows again through the *pruned* layer to make
   the next layer's inputs, measuring each linear's output error on the way; offload it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..allocation import owl_sparsities
from ..constraint import Constraint
from ..errors import OneshotError
from ..model.experts import ExpertRouting, experts_modules
from ..model.structure import find_decoder_layers, find_linears, matrix_parameter
from ..runtime import free_memory, peak_memory, reuse_host_heap
from ..solvers import SOLVERS, SolverSpec, solver_needs_hessian
from ..tensors import all_finite, call_layer, move
from ..updates import WEIGHT_UPDATES
from ..updates.block import reconstruct_block
from ..updates.learned import learn_options
from .batching import activation_store, attention_heads, plan_batches
from .capture import Captured, StopForward, capture_inputs, layer_inputs
from .collect import collect, routed_tokens
from .guard import ModelCheck
from .layer import LayerPruner
from .layerio import LayerIO, onload, restore
from .moe import remove_experts, score_experts
from .owl import owl_densities
from .state import RunState
from .statistics import check_finite_weights, overflow_advice

ERROR_TOKENS = 2048  # the forward hook measures each linear's output error on this many calibration tokens


@dataclass
class _Plan:
    """What every layer of one run shares."""

    spec: SolverSpec
    options: dict
    device: torch.device
    store: torch.device  # where activations live between layers
    compute: torch.dtype | None  # the dtype layers run in when it is not the stored one
    storage: torch.dtype
    sequential: str
    nbatches: int
    nsamples: int
    error_tokens: int
    needs_stats: bool  # the solver, or a per-linear update, reads input statistics
    needs_hessian: bool
    heldout: int
    heldout_from: int | None
    block: dict | None
    group: object
    ignore: tuple
    moe: dict  # {"calibrate": "all"|"routed", "remove": fraction or None, "score": "reap"|"frequency"}
    config: object  # the model's (text) config: expert counts change when experts are removed
    check: ModelCheck | None = None  # --update block: the solver stream and weights, for the whole-model check


@torch.no_grad()
def prune_layers(*args, device: torch.device, io: LayerIO | None = None, **kwargs) -> dict:
    """:func:`run_layers`, with the host heap kept for reuse while the layers run on the CPU, unless
    they stream: over many layers the kept heap fragments and peak RSS creeps up (a 12-layer 2.8 GB
    checkpoint: 2.32 GB peak without it, 2.96-3.09 GB with it; RESULTS.md), and streaming is for
    models whose memory is what matters."""
    streaming = io is not None and io.streaming
    with reuse_host_heap(torch.device(device).type == "cpu" and not streaming):
        return run_layers(*args, device=device, io=io, **kwargs)


def run_layers(model, input_ids: torch.Tensor, method: str, constraint: Constraint, options: dict, *,
               device: torch.device, ignore=(), batch_size: int = 0, sequential: str = "layer",
               progress: bool = True, allocation: dict | None = None, heldout: int = 0,
               block: dict | None = None, io: LayerIO | None = None, compute_dtype: torch.dtype | None = None,
               resume: dict | None = None, on_layer=None, group=None, first_window: int = 0,
               offload_activations: bool = False, moe: dict | None = None, structure=None,
               scratch: str | None = None, on_restore=None) -> dict:
    """Prune every linear inside the decoder layers of ``model`` in place; returns the report's body.

    ``allocation``: ``{"kind": "owl", "m": .., "lambda": ..}`` for per-layer sparsities (unstructured);
    ``heldout``: the last windows that only judge updates (``options["update"]`` lstsq/admm, or
    ``block``: ``{"epochs", "lr", "batch_windows", "target": "layer"|"model", "seed"}``).
    ``io``: where layers come from and go (:class:`LayerIO`: in memory); ``compute_dtype``: run each
    layer in this dtype (weights are still rounded to the stored one).
    ``on_layer(i, layer, state)``: called once layer ``i`` is pruned, in its stored dtype, with the
    run's state so far as a dict (:class:`RunState`, what a journal needs to resume); ``resume``: such
    a state, to continue from its next layer. ``group``: a torch.distributed group
    (:mod:`oneshot.distributed`); ``input_ids`` are then this rank's windows, the first of them window
    ``first_window`` of all. ``structure``: a :class:`~oneshot.structured.Remover` whose blocks to
    drop are chosen: those are skipped (their tensors never written), and every other layer gives up
    its heads and channels before it is pruned; ``method`` None: nothing pruned after that.
    ``scratch``: where ``--update block`` keeps each layer's solver weights (the journal's directory, or
    None: a temporary one); ``on_restore(i, layer, state)``: called for each layer given its solver
    weights back because the refit made the whole model worse (:mod:`.guard`).
    """
    from tqdm.auto import tqdm

    io = io or LayerIO()
    nsamples, seqlen = input_ids.shape
    path, layers = find_decoder_layers(model)
    config = getattr(model.config, "text_config", None) or model.config
    heads = attention_heads(config)
    storage = model.dtype
    compute = compute_dtype if compute_dtype is not None and compute_dtype != storage else None
    dtype_bytes = torch.finfo(compute or storage).bits // 8
    if resume is not None and resume.get("hidden"):  # the partial run's split: its activations are per batch
        per_batch = int(resume["hidden"][0].shape[0])
    else:  # from --batch-size, or the free memory now
        per_batch = plan_batches(input_ids, layers[0], heads, dtype_bytes, device, batch_size)
    batches = list(input_ids.split(per_batch))
    hidden_size = model.get_input_embeddings().weight.shape[1]
    if block is not None and sequential != "layer":
        raise OneshotError("--update block needs --sequential layer")
    if group is not None and sequential != "layer":
        raise OneshotError("a distributed run sums the statistics of the dense layer: it needs --sequential layer")
    plan = _Plan(spec=SOLVERS.get(method), options=options, device=device,
                 store=activation_store(device, nsamples * seqlen * hidden_size * dtype_bytes, offload_activations),
                 compute=compute, storage=storage, sequential=sequential, nbatches=len(batches), nsamples=nsamples,
                 error_tokens=max(0, ERROR_TOKENS - first_window * seqlen),  # the same first tokens on any rank count
                 needs_stats=method is not None and (SOLVERS[method].needs_stats
                                                     or options.get("update", "none") in WEIGHT_UPDATES),
                 needs_hessian=method is not None and solver_needs_hessian(method, options), heldout=heldout,
                 heldout_from=nsamples - heldout if heldout else None, block=block, group=group, ignore=tuple(ignore),
                 moe={"calibrate": "all", "remove": None, "score": "reap", **(moe or {})}, config=config)
    phases = {"capture": 0.0, "prune_and_propagate": 0.0, "solve": 0.0}

    t0 = time.perf_counter()
    captured = capture_inputs(model, layers, batches, device, plan.store, io)
    io.captured(model)
    if io.streaming:
        free_memory()
    phases["capture"] = time.perf_counter() - t0

    state = RunState.from_dict(resume) if resume is not None else RunState()
    if structure is not None:  # the blocks to drop are journaled from the first commit on
        state.structured = structure.state()
    if resume is not None:
        captured.hidden = list(state.hidden)
        allocation = state.allocation or allocation
    constraints = [constraint] * len(layers)
    if allocation and allocation.get("kind") == "owl":
        if "layer_sparsity" not in allocation:
            t = time.perf_counter()
            dens, params = owl_densities(layers, path, captured, device, ignore, float(allocation["m"]), plan.store,
                                         io, compute)
            try:
                layer_sparsity = owl_sparsities(dens, params, constraint.sparsity, float(allocation["lambda"]))
            except ValueError as exc:
                raise OneshotError(str(exc)) from None
            phases["allocation"] = time.perf_counter() - t
            allocation = {**allocation, "outlier_density": dens, "layer_sparsity": layer_sparsity}
        constraints = [Constraint(sparsity=s) for s in allocation["layer_sparsity"]]
    state.allocation = allocation
    if resume is None and block and block.get("target") == "model":
        state.dense_stream = [h.clone() for h in captured.hidden]
    if block is not None and group is None:
        plan.check = ModelCheck(plan.heldout or max(1, nsamples // 8), nsamples, scratch, storage)
        plan.check.start(captured.hidden, state.solver_stream)
        state.solver_stream = plan.check.stream

    bar = tqdm(total=len(layers), initial=state.finished, desc=f"{method} {constraint.describe()}", unit="layer",
               disable=not progress)
    for i, layer in enumerate(layers):
        if i < state.finished:
            continue
        if structure is not None and i in structure.drop:  # a removed block: its inputs pass on unchanged
            if state.dense_stream is not None:  # the dense model still has it (--block-target model)
                stored = onload(io, i, layer, device, compute)
                _dense_targets(plan, layer, captured, state, i)
                restore(layer, stored)
                io.release(i, layer, device)
            state.finished = i + 1
            if on_layer is not None:
                on_layer(i, None, state.as_dict())
            bar.update(1)
            continue
        prefix = f"{path}.{i if structure is None else structure.new_index(i)}"
        t = time.perf_counter()
        stored = onload(io, i, layer, device, compute)
        phases["layer_io"] = phases.get("layer_io", 0.0) + time.perf_counter() - t
        linears = find_linears(layer, prefix, ignore)
        check_finite_weights(layer, prefix)
        for b, hidden in enumerate(captured.hidden):
            if not all_finite(hidden):
                raise OneshotError(
                    f"non-finite values (NaN/Inf) reach decoder layer {i} ({prefix}) in calibration batch {b}: "
                    f"the decoder layers before it have finite weights, so the activations overflow "
                    f"{overflow_advice(hidden.dtype)}"
                )
        targets = None
        if structure is not None:
            t_s = time.perf_counter()
            if plan.block is not None:  # what --update block refits the cut layer to: the uncut one's outputs
                targets = _dense_targets(plan, layer, captured, state, i)
            structure.cut(i, layer, captured, device, compute)
            state.structured = structure.state()
            linears = find_linears(layer, prefix, ignore)
            phases["structured"] = phases.get("structured", 0.0) + time.perf_counter() - t_s
        kept = {}
        if plan.moe["remove"] and experts_modules(layer):
            t_r = time.perf_counter()
            scored = score_experts(layer, i, prefix, captured, device, compute, plan.moe["score"] == "reap", group)
            removed = remove_experts(layer, prefix, scored, plan.moe["remove"], plan.moe["score"], plan.config)
            state.experts_removed.extend({"layer": i, **entry} for entry in removed)
            kept = {entry["block"]: entry["kept"] for entry in removed}
            linears = find_linears(layer, prefix, ignore)
            phases["expert_removal"] = phases.get("expert_removal", 0.0) + time.perf_counter() - t_r
        if method is None:  # structure alone: the cut layer's outputs are the next one's inputs
            layer_linears = []
            if plan.block is not None:
                _advance_check(plan, layer, i, captured, state)
                with ExpertRouting(layer, prefix, linears):
                    _block_update(plan, i, prefix, layer, linears, None, captured, targets, state, phases)
            _propagate(layer, captured, i, device, compute)
        else:
            with ExpertRouting(layer, prefix, linears) as routing:
                layer_linears = _prune_layer(plan, i, prefix, layer, linears, constraints[i], captured, state,
                                             phases, routing, targets)
        for entry in layer_linears:  # an expert's index in the source model, where experts were removed
            if "expert" in entry and entry["name"].rsplit(".", 2)[0] in kept:
                entry["source_expert"] = kept[entry["name"].rsplit(".", 2)[0]][entry["expert"]]
        restore(layer, stored)
        phases["prune_and_propagate"] += time.perf_counter() - t
        tw = time.perf_counter()
        state.finished = i + 1
        if on_layer is not None:
            on_layer(i, layer, state.as_dict())
        io.release(i, layer, device)
        if io.streaming:  # a full collection costs ~0.2 s with a whole model in memory: only when streaming
            free_memory()
        phases["layer_io"] = phases.get("layer_io", 0.0) + time.perf_counter() - tw
        if layer_linears:
            bar.set_postfix(err=f"{sum(e['relative_error'] for e in layer_linears) / len(layer_linears):.3g}")
        bar.update(1)
    bar.close()
    check = None
    if plan.check is not None:
        check = plan.check.decide(model, layers, input_ids, captured.hidden, state, io, on_restore, device, compute)
    io.finish(model)
    body = {
        "layers_path": path,
        "num_layers": len(layers),
        "linears": state.reports,
        "notes": state.notes,
        "phases_seconds": {k: round(v, 3) for k, v in phases.items()},
        "peak_memory": peak_memory(),
        "forward_batch": per_batch,
        "forward_passes_per_layer": max(state.passes) if state.passes else 0,
        "activations_on": str(plan.store),
        "compute_dtype": str(compute or storage).replace("torch.", ""),
        "error_tokens": ERROR_TOKENS,
        "permutations": state.permutations,
    }
    if allocation:
        body["allocation"] = allocation
    if plan.heldout_from is not None:
        body["heldout_windows"] = heldout
    if state.blocks:
        body["block_update"] = state.blocks
    if check is not None:
        body["block_update_check"] = check
    if state.experts_removed:
        body["experts_removed"] = state.experts_removed
    if resume is not None and int(resume["finished"]):
        body["resumed_at_layer"] = int(resume["finished"])
    return body


@torch.no_grad()
def _dense_targets(plan: _Plan, layer, captured: Captured, state: RunState, i: int) -> list[torch.Tensor]:
    """The layer's outputs before it is cut or pruned: on the dense model's stream, which moves past it
    (``--block-target model``), or on the pruned stream (``layer``)."""
    view = captured if state.dense_stream is None else Captured(state.dense_stream, captured.layer_args)
    out = [call_layer(layer, h, a, kw).to(plan.store) for _, h, a, kw in layer_inputs(view, i, plan.device,
                                                                                       plan.compute)]
    if state.dense_stream is not None:
        state.dense_stream = out
    return out


@torch.no_grad()
def _propagate(layer, captured: Captured, i: int, device, compute) -> None:
    for b, (_, hidden, args, kwargs) in enumerate(layer_inputs(captured, i, device, compute)):
        out = call_layer(layer, hidden, args, kwargs)
        captured.hidden[b] = out.to(captured.hidden[b].device, captured.hidden[b].dtype)


def _prune_layer(plan: _Plan, i: int, prefix: str, layer, linears: dict, constraint: Constraint,
                 captured: Captured, state: RunState, phases: dict, routing: ExpertRouting,
                 given: list | None = None) -> list[dict]:
    """Prune layer ``i`` (already on the device) and move ``captured`` and ``state`` past it. ``given``:
    the block update's targets, taken before the layer was cut (``--structure``)."""
    spec, block = plan.spec, plan.block
    nbatches = len(captured.hidden)
    pruner = LayerPruner(linears, spec, constraint, plan.options, nbatches, plan.device, plan.error_tokens,
                         needs_stats=plan.needs_stats, needs_hessian=plan.needs_hessian, heldout_from=plan.heldout_from,
                         storage_dtype=plan.storage if plan.compute is not None else None,
                         keep_dense=block is not None, group=plan.group,
                         error_from_hessian=plan.sequential == "linear", followers=state.followers, prefix=prefix)
    outputs: list[torch.Tensor | None] = [None] * nbatches
    targets: list[torch.Tensor] = given or []
    layer_passes = 0

    def inputs(view=captured):
        return layer_inputs(view, i, plan.device, plan.compute)

    with pruner:
        if state.dense_stream is not None and given is None:  # the dense model's state after this layer
            view = Captured(state.dense_stream, captured.layer_args)
            with pruner.paused():  # the dense layer on the dense stream: no statistics, no solving
                state.dense_stream = [call_layer(layer, h, a, kw).to(plan.store) for _, h, a, kw in inputs(view)]
            targets = state.dense_stream
        if plan.needs_stats and plan.sequential == "layer":  # the reference way: all statistics from the dense layer
            passes, dense_out = collect(plan, layer, linears, pruner, routing, inputs, state, prefix,
                                         block is not None and state.dense_stream is None and given is None)
            layer_passes += passes
            targets = dense_out or targets
        elif block is not None and state.dense_stream is None and given is None:
            targets = [call_layer(layer, h, a, kw).to(plan.store) for _, h, a, kw in inputs()]
        if not plan.needs_stats or plan.sequential == "layer":
            pruner.solve_all()
        if block is not None:
            with pruner.paused():
                _advance_check(plan, layer, i, captured, state, pruner.entries)
        if block is not None and linears:
            _block_update(plan, i, prefix, layer, linears, pruner, captured, targets, state, phases)
        routing.record = not (plan.needs_stats and plan.sequential == "layer")  # routed tokens, if not counted yet
        while any(o is None for o in outputs):
            layer_passes += 1
            if layer_passes > len(linears) + 3:  # no progress: some linear is never reached
                break
            for b, (offset, hidden, args, kwargs) in enumerate(inputs()):
                if outputs[b] is not None:
                    continue
                pruner.start_batch(offset)
                try:
                    outputs[b] = call_layer(layer, hidden, args, kwargs).to(plan.store)
                except StopForward:
                    pass
    missing = sorted(set(linears) - set(pruner.entries))
    if missing or any(o is None for o in outputs):
        raise OneshotError(f"{', '.join(missing) or prefix}: never ran in the layer's forward pass; --ignore them")
    captured.hidden = outputs
    state.hidden = outputs
    layer_linears = pruner.report()
    routed_tokens(layer_linears, routing)
    state.permutations.update(pruner.permutations)
    state.followers = pruner.followers_map()
    for entry in layer_linears:
        if "fallback" in entry:
            state.notes.append(f"{entry['name']}: {entry['fallback']}")
    phases["solve"] += pruner.solve_seconds
    phases["statistics"] = phases.get("statistics", 0.0) + pruner.stats.seconds
    phases["error_measure"] = phases.get("error_measure", 0.0) + pruner.errors.seconds
    state.passes.append(layer_passes)
    state.reports.extend(layer_linears)
    return layer_linears


def _advance_check(plan: _Plan, layer, i: int, captured: Captured, state: RunState, entries=None) -> None:
    if plan.check is not None:
        plan.check.advance(layer, i, captured, plan.device, plan.compute, entries)
        state.solver_stream = plan.check.stream


def _block_update(plan: _Plan, i: int, prefix: str, layer, linears: dict, pruner: LayerPruner | None,
                  captured: Captured, targets: list, state: RunState, phases: dict) -> None:
    """``--update block``: refit the kept weights of the pruned layer, masks frozen (``pruner`` None: a
    layer only cut by ``--structure``, every kept weight free)."""
    import contextlib

    from ..model.structure import linear_shape

    block = plan.block
    tb = time.perf_counter()
    masks = pruner.masks if pruner is not None else {
        name: torch.zeros(linear_shape(module), dtype=torch.bool) for name, module in linears.items()}
    with pruner.paused() if pruner is not None else contextlib.nullcontext():
        info = reconstruct_block(
            layer, linears, masks, [move(h, plan.store, plan.compute) for h in captured.hidden],
            [move(captured.layer_args[b][i], plan.store, plan.compute) for b in range(len(captured.hidden))],
            targets, plan.heldout or max(1, plan.nsamples // 8), epochs=int(block["epochs"]), lr=float(block["lr"]),
            batch_windows=int(block["batch_windows"]), seed=int(block.get("seed", 0)) + i, device=plan.device,
            loss=block.get("loss", "relative"), learn=learn_options(block, pruner.solver if pruner else None),
        )
    if plan.compute is not None:  # the trained weights, rounded to the stored dtype
        for param in {id(p): p for p in map(matrix_parameter, linears.values())}.values():
            param.data = param.data.to(plan.storage).to(plan.compute)
    if pruner is not None:
        pruner.refresh()
    state.blocks.append({"layer": prefix, **info})
    phases["block_update"] = phases.get("block_update", 0.0) + time.perf_counter() - tb
