"""How many calibration windows go through a layer in one forward call, and where activations live."""

from __future__ import annotations

import torch
from torch import nn

from ..model.structure import is_linear, linear_shape
from ..runtime import available_bytes


def attention_heads(config) -> int:
    """The attention heads of a config (for the memory plan); a per-layer config (transformers'
    heterogeneous configs, which refuse the global read) gives its largest."""
    try:
        return getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    except Exception:  # AmbiguousGlobalPerLayerAttributeError
        per = getattr(config, "per_layer_config", None)
        count = getattr(config, "num_hidden_layers", 0)
        return max((getattr(per[i], "num_attention_heads", 1) or 1 for i in range(count)), default=1)


def forward_bytes_per_token(layer: nn.Module, seqlen: int, heads: int, dtype_bytes: int) -> int:
    """A generous estimate of the activation memory one token costs in one layer's forward."""
    widths = [max(linear_shape(m)) for m in layer.modules() if is_linear(m)] or [1]
    widest = max(widths)
    return 4 * (8 * widest + sum(widths)) + 2 * heads * seqlen * max(dtype_bytes, 4)


def plan_batches(input_ids: torch.Tensor, layer: nn.Module, heads: int, dtype_bytes: int, device: torch.device,
                 batch_size: int) -> int:
    """Windows per forward: ``batch_size`` if given (``--batch-size``), else (0) all of them when a
    forward over every window fits in a quarter of the free memory (one pass per layer), else as many
    as do."""
    nsamples, seqlen = input_ids.shape
    if batch_size:
        return min(batch_size, nsamples)
    per_window = forward_bytes_per_token(layer, seqlen, heads, dtype_bytes) * seqlen
    return int(max(1, min(nsamples, available_bytes(device) // 4 // per_window)))


def activation_store(device: torch.device, captured_bytes: int, offload: bool = False) -> torch.device:
    """Keep activations on the compute device when two copies fit in half of its free memory (and
    ``--offload-activations`` was not given): else in host memory, one batch at a time on the device."""
    if device.type != "cuda" or offload:
        return torch.device("cpu")
    return device if 2 * captured_bytes < available_bytes(device) // 2 else torch.device("cpu")
