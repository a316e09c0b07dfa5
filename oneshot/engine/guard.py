"""``--update block`` checked on the whole model: a refit that makes the model worse than the solver's
weights alone is undone.

Each block's refit is judged on the held-out windows against its own target, given the refitted
stream of the blocks before it; every block can pass that check while the model as a whole gets
worse (the loss a block fits is not the model's loss, and a block's output is only the next one's
input). So, beside the refitted stream, the held-out windows also go through each layer with the
solver's weights, as the layer was before its refit (the *solver stream*), and those weights are kept
on disk. After the last layer both streams' final hidden states go through the model's own head
(final norm, output embedding, any soft-capping) and give the next-token loss on the held-out
windows: if the refit's is worse, every layer gets its solver weights back and the report says so.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import torch
from torch import nn

from ..tensors import call_layer, move
from ..updates.block import stack_windows, windows_of
from .capture import Captured, forwards_replaced, pass_through, prepare_outside

SOLVER_FILE = "solver-{:05d}.safetensors"


def _layer_file_tensors(layer: nn.Module, storage: torch.dtype) -> dict[str, torch.Tensor]:
    """The layer's tensors as it is now, floating ones in the stored dtype (exact: they came from it,
    and pruned weights were rounded to it), on the CPU."""
    return {k: (v.detach().to("cpu", storage) if v.is_floating_point() else v.detach().to("cpu")).contiguous()
            for k, v in layer.state_dict().items()}


class ModelCheck:
    """The solver stream of the held-out windows, the solver weights of every refitted layer (in
    ``directory``, or a temporary one), and the final comparison."""

    def __init__(self, heldout: int, nsamples: int, directory: str | None, storage: torch.dtype):
        self.heldout = max(1, min(heldout, nsamples - 1))
        self.first = nsamples - self.heldout  # the held-out windows are the last ones, as the refit's
        self._tmp = None
        if directory is None:
            self._tmp = tempfile.mkdtemp(prefix="oneshot-solver-")
            directory = self._tmp
        os.makedirs(directory, exist_ok=True)
        self.dir, self.storage = directory, storage
        self.stream: list[torch.Tensor] | None = None  # [1, seq, hidden] per held-out window
        self.saved: set[int] = set()

    def select(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """The held-out windows' rows of per-batch tensors, one [1, ...] tensor each."""
        rows = torch.cat(list(hidden))[self.first:]
        return [rows[k : k + 1].clone() for k in range(rows.shape[0])]

    def start(self, hidden: list[torch.Tensor], resumed: list[torch.Tensor] | None) -> None:
        self.stream = list(resumed) if resumed else self.select(hidden)
        for name in os.listdir(self.dir):
            if name.startswith("solver-") and name.endswith(".safetensors"):
                self.saved.add(int(name[len("solver-"):-len(".safetensors")]))

    def _args(self, captured: Captured, i: int, store) -> list[tuple]:
        return windows_of(captured.hidden, [captured.layer_args[b][i] for b in range(len(captured.hidden))],
                        store)[self.first:]

    @torch.no_grad()
    def advance(self, layer: nn.Module, i: int, captured: Captured, device, compute, entries: dict | None) -> None:
        """Layer ``i`` holds the solver's weights: save them (with each linear's zero count, from the
        solver's report ``entries``), and move the solver stream past it."""
        from safetensors.torch import save_file

        path = os.path.join(self.dir, SOLVER_FILE.format(i))
        counts = {name: [e["sparsity"], e["zeros"]] for name, e in (entries or {}).items()}
        save_file(_layer_file_tensors(layer, self.storage), path + ".tmp", metadata={"counts": json.dumps(counts)})
        os.replace(path + ".tmp", path)
        self.saved.add(i)
        windows = self._args(captured, i, "cpu")
        items = [(h, a, kw) for h, (_, a, kw) in zip(self.stream, windows)]
        out = []
        for start in range(0, len(items), 4):
            h, a, kw = stack_windows(items[start : start + 4], device)
            y = call_layer(layer, move(h, device, compute), move(a, device, compute), move(kw, device, compute))
            out.extend(y[k : k + 1].to("cpu") for k in range(y.shape[0]))
        self.stream = out

    def restore(self, i: int, layer: nn.Module) -> dict[str, list]:
        """Layer ``i`` (where it is, or on the CPU when streamed) gets its solver weights back; returns
        each linear's [sparsity, zeros] as the solver left them."""
        from accelerate.utils import set_module_tensor_to_device
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = os.path.join(self.dir, SOLVER_FILE.format(i))
        device = next((p.device for p in layer.parameters() if p.device.type != "meta"), torch.device("cpu"))
        for name, value in load_file(path).items():
            set_module_tensor_to_device(layer, name, device, value=value)
        with safe_open(path, "pt") as fh:
            return json.loads((fh.metadata() or {}).get("counts", "{}"))

    def decide(self, model, layers: nn.ModuleList, input_ids: torch.Tensor, hidden: list[torch.Tensor], state,
               io, on_restore, device, compute) -> dict:
        """After the last layer (``hidden``: the refitted stream's final states): the held-out
        next-token loss of the refitted model and of the solver's weights alone; when the refit's is
        worse, every layer gets its solver weights back (``on_restore(i, layer, state)`` after each,
        with the report's counts the solver's). Returns the report's ``block_update_check``."""
        try:
            ids = input_ids[self.first:]
            refit = heldout_loss(model, layers, ids, self.select(hidden), device, io, compute)
            solver = heldout_loss(model, layers, ids, self.stream, device, io, compute)
            kept = refit <= solver
            if not kept:
                by_name = {entry["name"]: entry for entry in state.reports}
                for i in sorted(self.saved):
                    for name, (sparsity, zeros) in self.restore(i, layers[i]).items():
                        if name in by_name:
                            by_name[name].update(sparsity=sparsity, zeros=zeros)
                    if on_restore is not None:
                        on_restore(i, layers[i], state.as_dict())
                    if io.streaming:
                        layers[i].to("meta")
                for entry in state.blocks:
                    entry["undone"] = True
                state.notes.append(
                    f"--update block: the refitted model's held-out loss ({refit:.4f}) is worse than the solver's "
                    f"weights' alone ({solver:.4f}), so every layer has its solver weights back (the linears' "
                    "relative_error entries are those of the refit)")
            return {"heldout_loss_refit": round(refit, 6), "heldout_loss_solver": round(solver, 6), "kept": kept,
                    "heldout_windows": int(ids.shape[0])}
        finally:
            self.close()

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


@torch.no_grad()
def heldout_loss(model, layers: nn.ModuleList, ids: torch.Tensor, finals: list[torch.Tensor], device, io,
                 compute: torch.dtype | None) -> float:
    """Mean next-token cross-entropy of the held-out windows ``ids`` [k, seq] when the last decoder
    layer's outputs are ``finals`` (one [1, seq, hidden] each): the model's own forward runs with every
    decoder layer passing its input through and the last one handing back the given final hidden
    states, so its final norm and head (and whatever a model adds there) do the rest."""
    originals = list(layers)
    owner = next((m for m in model.modules() if any(c is layers for c in m.children())), None)
    outputs = pass_through(owner, originals[0]) if owner is not None else 1
    prepare_outside(model, layers, io, device)
    io.prepare_head(model, device)
    cast = {}
    if compute is not None:  # the head in the compute dtype (exactly back to the stored one after)
        layer_params = {id(p) for layer in originals for p in layer.parameters()}
        for p in model.parameters():
            if id(p) not in layer_params and p.is_floating_point() and p.device.type != "meta" and p.dtype != compute:
                cast[p] = p.dtype
                p.data = p.data.to(compute)
    current: list[torch.Tensor] = []

    def stand_in(last: bool):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = current[0].to(hidden.device, hidden.dtype) if last else hidden
            return out if outputs == 1 else (out,) + (None,) * (outputs - 1)

        return forward

    total, count = 0.0, 0
    try:
        with forwards_replaced(originals, [stand_in(k == len(originals) - 1) for k in range(len(originals))]):
            for w in range(ids.shape[0]):
                current[:] = [finals[w].to(device, compute or finals[w].dtype)]
                window = ids[w : w + 1].to(device)
                logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum")
                total += float(loss)
                count += window.shape[1] - 1
    finally:
        for p, dtype in cast.items():
            p.data = p.data.to(dtype)
        io.captured(model)
    return total / max(count, 1) if math.isfinite(total) else float("inf")
