"""``--update block``: a few Adam steps on the kept weights of one decoder block, masks frozen.

The block's pruned output is fitted to a target on the fitting windows: the dense block's output on
the same inputs (``--block-target layer``, as the issue and most papers do it) or the dense model's
hidden state at this depth (``--block-target model``, which also lets a block correct the error the
blocks before it left). The loss (``--block-loss relative``) is each token's squared error over its
target's squared norm, averaged over tokens: in the residual stream the first token of a window (an
attention sink) carries most of the squared norm (SmolLM2-135M: 84-98% at layers 15-25, 4 windows of
512 tokens), so a plain mean squared error (``mse``) fits and judges almost only those tokens.
After every epoch the loss on the held-out windows is measured; the weights
of the best epoch are kept, and only if they beat the solver's weights there. Every step re-applies
the masks, so sparsity and N:M groups stay exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from ..model.structure import in_weight_layout, matrix_parameter
from ..tensors import call_layer, map_tensors, move
from .learned import learnable, score_lr, temperature


def slice_windows(obj, index: torch.Tensor, batch: int):
    """``obj`` (tensors in tuples/lists/dicts) with every tensor whose first dimension is the batch cut
    to ``index``; tensors shared across the batch (first dimension 1 or other) pass unchanged."""
    return map_tensors(obj, lambda t: t[index] if t.dim() > 0 and t.shape[0] == batch and batch > 1 else t)


def windows_of(hidden: list[torch.Tensor], args: list, device) -> list[tuple]:
    """One (hidden, args, kwargs) per window, from the per-batch captured inputs."""
    out = []
    for h, (a, kw) in zip(hidden, args):
        batch = h.shape[0]
        for i in range(batch):
            idx = torch.tensor([i])
            out.append((h[i : i + 1], slice_windows(a, idx, batch), slice_windows(kw, idx, batch)))
    return out


def stack_windows(items: list[tuple], device):
    """Concatenate windows that share the same args structure into one forward batch."""
    hidden = torch.cat([h for h, _, _ in items]).to(device)

    def cat(objs):
        first = objs[0]
        if isinstance(first, torch.Tensor):
            if first.dim() > 0 and first.shape[0] == 1 and not all(o is first for o in objs):
                same = all(torch.equal(o, first) for o in objs[1:])
                return first if same else torch.cat(objs)
            return first
        if isinstance(first, tuple):
            return tuple(cat([o[k] for o in objs]) for k in range(len(first)))
        if isinstance(first, list):
            return [cat([o[k] for o in objs]) for k in range(len(first))]
        if isinstance(first, dict):
            return {k: cat([o[k] for o in objs]) for k in first}
        return first

    args = cat([a for _, a, _ in items])
    kwargs = cat([kw for _, _, kw in items])
    return hidden, move(args, device), move(kwargs, device)


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "relative") -> torch.Tensor:
    """``relative``: mean over tokens of ``|out - target|^2 / |target|^2``; ``mse``: the plain mean."""
    out, target = out.float(), target.float()
    if kind == "mse":
        return torch.nn.functional.mse_loss(out, target)
    norms = target.pow(2).sum(-1)
    floor = norms.mean().clamp_min(1e-30) * 1e-6  # a token of zeros (padding) must not divide by zero
    return ((out - target).pow(2).sum(-1) / norms.clamp_min(floor)).mean()


def trainable(linears: dict[str, nn.Module], masks: dict[str, torch.Tensor], device):
    """The parameters holding the pruned matrices (each fused expert parameter once) and, for each,
    where its pruned slots are, in its own layout."""
    params: dict[int, nn.Parameter] = {}
    pruned: dict[int, torch.Tensor] = {}
    for name, module in linears.items():
        param = matrix_parameter(module)
        key = id(param)
        if key not in params:
            params[key] = param
            pruned[key] = torch.zeros(param.shape, dtype=torch.bool, device=device)
        mask = in_weight_layout(module, masks[name]).to(device)
        if param is module.weight:
            pruned[key] = mask
        else:  # an expert's slice of a fused parameter
            pruned[key][module.index] = mask.t() if module.transposed else mask
    return list(params.values()), list(pruned.values())


def reconstruct_block(layer: nn.Module, linears: dict[str, nn.Module], masks: dict[str, torch.Tensor],
                      hidden: list[torch.Tensor], layer_args: list, targets: list[torch.Tensor], heldout: int,
                      *, epochs: int, lr: float, batch_windows: int, seed: int, device, loss: str = "relative",
                      learn: dict | None = None) -> dict:
    """Fit the kept weights of ``layer`` in place; returns what the report says.

    ``learn``: ``{"n", "m", "dense": {name: dense [out, in] weight}}`` to let the N:M masks of the
    plain linears move too (:mod:`.learned`); the masks of the others stay the solver's.

    ``hidden``/``layer_args``/``targets`` are per captured forward batch; the last ``heldout``
    windows judge. The block is trained in fp32 and cast back to its dtype; no gradient outlives the fit
    (PyTorch refuses a float32 gradient on a parameter cast back to 16 bits).
    """
    windows = windows_of(hidden, layer_args, device)
    target = torch.cat(list(targets))  # [windows, seq, hidden]
    n = len(windows)
    heldout = max(1, min(heldout, n - 1))
    fit_idx, val_idx = list(range(n - heldout)), list(range(n - heldout, n))
    dtype = next(layer.parameters()).dtype
    layer.to(torch.float32)
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    learners = learnable(linears, masks, learn["dense"], learn["n"], learn["m"]) if learn else {}
    moving = {id(lm.module.weight) for lm in learners.values()}
    names = {id(p): n for n, p in layer.named_parameters()}
    params, pruned = trainable(linears, masks, device)
    frozen = [(p, off) for p, off in zip(params, pruned) if id(p) not in moving]
    params, pruned = [p for p, _ in frozen], [off for _, off in frozen]
    original = [p.detach().clone() for p in params]
    original_learned = {name: lm.module.weight.detach().clone() for name, lm in learners.items()}
    for p in params:
        p.requires_grad_(True)
    tau = [1.0]

    def loss_on(idx: list[int], grad: bool) -> torch.Tensor:
        h, a, kw = stack_windows([windows[i] for i in idx], device)
        with torch.set_grad_enabled(grad):
            if learners:
                weights = {names[id(lm.module.weight)]: (lm.effective(tau[0]) if grad else lm.final())
                           for lm in learners.values()}
                out = functional_call(layer, weights, (h, *a), kw)
                out = out[0] if isinstance(out, (tuple, list)) else out
            else:
                out = call_layer(layer, h, a, kw)
            return block_loss(out, target[idx].to(device), loss)

    def heldout_loss() -> float:
        total = 0.0
        for start in range(0, len(val_idx), batch_windows):
            part = val_idx[start : start + batch_windows]
            total += float(loss_on(part, False)) * len(part)
        return total / len(val_idx)

    before = heldout_loss()
    best, best_epoch, best_state = before, 0, original
    best_learned, changed = original_learned, 0.0
    steps_per_epoch = math.ceil(len(fit_idx) / batch_windows)
    moving_steps = steps_per_epoch * max(epochs - 1, 1)  # the scores freeze for the last epoch
    groups = [{"params": params + [lm.weight for lm in learners.values()], "lr": lr}]
    if learners:
        groups.append({"params": [lm.scores for lm in learners.values()], "lr": score_lr(moving_steps)})
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    gen = torch.Generator().manual_seed(seed)
    history = []
    step = 0
    try:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(fit_idx), generator=gen).tolist()
            scores_move = learners and (epoch < epochs or epochs == 1)
            for lm in learners.values():
                lm.scores.requires_grad_(bool(scores_move))
            for start in range(0, len(order), batch_windows):
                part = [fit_idx[i] for i in order[start : start + batch_windows]]
                tau[0] = temperature(step, moving_steps)
                opt.zero_grad(set_to_none=True)
                loss_on(part, True).backward()
                for p, off in zip(params, pruned):
                    p.grad.masked_fill_(off, 0.0)
                opt.step()
                step += 1
                with torch.no_grad():
                    for p, off in zip(params, pruned):
                        p.masked_fill_(off, 0.0)  # +0.0, never -0.0
            val = heldout_loss()
            history.append(val)
            if val < best:
                best, best_epoch = val, epoch
                best_state = [p.detach().clone() for p in params]
                best_learned = {name: lm.final() for name, lm in learners.items()}
                changed = (sum(lm.changed() * lm.scores.shape[0] * lm.scores.shape[1] for lm in learners.values())
                           / max(1, sum(lm.scores.shape[0] * lm.scores.shape[1] for lm in learners.values())))
    finally:
        with torch.no_grad():
            for p, w in zip(params, best_state):
                p.copy_(w)
            for name, lm in learners.items():
                lm.module.weight.copy_(best_learned[name])
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
        layer.to(dtype)
    return {
        "heldout_loss_before": before,
        "heldout_loss_after": best,
        "epochs_kept": best_epoch,
        "heldout_history": [round(v, 8) for v in history],
        "kept": best < before,
        "fit_windows": len(fit_idx),
        "heldout_windows": len(val_idx),
        "loss": loss,
        **({"learned_masks": len(learners), "groups_changed": round(changed, 6)} if learn else {}),
    }
