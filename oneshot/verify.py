"""``oneshot verify DIR``: check that an output is what its metadata says it is.

Every pruned layer meets its recorded pattern (N:M in every group, or at least the recorded count of
zeros), no weight is NaN or Inf, no pruned slot holds -0.0, tied weights are tied (in the files and
in the loaded model), and one forward pass gives finite logits. Each failure is one line.
"""

from __future__ import annotations

import torch

from .constraint import Constraint, parse_pattern
from .formats.store import as_matrix, decode, matrix_of, pruned_matrices, read_permutations, read_raw, read_sidecar
from .masks import check_constraint


def _layer_problems(key: str, weight: torch.Tensor, layer: dict, perm) -> list[str]:
    problems = []
    matrix = as_matrix(weight, layer, perm)
    nm = parse_pattern(layer.get("pattern"))
    if nm is not None:
        if matrix.shape[1] % nm[1]:
            problems.append(f"{key}: input dimension {matrix.shape[1]} is not a multiple of {nm[1]}")
        else:
            reason = check_constraint(matrix, Constraint(1 - nm[0] / nm[1], nm[0], nm[1]))
            if reason:
                problems.append(f"{key}: not {nm[0]}:{nm[1]}: {reason}")
    else:
        zeros = int((matrix == 0).sum())
        want = layer.get("zeros")
        if want is None:  # older metadata: the fraction only
            want = int(layer["sparsity"] * matrix.numel() - 1e-6 * matrix.numel())
        if zeros < want:
            problems.append(f"{key}: {zeros} zeros, its metadata records {want}")
    negative_zeros = int(((matrix == 0) & torch.signbit(matrix)).sum())
    if negative_zeros:
        problems.append(f"{key}: {negative_zeros} pruned slots hold -0.0")
    return problems


def verify(directory: str, forward: bool = True) -> dict:
    """{"ok": bool, "failures": [one line each], "checked": {...}} for a oneshot output."""
    failures: list[str] = []
    sidecar = read_sidecar(directory)
    fmt = sidecar.get("format", "dense")
    perms = read_permutations(directory)
    try:
        state = decode(read_raw(directory, fmt), sidecar, perms, fmt)
    except Exception as exc:  # noqa: BLE001 - a damaged file is a failure to report, not a crash
        return {"ok": False, "failures": [f"weights could not be read as {fmt}: {exc}"], "checked": {}}
    pruned = pruned_matrices(sidecar, perms)
    for name, (key, expert, layer, perm) in pruned.items():
        label = key if expert is None else name
        if key not in state or (expert is not None and expert >= state[key].shape[0]):
            failures.append(f"{label}: missing from the weights")
            continue
        if layer.get("input_permutation") and perm is None:
            failures.append(f"{label}: its input permutation is missing from {layer['input_permutation']}")
            continue
        failures += _layer_problems(label, matrix_of(state, key, expert), layer, perm)
    for key, tensor in state.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                failures.append(f"{key}: {bad} NaN/Inf values")
    checked = {"format": fmt, "pruned_layers": len(pruned), "tensors": len(state)}

    from .formats import load

    try:
        model = load(directory)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0] if str(exc) else ""
        failures.append(f"the model does not load: {type(exc).__name__}: {first}")
        return {"ok": False, "failures": failures, "checked": checked}
    failures += _tie_problems(model, state)
    if forward:
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = (torch.arange(16) * 7919 % vocab).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        if not bool(torch.isfinite(logits).all()):
            failures.append(f"forward pass: {int((~torch.isfinite(logits)).sum())} non-finite logits")
        checked["forward"] = list(logits.shape)
    return {"ok": not failures, "failures": failures, "checked": checked}


def _tie_problems(model, state: dict) -> list[str]:
    """With tied embeddings: the head is the embedding in the loaded model, and a head stored in the
    files (transformers leaves it out) is equal to the embedding."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(config, "tie_word_embeddings", False):
        return []
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None:
        return []
    problems = []
    if head.weight is not embed.weight and head.weight.data_ptr() != embed.weight.data_ptr():
        problems.append("tie_word_embeddings is set but the loaded head is not the input embedding")
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    head_key = f"{names.get(id(head))}.weight"
    embed_key = next((f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if m is embed), None)
    if head_key in state and embed_key in state and not torch.equal(state[head_key], state[embed_key]):
        problems.append(f"tie_word_embeddings is set but the stored {head_key} differs from {embed_key}")
    return problems
