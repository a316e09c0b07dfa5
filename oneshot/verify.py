"""``oneshot verify DIR``: check that an output is what its metadata says it is.

Every pruned layer meets its recorded pattern (N:M in every group, or at least the recorded count of
zeros), no weight is NaN or Inf, no pruned slot holds -0.0, tied weights are tied (in the files and
in the loaded model), and one forward pass gives finite logits. Each failure is one line.
"""

from __future__ import annotations

import json
import os

import torch

from .constraint import Constraint, parse_pattern
from .errors import OneshotError
from .formats.store import (
    PERMUTATIONS,
    REPORT,
    SIDECAR,
    as_matrix,
    decode,
    file_sha256,
    matrix_of,
    pruned_matrices,
    read_permutations,
    read_raw,
    read_sidecar,
    weight_files,
)
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


def _provenance_problems(directory: str, sidecar: dict) -> list[str]:
    """Every weight file is the one this output's run wrote (its SHA-256 as the sidecar recorded it), and
    the report names the same run: a shard or report from another run, or a file changed since, fails."""
    recorded = sidecar.get("files")
    if recorded is None:  # an output written before oneshot recorded digests
        return []
    problems = []
    fmt = sidecar.get("format", "dense")
    try:
        present = set(weight_files(directory, fmt))
    except OneshotError as exc:
        return [str(exc)]
    for name in sorted(present - set(recorded)):
        problems.append(f"{name}: not a file this output's run wrote (its sidecar does not list it)")
    for name, digest in sorted(recorded.items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{name}: missing (the sidecar records it)")
        elif file_sha256(path) != digest:
            problems.append(f"{name}: its contents differ from what run {sidecar.get('run_id')} wrote "
                            "(a shard of another run, or changed since)")
    report_path = os.path.join(directory, REPORT)
    if os.path.isfile(report_path):
        try:
            with open(report_path, encoding="utf-8") as fh:
                report_run = json.load(fh).get("run_id")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
            problems.append(f"{REPORT}: damaged ({type(exc).__name__}: {exc})")
        else:
            if report_run != sidecar.get("run_id"):
                problems.append(f"{REPORT}: written by run {report_run}, the weights by run {sidecar.get('run_id')}")
    return problems


def verify(directory: str, forward: bool = True) -> dict:
    """{"ok": bool, "failures": [one line each], "checked": {...}} for a oneshot output."""
    if not os.path.isfile(os.path.join(directory, SIDECAR)):
        read_sidecar(directory)  # not a oneshot output: bad input, one error line
    try:
        sidecar = read_sidecar(directory)
    except OneshotError as exc:  # there but damaged: a failure of the output
        return {"ok": False, "failures": [str(exc)], "checked": {}}
    failures = _provenance_problems(directory, sidecar)
    fmt = sidecar.get("format", "dense")
    try:
        perms = read_permutations(directory)
    except Exception as exc:  # noqa: BLE001 - a damaged file is a failure to report, not a crash
        return {"ok": False, "failures": failures + [f"{PERMUTATIONS} could not be read: {exc}"], "checked": {}}
    try:
        state = decode(read_raw(directory, fmt), sidecar, perms, fmt)
    except Exception as exc:  # noqa: BLE001 - a damaged file is a failure to report, not a crash
        return {"ok": False, "failures": failures + [f"weights could not be read as {fmt}: {exc}"], "checked": {}}
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
