"""Sidecar entries for the tensors as they are written.

transformers 5 holds most mixtures of experts as fused parameters (``mlp.experts.gate_up_proj``
[E, 2·I, H]) but ``save_pretrained`` writes them back in the hub's per-expert layout
(``mlp.experts.3.gate_proj.weight``, ``…up_proj.weight``) so that every other runtime reads them. The
engine reports an expert's matrix by its fused tensor and index; here each such entry becomes one
entry per tensor written for that expert, with its own zero count, found through transformers' own
reverse conversion.
"""

from __future__ import annotations

import re

import torch


def _expert_of(key: str) -> int | None:
    numbers = [int(p) for p in key.split(".") if p.isdigit()]
    return numbers[-1] if len(numbers) >= 2 else None


def on_disk(layers: dict, written: dict[str, torch.Tensor], model, shapes: dict[str, tuple] | None = None) -> dict:
    """``layers`` (sidecar entries) for the tensors in ``written`` (key -> tensor as written): an expert
    entry whose fused tensor was written per expert becomes one entry per written tensor; a matrix
    written under another name (Ergo's ``wqkv``, its fused experts) gets that name, and, where its
    module in a loaded model is named otherwise, ``module``; each with the zeros of what was written."""
    out, cache = {}, {}
    for name, entry in layers.items():
        tensor = entry.get("tensor") or f"{name}.weight"
        if tensor in written:
            out[name] = entry
            continue
        if tensor not in cache:
            shape = (shapes or {}).get(tensor) or tuple(model.get_parameter(tensor).shape)
            cache[tensor] = (shape, _reverted(model, tensor, shape))
        shape, keys = cache[tensor]
        expert = entry.get("expert")
        if expert is None or (len(keys) == 1 and sorted(next(iter(keys.values()))) == sorted(shape)):  # renamed
            for key, written_shape in keys.items():  # (a linear's weight may also be split in parts, or transposed)
                if key in written:
                    flipped = _flipped(model, tensor, shape, key, written_shape)
                    value = written[key] if expert is None else written[key][expert]
                    out.update(_written_as(name, entry, key, value, flipped))
            continue
        for key, part in _per_expert(keys).get(expert, []):
            if key not in written:
                continue
            value = written[key]
            rest = {k: v for k, v in entry.items() if k not in ("tensor", "expert", "transposed", "zeros", "sparsity")}
            zeros = int((value == 0).sum())
            transposed = len(part) == 2 and part[1] != entry.get("in_features", part[1])
            out[re.sub(r"\.weight$", "", key)] = {**rest, "zeros": zeros, "sparsity": zeros / max(value.numel(), 1),
                                                  **({"transposed": True} if transposed else {})}
    return out


def _reverted(model, tensor: str, shape: tuple) -> dict[str, tuple]:
    """Key -> shape of every tensor ``save_pretrained`` writes for model tensor ``tensor``."""
    from transformers.core_model_loading import revert_weight_conversion

    reverted = revert_weight_conversion(model, {tensor: torch.empty(shape, device="meta")})
    return {key: tuple(value.shape) for key, value in reverted.items()}


def _per_expert(keys: dict[str, tuple]) -> dict[int, list[tuple[str, tuple]]]:
    out: dict[int, list] = {}
    for key, shape in keys.items():
        e = _expert_of(key)
        if e is not None:
            out.setdefault(e, []).append((key, shape))
    return out


def _flipped(model, tensor: str, shape: tuple, key: str, written: tuple) -> bool:
    """Whether ``save_pretrained`` writes ``tensor`` (or its part ``key``) with its last two dimensions
    swapped: by the shapes, or for a square matrix by reversing the conversion on a row-index probe."""
    if written[-2:] != shape[-2:] or shape[-1] == shape[-2]:
        if written[-2:] == shape[-2:][::-1] and shape[-1] != shape[-2]:
            return True
        if shape[-1] == shape[-2]:
            from transformers.core_model_loading import revert_weight_conversion

            rows = torch.arange(shape[-2], dtype=torch.int32).view(*([1] * (len(shape) - 2)), -1, 1).expand(*shape)
            probe = revert_weight_conversion(model, {tensor: rows})[key].reshape(-1, *written[-2:])[0]
            return not bool((probe == probe[:, :1]).all())
    return False


def _written_as(name: str, entry: dict, key: str, value: torch.Tensor, flipped: bool) -> dict:
    expert = entry.get("expert")
    plain = expert is None and key.endswith(".weight")
    new = key[: -len(".weight")] if plain else key if expert is None else f"{key}.{expert}"
    zeros = int((value == 0).sum())
    moved = {**entry, "zeros": zeros, "sparsity": zeros / max(value.numel(), 1)}
    moved.pop("tensor", None)
    if flipped != bool(entry.get("transposed")):
        moved["transposed"] = True
    else:
        moved.pop("transposed", None)
    if not plain:
        moved["tensor"] = key
    if expert is None:
        moved["module"] = entry.get("module", name)
    return {new: moved}


LAYOUT_OPS = ("MergeModulelist", "Concatenate")  # conversions that only stack and concatenate expert tensors


def layout_only(transform) -> bool:
    """A transformers load-time conversion that only rearranges per-expert tensors into fused ones."""
    ops = getattr(transform, "operations", None)
    return bool(ops) and all(type(op).__name__ in LAYOUT_OPS for op in ops)


def _span(index: torch.Tensor) -> slice | None:
    start = int(index[0])
    return slice(start, start + len(index)) if torch.equal(index, torch.arange(start, start + len(index),
                                                                                dtype=index.dtype)) else None


def expert_sources(model, name: str, shape: tuple[int, ...]) -> list[list[tuple[str, slice, slice, bool]]] | None:
    """Where each expert's slice of fused parameter ``name`` [E, A, B] lies in a per-expert checkpoint:
    per expert, (checkpoint key, rows, columns, stored transposed) of every tensor that holds a part of
    it, found by reversing transformers' conversion on index probes; None if not converted."""
    from transformers.core_model_loading import revert_weight_conversion

    _, a, b = shape
    rows = torch.arange(a, dtype=torch.int32).view(1, a, 1).expand(1, a, b)
    cols = torch.arange(b, dtype=torch.int32).view(1, 1, b).expand(1, a, b)
    by_rows, by_cols = revert_weight_conversion(model, {name: rows}), revert_weight_conversion(model, {name: cols})
    if name in by_rows or set(by_rows) != set(by_cols):
        return None
    parts, area = [], 0
    for key, r in by_rows.items():
        c = by_cols[key]
        if r.dim() != 2 or _expert_of(key) != 0:
            return None
        if bool((r == r[:, :1]).all()) and bool((c == c[:1, :]).all()):
            span, transposed = (_span(r[:, 0]), _span(c[0, :])), False
        elif bool((r == r[:1, :]).all()) and bool((c == c[:, :1]).all()):
            span, transposed = (_span(r[0, :]), _span(c[:, 0])), True
        else:
            return None
        if None in span:
            return None
        area += r.numel()
        parts.append((key, span[0], span[1], transposed))
    if area != a * b:
        return None

    def for_expert(key: str, e: int) -> str:
        pieces = key.split(".")
        last = max(i for i, p in enumerate(pieces) if p.isdigit())
        pieces[last] = str(e)
        return ".".join(pieces)

    return [[(for_expert(k, e), r, c, t) for k, r, c, t in parts] for e in range(shape[0])]
