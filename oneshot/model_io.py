"""Where a model comes from, where its decoder layers and linears are, and how the output is written.

Decoder blocks and linears are found by structure, not by a table per model family: the blocks are
the ``nn.ModuleList`` of same-class modules holding the most linear weights; the linears are every
``nn.Linear`` and ``transformers.Conv1D`` (GPT-2) inside a block.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from .config import OneshotError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """``path`` is a hub id or a local directory; ``gguf_file`` names a GGUF file inside ``path``."""

    spec: str
    path: str
    kind: str  # "hub" | "local" | "gguf"
    gguf_file: str | None = None

    def hf_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(spec: str) -> ModelSource:
    """Classify a model argument without loading anything; unknown local paths fail here."""
    expanded = os.path.expanduser(spec)
    if expanded.lower().endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise OneshotError(f"model {spec!r}: no such GGUF file")
        folder, name = os.path.split(os.path.abspath(expanded))
        return ModelSource(spec, folder, "gguf", name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise OneshotError(f"model {spec!r}: directory has no config.json (not a Hugging Face checkpoint)")
        return ModelSource(spec, os.path.abspath(expanded), "local")
    if os.path.exists(expanded):
        raise OneshotError(f"model {spec!r}: is a file, not a checkpoint directory or a .gguf file")
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise OneshotError(f"model {spec!r}: no such directory, and not a Hugging Face hub id (owner/name)")
    return ModelSource(spec, spec, "hub")


def _hub_error(source: ModelSource, what: str, exc: Exception) -> OneshotError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if source.kind == "hub":
        return OneshotError(
            f"model {source.spec!r}: could not load its {what} from the Hugging Face hub or the local cache ({first})"
        )
    return OneshotError(f"model {source.spec!r}: could not load its {what} ({first})")


def load_config(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.hf_kwargs())
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear line
        raise _hub_error(source, "config", exc) from exc


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.hf_kwargs())
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(source, "tokenizer", exc) from exc


def load_model(source: ModelSource, dtype: str = "auto", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **source.hf_kwargs()
        )
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(source, "weights", exc) from exc
    model.eval()
    model.config.use_cache = False
    return model


def context_length(config) -> int | None:
    """The longest sequence the model's positions support, if the config says."""
    text = getattr(config, "text_config", None) or config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------- structure


def is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks: the ModuleList of same-class modules with the most linear weights."""
    best, best_name, best_size = None, None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(sub.weight.numel() for child in module for sub in child.modules() if is_linear(sub))
        if size > best_size:
            best, best_name, best_size = module, name, size
    if best is None:
        raise OneshotError(
            f"{type(model).__name__}: could not find the decoder layers "
            "(an nn.ModuleList of identical blocks that contain Linear layers); this layout is not supported"
        )
    return best_name, best


def find_linears(layer: nn.Module, prefix: str = "", ignore: list[str] | tuple = ()) -> dict[str, nn.Module]:
    """Every linear in ``layer`` by its full name (``prefix.name``), minus names matching ``ignore``."""
    found = {}
    for name, module in layer.named_modules():
        if not is_linear(module):
            continue
        full = f"{prefix}.{name}" if prefix else name
        if any(re.search(pattern, full) for pattern in ignore):
            continue
        found[full] = module
    return found


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.weight.shape[1], module.weight.shape[0]  # Conv1D stores [in, out]


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as fp32 [out, in], a copy."""
    weight = module.weight.detach()
    if not isinstance(module, nn.Linear):
        weight = weight.t()
    return weight.to(torch.float32).clone()


def stores_transposed(module: nn.Module) -> bool:
    """Whether the module keeps its weight as [in, out] (GPT-2's Conv1D) rather than [out, in]."""
    return not isinstance(module, nn.Linear)


def in_weight_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """An [out, in] matrix (a mask) laid out like ``module.weight`` (Conv1D stores [in, out])."""
    return matrix if isinstance(module, nn.Linear) else matrix.t()


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an [out, in] weight back in the module's own dtype and layout."""
    if not isinstance(module, nn.Linear):
        weight = weight.t()
    with torch.no_grad():
        module.weight.copy_(weight.to(module.weight.dtype).contiguous())


def inspect_structure(config, nm: tuple[int, int] | None, ignore: list[str], trust_remote_code: bool = False) -> dict:
    """Check that a model built from ``config`` can be pruned, on the meta device (no weights read).

    Returns the decoder-layer path, the number of layers and the linears of the first layer.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise OneshotError(f"{type(config).__name__}: not a causal language model transformers can build ({exc})") from exc
    path, layers = find_decoder_layers(skeleton)
    shapes = {}
    for i, layer in enumerate(layers):
        linears = find_linears(layer, f"{path}.{i}", ignore)
        if i == 0 and not linears:
            raise OneshotError(f"{type(skeleton).__name__}: decoder layer 0 has no linear layers left to prune")
        for name, module in linears.items():
            shapes[name] = linear_shape(module)
            if nm is not None and shapes[name][1] % nm[1]:
                raise OneshotError(
                    f"pattern {nm[0]}:{nm[1]}: {name} has input dimension {shapes[name][1]}, not divisible by {nm[1]}; "
                    f"use another pattern or --ignore it"
                )
    parameters = sum(p.numel() for p in skeleton.parameters())  # tied weights once
    return {"layers_path": path, "num_layers": len(layers), "architecture": type(skeleton).__name__, "linears": shapes,
            "parameters": parameters}


# ---------------------------------------------------------------- output


def partial_dir(out: str) -> str:
    """The fixed temporary directory of a journaled run into ``out`` (hidden, beside it)."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.oneshot-partial")


@contextlib.contextmanager
def atomic_output_dir(out: str, overwrite: bool, partial: str | None = None, keep_if=None):
    """Yield a temporary directory beside ``out``; on success rename it into place.

    On any failure (or Ctrl-C) the temporary directory is removed and ``out`` is left as it was.
    An existing non-empty ``out`` is replaced only with ``overwrite``. ``partial``: use this fixed
    directory (a journaled run: it may hold an earlier run's progress) and, on failure, keep it when
    ``keep_if(partial)`` is true, so ``--resume`` can continue.
    """
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise OneshotError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    if partial is not None:
        os.makedirs(partial, exist_ok=True)
        tmp = partial
    else:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.oneshot-tmp-", dir=parent)
    try:
        yield tmp
        _normal_permissions(tmp)
        old = None
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.oneshot-old-", dir=parent)
            os.rmdir(old)
            os.rename(out, old)
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if keep_if is not None and keep_if(tmp):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _normal_permissions(directory: str) -> None:
    """mkdtemp makes 0700 directories (and some writers 0600 files): give the output the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def save_model(model, tokenizer, directory: str) -> None:
    """Weights (safetensors, the model's dtype, ties kept), config, generation config and tokenizer."""
    config = model.config
    if getattr(config, "quantization_config", None) is not None and "gguf" in str(config.quantization_config):
        del config.quantization_config  # weights were dequantized from GGUF: the output is a plain checkpoint
    if getattr(model, "hf_quantizer", None) is not None and getattr(model.hf_quantizer, "quantization_config", None):
        if "gguf" in str(model.hf_quantizer.quantization_config):
            model.hf_quantizer = None
    config.use_cache = True
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
