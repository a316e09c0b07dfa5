"""Weights on disk in any registered format: read, write, convert, and load as a transformers model.

An output directory holds its weights either as transformers writes them (``model*.safetensors``,
format ``dense``) or as ``oneshot-<format>*.safetensors``, in which every pruned layer's weight
``KEY`` is stored as its parts ``KEY.<part>`` and every other tensor (embeddings, norms, head) as is.
``oneshot_sparsity.json`` names the format and each pruned layer's pattern, orientation and
permutation; config, tokenizer and report sit beside the weights unchanged.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..errors import OneshotError
from ..output import atomic_output_dir, write_json
from .base import FORMATS

SIDECAR = "oneshot_sparsity.json"
REPORT = "report.json"
PERMUTATIONS = "oneshot_permutations.safetensors"


def file_prefix(fmt: str) -> str:
    return "model" if fmt == "dense" else f"oneshot-{fmt}"


def read_sidecar(directory: str) -> dict:
    path = os.path.join(directory, SIDECAR)
    if not os.path.isfile(path):
        raise OneshotError(f"{directory}: no {SIDECAR}, so not a oneshot output")
    try:
        with open(path, encoding="utf-8") as fh:
            sidecar = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OneshotError(f"{path} is damaged (truncated or not JSON: {exc}); the output cannot be trusted, "
                           "prune again") from None
    if not isinstance(sidecar, dict):
        raise OneshotError(f"{path} is damaged (not a JSON object); the output cannot be trusted, prune again")
    if sidecar.get("format", "dense") not in FORMATS:
        raise OneshotError(f"{directory}: unknown weight format {sidecar.get('format')!r} in {SIDECAR}")
    return sidecar


def weight_files(directory: str, fmt: str) -> list[str]:
    prefix = file_prefix(fmt)
    index = os.path.join(directory, f"{prefix}.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            return sorted(set(json.load(fh)["weight_map"].values()))
    if os.path.isfile(os.path.join(directory, f"{prefix}.safetensors")):
        return [f"{prefix}.safetensors"]
    raise OneshotError(f"{directory}: no {prefix}*.safetensors weights for its {fmt!r} format")


def _weight_file_names(directory: str) -> list[str]:
    """Every weight file and index of any format (what a conversion replaces)."""
    names = []
    for name in os.listdir(directory):
        if name == PERMUTATIONS:
            continue
        if name.endswith((".safetensors", ".safetensors.index.json")) and name.startswith(("model", "oneshot-")):
            names.append(name)
    return names


def file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def seal(directory: str, known: dict[str, str] | None = None) -> str:
    """Record in the sidecar the SHA-256 of every weight file (and the permutations) as written, and a run
    id derived from them, which the report repeats: ``verify`` then finds a shard or a report that another
    run wrote. ``known``: digests computed as the files were written. Returns the run id."""
    import hashlib

    sidecar = read_sidecar(directory)
    names = weight_files(directory, sidecar.get("format", "dense"))
    if os.path.isfile(os.path.join(directory, PERMUTATIONS)):
        names.append(PERMUTATIONS)
    known = known or {}
    files = {n: known.get(n) or file_sha256(os.path.join(directory, n)) for n in sorted(names)}
    run_id = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    sidecar["files"], sidecar["run_id"] = files, run_id
    write_json(os.path.join(directory, SIDECAR), sidecar)
    return run_id


def read_raw(directory: str, fmt: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for name in weight_files(directory, fmt):
        tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def read_permutations(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = os.path.join(directory, PERMUTATIONS)
    return load_file(path) if os.path.isfile(path) else {}


def as_matrix(weight: torch.Tensor, layer: dict, perm: torch.Tensor | None) -> torch.Tensor:
    """The weight as [out, in] with N:M groups along ``in``: Conv1D transposed, RIA's order applied."""
    matrix = weight.t() if layer.get("transposed") else weight
    if perm is not None:
        matrix = matrix[:, perm.long()]
    return matrix.contiguous()


def _from_matrix(matrix: torch.Tensor, layer: dict, perm: torch.Tensor | None) -> torch.Tensor:
    if perm is not None:
        natural = torch.empty_like(matrix)
        natural[:, perm.long()] = matrix
        matrix = natural
    return (matrix.t() if layer.get("transposed") else matrix).contiguous()


def tensor_key(name: str, layer: dict) -> str:
    """The state-dict key holding sidecar entry ``name``: ``NAME.weight``, or an expert's fused tensor."""
    return layer.get("tensor") or f"{name}.weight"


def pruned_matrices(sidecar: dict, perms: dict) -> dict[str, tuple[str, int | None, dict, torch.Tensor | None]]:
    """Sidecar name -> (state key, expert index or None, layer entry, input permutation or None) for
    every pruned matrix."""
    return {name: (tensor_key(name, layer), layer.get("expert"), layer,
                   perms.get(name) if layer.get("input_permutation") else None)
            for name, layer in sidecar["layers"].items()}


def _by_tensor(sidecar: dict, perms: dict) -> dict[str, dict]:
    """State key -> {expert index or None: (layer entry, permutation)}."""
    out: dict[str, dict] = {}
    for key, expert, layer, perm in pruned_matrices(sidecar, perms).values():
        out.setdefault(key, {})[expert] = (layer, perm)
    return out


def matrix_of(state: dict[str, torch.Tensor], key: str, expert: int | None) -> torch.Tensor:
    return state[key] if expert is None else state[key][expert]


def encode(state: dict[str, torch.Tensor], sidecar: dict, perms: dict, fmt: str) -> dict[str, torch.Tensor]:
    """A dense state dict -> the tensors ``fmt`` stores: each pruned matrix as its parts ``KEY.<part>``,
    each expert's slice of a fused tensor as ``KEY.<expert>.<part>`` (a fused tensor with experts left
    unpruned is stored whole)."""
    codec = FORMATS[fmt]
    pruned = _by_tensor(sidecar, perms)
    missing = sorted(set(pruned) - set(state))
    if missing:
        raise OneshotError(f"the weights hold no {missing[0]} ({len(missing)} pruned layers missing)")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        slices = pruned.get(key)
        if slices is None or fmt == "dense" or (None not in slices and set(slices) != set(range(tensor.shape[0]))):
            out[key] = tensor
            continue
        for expert, (layer, perm) in sorted(slices.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
            stem = key if expert is None else f"{key}.{expert}"
            try:
                parts = codec.encode(as_matrix(matrix_of(state, key, expert), layer, perm))
            except ValueError as exc:
                raise OneshotError(f"{stem}: cannot store as {fmt}: {exc}") from None
            for part, value in parts.items():
                out[f"{stem}.{part}"] = value
    return out


def decode(raw: dict[str, torch.Tensor], sidecar: dict, perms: dict, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors ``fmt`` stored -> the dense state dict."""
    if fmt == "dense":
        return dict(raw)
    codec = FORMATS[fmt]
    state = {}
    consumed = set()

    def one(stem, layer, perm):
        names = {part: f"{stem}.{part}" for part in codec.parts()}
        if not all(n in raw for n in names.values()):
            raise OneshotError(f"the {fmt} weights hold no {stem} (expected {', '.join(names.values())})")
        consumed.update(names.values())
        return _from_matrix(codec.decode({part: raw[n] for part, n in names.items()}), layer, perm)

    for key, slices in _by_tensor(sidecar, perms).items():
        if None in slices:
            state[key] = one(key, *slices[None])
        elif key not in raw:  # every expert's slice encoded
            state[key] = torch.stack([one(f"{key}.{e}", *slices[e]) for e in sorted(slices)])
    for key, tensor in raw.items():
        if key not in consumed:
            state[key] = tensor
    return state


def load_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """The dense state dict of a oneshot output in any format (the same keys transformers saved)."""
    return _read(directory)[2]


def write_weights(directory: str, tensors: dict[str, torch.Tensor], fmt: str, max_shard_size: str = "5GB") -> None:
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(tensors, directory, filename_pattern=file_prefix(fmt) + "{suffix}.safetensors",
                          max_shard_size=max_shard_size, metadata={"format": "pt"})  # the sidecar names the format


def format_sizes(state: dict[str, torch.Tensor], sidecar: dict, perms: dict) -> dict:
    """Bytes of the pruned layers' weights in every format that can store them, beside dense."""
    pruned = pruned_matrices(sidecar, perms).values()
    patterns = {layer.get("pattern", sidecar.get("pattern")) for _, _, layer, _ in pruned}
    sizes = {}
    for name, codec in FORMATS.items():
        if any(codec.accepts(p) for p in patterns):
            continue
        sizes[name] = sum(codec.nbytes(as_matrix(matrix_of(state, key, e), layer, perm))
                          for key, e, layer, perm in pruned)
    return size_summary(sizes)


def size_summary(sizes: dict[str, int]) -> dict:
    """Bytes per format -> ``{format: {"pruned_layer_bytes", "of_dense"}}`` (the report's ``storage.formats``)."""
    dense = sizes.get("dense", 0)
    return {name: {"pruned_layer_bytes": b, "of_dense": round(b / dense, 4) if dense else None}
            for name, b in sizes.items()}


def files_bytes(directory: str, fmt: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, n)) for n in weight_files(directory, fmt))


def check_format(fmt: str, sidecar: dict) -> None:
    if fmt not in FORMATS:
        raise OneshotError(f"unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    for layer in sidecar["layers"].values():
        reason = FORMATS[fmt].accepts(layer.get("pattern", sidecar.get("pattern")))
        if reason:
            raise OneshotError(reason)


def _read(directory: str) -> tuple[dict, dict, dict]:
    """(sidecar, permutations, dense state dict) of an output in any format."""
    sidecar = read_sidecar(directory)
    perms = read_permutations(directory)
    fmt = sidecar.get("format", "dense")
    return sidecar, perms, decode(read_raw(directory, fmt), sidecar, perms, fmt)


def describe_storage(directory: str) -> dict:
    """The storage summary of an output as it is: its format, weight file bytes, and the pruned
    layers' bytes in every format that could store them."""
    sidecar, perms, state = _read(directory)
    fmt = sidecar.get("format", "dense")
    return {"format": fmt, "weight_file_bytes": files_bytes(directory, fmt),
            "formats": format_sizes(state, sidecar, perms)}


def rewrite(directory: str, fmt: str, source: str | None = None) -> dict:
    """Write ``directory``'s weights in ``fmt``, reading them from ``source`` (default: itself).

    Updates the sidecar and report in ``directory``; returns the size summary it records.
    """
    sidecar, perms, state = _read(source or directory)
    check_format(fmt, sidecar)
    stored = encode(state, sidecar, perms, fmt)
    sizes = format_sizes(state, sidecar, perms)
    for name in _weight_file_names(directory):
        os.remove(os.path.join(directory, name))
    write_weights(directory, stored, fmt)
    summary = {"format": fmt, "weight_file_bytes": files_bytes(directory, fmt), "formats": sizes}
    sidecar["format"] = fmt
    write_json(os.path.join(directory, SIDECAR), sidecar)
    run_id = seal(directory)
    report_path = os.path.join(directory, REPORT)
    if os.path.isfile(report_path):
        with open(report_path, encoding="utf-8") as fh:
            report = json.load(fh)
        report["storage"] = summary
        report["run_id"] = run_id
        write_json(report_path, report)
    return summary


def convert(directory: str, fmt: str, out: str | None = None, overwrite: bool = False) -> dict:
    """``oneshot convert``: a oneshot output in another format, written atomically to ``out``
    (default: in place, replacing ``directory`` only once the new one is complete)."""
    if not os.path.isdir(directory):
        raise OneshotError(f"{directory}: no such directory")
    sidecar = read_sidecar(directory)
    check_format(fmt, sidecar)
    weight_files(directory, sidecar.get("format", "dense"))  # fail now if the weights are missing
    in_place = out is None or os.path.abspath(out) == os.path.abspath(directory)
    target = directory if in_place else out
    with atomic_output_dir(target, overwrite or in_place) as tmp:
        keep = set(_weight_file_names(directory))
        for name in os.listdir(directory):
            if name in keep:
                continue
            src = os.path.join(directory, name)
            (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, name))
        summary = rewrite(tmp, fmt, source=directory)
    return summary


def load(directory: str, kernels: str | None = None, **kwargs):
    """A transformers model from a oneshot output in any format (``dense`` loads as transformers would).

    ``kernels``: the pruned linears run ``oneshot.kernels`` backends (``"auto"``, ``"triton"``, ``"cpu"``,
    ...) in the form the output stores them (``oneshot.formats.swap``). Extra keywords go to
    ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    from transformers import AutoModelForCausalLM

    from .swap import check_kernels, swap

    if kernels is not None:
        check_kernels(kernels)
    sidecar = read_sidecar(directory)
    kwargs.setdefault("dtype", "auto")
    fmt = sidecar.get("format", "dense")
    if fmt == "dense":
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()
        if kernels is None:
            return model
        return swap(model, {}, fmt, pruned_matrices(sidecar, read_permutations(directory)), kernels)
    from transformers import AutoConfig

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(directory)
    # transformers takes a state dict only without a checkpoint path, so from the model class itself
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    perms, raw = read_permutations(directory), read_raw(directory, fmt)
    model = model_class.from_pretrained(None, config=config, state_dict=decode(raw, sidecar, perms, fmt), **kwargs)
    return model.eval() if kernels is None else swap(model.eval(), raw, fmt, pruned_matrices(sidecar, perms), kernels)
