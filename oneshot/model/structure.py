r"""What in a model is pruned: its decoder blocks and the prunable matrices inside them.

Decoder blocks and matrices are found by structure, not by a table per model family: the blocks are
the ``nn.ModuleList`` of modules holding the most matrix weights (one class, or a hybrid's several);
the prunable matrices ("linears" in the engine) are every ``nn.Linear`` and ``transformers.Conv1D``
(GPT-2) inside a block except routers, and each expert's slice of fused expert parameters
(:mod:`.experts`). Every other weight of two or more dimensions in a block must be a known dense part
(router, norm, convolution kernel, state-space parameter, embedding) or ``--ignore``\d: anything
else stops the run before any weights load, by name (:func:`block_coverage`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import OneshotError
from .experts import ExpertMatrix, expert_count, expert_matrices, experts_modules, fused_parameters, router_names

STATE_SPACE = ("A_log", "D", "dt_bias", "dt_proj_bias", "conv_weight")
# linears of state-space mixers that their scan reads by weight instead of calling (Mamba's Δ projection)
STATE_SPACE_LINEARS = ("dt_proj",)


def is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _matrix_size(block: nn.Module) -> int:
    size = sum(sub.weight.numel() for sub in block.modules() if is_linear(sub))
    return size + sum(p.numel() for sub in block.modules() for p in sub.parameters(recurse=False) if p.dim() == 3
                      and fused_parameters(sub))


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks: the ModuleList with the most matrix weights whose modules are of one
    class, or of several (a hybrid's attention and state-space blocks) that each hold matrices."""
    best, best_name, best_size = None, None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        sizes = [_matrix_size(child) for child in module]
        if len({type(child) for child in module}) != 1 and (len(module) < 2 or not all(sizes)):
            continue
        size = sum(sizes)
        if size > best_size:
            best, best_name, best_size = module, name, size
    if best is None:
        raise OneshotError(
            f"{type(model).__name__}: could not find the decoder layers "
            "(an nn.ModuleList of identical blocks that contain Linear layers); this layout is not supported"
        )
    return best_name, best


def _ignored(name: str, ignore) -> bool:
    return any(re.search(pattern, name) for pattern in ignore)


def in_router(path: str, routers) -> bool:
    """Whether module ``path`` is a router or lies inside one (routing state such as a score-correction
    bias kept in a statistics submodule of the router: Ernie 4.5's ``gate.moe_statics``)."""
    return any(path == r or path.startswith(r + ".") for r in routers)


def find_linears(layer: nn.Module, prefix: str = "", ignore: list[str] | tuple = ()) -> dict[str, nn.Module]:
    """Every prunable matrix in ``layer`` by its full name (``prefix.name``), minus names matching
    ``ignore``: its linears (routers excepted) and each expert's matrices (``….experts.E.gate_up_proj``)."""
    routers = router_names(layer)
    found = {}
    for name, module in layer.named_modules():
        if not is_linear(module) or in_router(name, routers) or name.rpartition(".")[2] in STATE_SPACE_LINEARS:
            continue
        full = f"{prefix}.{name}" if prefix else name
        if not _ignored(full, ignore):
            found[full] = module
    for full, module in expert_matrices(layer, prefix).items():
        if not _ignored(full, ignore):
            found[full] = module
    return found


def _out_in(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, ExpertMatrix))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear, a Conv1D or an expert's matrix."""
    if isinstance(module, ExpertMatrix):
        return module.shape
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.weight.shape[1], module.weight.shape[0]  # Conv1D stores [in, out]


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as fp32 [out, in], a copy."""
    weight = module.weight.detach()
    if not _out_in(module):
        weight = weight.t()
    return weight.to(torch.float32).clone()


def stores_transposed(module: nn.Module) -> bool:
    """Whether the module keeps its weight as [in, out] (GPT-2's Conv1D, gpt-oss's experts) rather than
    [out, in]."""
    if isinstance(module, ExpertMatrix):
        return module.transposed
    return not isinstance(module, nn.Linear)


def in_weight_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """An [out, in] matrix (a mask) laid out like ``module.weight`` (Conv1D stores [in, out])."""
    return matrix if _out_in(module) else matrix.t()


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an [out, in] weight back in the module's own dtype and layout (an expert's: into its
    slice of the fused parameter)."""
    if not _out_in(module):
        weight = weight.t()
    with torch.no_grad():
        module.weight.copy_(weight.to(module.weight.dtype))


def matrix_parameter(module: nn.Module) -> nn.Parameter:
    """The parameter that holds a prunable matrix: its module's weight, or an expert's fused parameter."""
    return module.fused if isinstance(module, ExpertMatrix) else module.weight


def block_coverage(layer: nn.Module, prefix: str, matrices: dict[str, nn.Module], ignore=()) -> list[dict]:
    """Every weight of two or more dimensions in ``layer`` that is not a prunable matrix in
    ``matrices``, with why it stays dense: ``router``, ``norm``, ``convolution``, ``state-space``,
    ``embedding`` or ``--ignore``. A weight that is none of these stops here, by name."""
    pruned = {id(matrix_parameter(m)) for m in matrices.values()}
    routers = router_names(layer)
    kept = []
    for pname, param in layer.named_parameters():
        if param.dim() < 2 or id(param) in pruned:
            continue
        full = f"{prefix}.{pname}" if prefix else pname
        owner_path, _, leaf = pname.rpartition(".")
        owner = layer.get_submodule(owner_path) if owner_path else layer
        kind = type(owner).__name__
        if in_router(owner_path, routers):
            reason = "router"
        elif is_linear(owner) and owner_path.rpartition(".")[2] in STATE_SPACE_LINEARS:
            reason = "state-space"
        elif fused_parameters(owner) and param.dim() == 2:
            reason = "expert bias"
        elif is_linear(owner) or fused_parameters(owner):
            reason = "--ignore"
        elif _ignored(full, ignore):
            reason = "--ignore"
        elif isinstance(owner, nn.modules.conv._ConvNd):
            reason = "convolution"
        elif "norm" in kind.lower() or "norm" in leaf.lower():
            reason = "norm"
        elif isinstance(owner, nn.Embedding):
            reason = "embedding"
        elif leaf in STATE_SPACE:
            reason = "state-space"
        else:
            raise OneshotError(
                f"{full} ({kind}, shape {list(param.shape)}): a weight oneshot can neither prune nor tell to be a "
                "router, norm, convolution or state-space part; --ignore it to keep it dense"
            )
        kept.append({"name": full, "shape": list(param.shape), "reason": reason})
    for full, module in expert_matrices(layer, prefix).items():  # experts left out of a fused parameter
        if full not in matrices and id(module.fused) in pruned:
            kept.append({"name": full, "shape": list(module.shape), "reason": "--ignore"})
    return kept


def inspect_structure(config, nm: tuple[int, int] | None, ignore: list[str], trust_remote_code: bool = False) -> dict:
    """Check that a model built from ``config`` can be pruned, on the meta device (no weights read).

    Returns the decoder-layer path, the number of layers, every prunable matrix's shape, the coverage
    (block weights of two or more dimensions, the prunable share, what stays dense and why) and the
    mixture-of-experts layers.
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
    shapes, dense, block_params, moe_layers, experts = {}, [], 0, [], set()
    for i, layer in enumerate(layers):
        prefix = f"{path}.{i}"
        linears = find_linears(layer, prefix, ignore)
        if i == 0 and not linears:
            raise OneshotError(f"{type(skeleton).__name__}: decoder layer 0 has no linear layers left to prune")
        dense.extend(block_coverage(layer, prefix, linears, ignore))
        block_params += sum(p.numel() for p in layer.parameters() if p.dim() >= 2)
        counts = {expert_count(m) for m in experts_modules(layer).values()}
        if counts:
            moe_layers.append(i)
            experts.update(counts)
        for name, module in linears.items():
            shapes[name] = linear_shape(module)
            if nm is not None and shapes[name][1] % nm[1]:
                raise OneshotError(
                    f"pattern {nm[0]}:{nm[1]}: {name} has input dimension {shapes[name][1]}, not divisible by {nm[1]}; "
                    f"use another pattern or --ignore it"
                )
    if hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()  # from_config leaves a tied head untied until weights load
    parameters = sum(p.numel() for p in skeleton.parameters())  # tied weights once
    prunable = sum(a * b for a, b in shapes.values())
    return {"layers_path": path, "num_layers": len(layers), "architecture": type(skeleton).__name__, "linears": shapes,
            "parameters": parameters,
            "coverage": {"block_matrix_parameters": block_params, "prunable_parameters": prunable, "dense": dense},
            "moe": {"layers": moe_layers, "experts": sorted(experts)} if moe_layers else None}
