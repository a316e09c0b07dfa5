"""What in a model is pruned: its decoder blocks and the linears inside them.

Decoder blocks and linears are found by structure, not by a table per model family: the blocks are
the ``nn.ModuleList`` of same-class modules holding the most linear weights; the linears are every
``nn.Linear`` and ``transformers.Conv1D`` (GPT-2) inside a block.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import OneshotError


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
        raise OneshotError(
            f"{type(config).__name__}: not a causal language model transformers can build ({exc})") from exc
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
