"""Peak memory of a pruning run, estimated before any weight is read, and the guard that refuses a
run that cannot fit (issue 6). A streamed run holds everything outside the decoder layers and one
layer (as read, in its compute dtype, and its changes) instead of the whole model.

host  = process overhead (torch, transformers, tokenizer: ~0.5 GiB)
      + the weights, twice while loading (transformers materialises, then converts or dequantizes)
      + the calibration activations of one layer, inputs and outputs (nsamples x seqlen x hidden),
        a third copy for --update block's dense stream
      + the statistics of one layer (one Hessian per linear in fp32, twice with held-out windows;
        a mixture-of-experts layer's expert statistics at most a quarter of the free memory, as the
        engine gathers them in chunks beyond that)
      + one linear's fp32 working copies during its solve
      + in-memory runs on the CPU: the freed memory glibc keeps in the heap for reuse while the layers
        run (``runtime.reuse_host_heap``; 0.25 GiB measured on SmolLM2, ``benchmarks/host_heap.py``;
        streamed runs leave the heap alone)
Per layer means the largest layer (DeepSeek's first dense layers, hybrids' two kinds differ).
device = the same minus the weights and the overhead, plus one layer's weights (CUDA runs only)
"""

from __future__ import annotations

import re

import torch

from .config import PruneConfig
from .errors import OneshotError
from .runtime import available_bytes

OVERHEAD = 512 * 2**20
HOST_HEAP = 256 * 2**20  # kept by reuse_host_heap in in-memory CPU runs (measured, see the docstring)
EXPERT = re.compile(r"\.experts\.\d+\.")


def needs_hessians(cfg: PruneConfig) -> bool:
    """Whether this run gathers a Hessian per linear input (else only its column norms)."""
    from .solvers import SOLVERS

    return SOLVERS[cfg.method].needs_hessian or cfg.update in ("lstsq", "admm") or (
        cfg.method == "dsnot" and cfg.dsnot_init == "sparsegpt")


def storage_dtype(cfg: PruneConfig, hf_config, gguf: bool = False) -> torch.dtype:
    """The dtype the weights are held in: --dtype, else the checkpoint's (a GGUF dequantizes to float32)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if gguf:
        return torch.float32
    text = getattr(hf_config, "text_config", None) or hf_config
    dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or "float32"
    return getattr(torch, str(dtype).replace("torch.", ""), torch.float32)


def estimate(cfg: PruneConfig, hf_config, structure: dict, gguf: bool = False, streaming: bool = False) -> dict:
    """Bytes of each part and the host/device peaks for this run (see the module docstring)."""
    element = torch.tensor([], dtype=storage_dtype(cfg, hf_config, gguf)).element_size()
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    compute = 4 if on_cpu and element == 2 else element  # 16-bit layers run in fp32 on the CPU
    text = getattr(hf_config, "text_config", None) or hf_config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or getattr(text, "d_model", 0))
    by_layer: dict[str, list[tuple[str, tuple[int, int]]]] = {}
    path = structure.get("layers_path", "")
    start = len(path) + 1 if path else 0
    for name, shape in structure["linears"].items():
        by_layer.setdefault(name[start:].split(".")[0], []).append((name, tuple(shape)))
    activations = cfg.nsamples * cfg.seqlen * hidden * compute * (3 if cfg.update == "block" else 2)
    needs_hessian = needs_hessians(cfg)
    factor = 2 if cfg.update != "none" else 1
    expert_budget = available_bytes(torch.device("cpu")) // 4

    def layer_stats(group) -> int:
        plain = sum((d_in * d_in if needs_hessian else d_in) * 4 * factor for n, (_, d_in) in group
                    if not EXPERT.search(n))
        experts = sum((d_in * d_in if needs_hessian else d_in) * 4 * factor for n, (_, d_in) in group
                      if EXPERT.search(n))
        return plain + min(experts, expert_budget)

    groups = list(by_layer.values()) or [[]]
    stats = max(layer_stats(g) for g in groups)
    solve = max((d_out * d_in for g in groups for _, (d_out, d_in) in g), default=0) * 4 * 4
    layer_weights = max(sum(d_out * d_in for _, (d_out, d_in) in g) for g in groups) * element
    weights = int(structure.get("parameters", 0)) * element
    parts = {"overhead": OVERHEAD, "weights": weights, "activations": activations, "statistics": stats,
             "solve": solve, "layer_weights": layer_weights, "output": weights}
    # one layer as read, as it runs (compute dtype) and its changes for the error report (stored dtype)
    layer_peak = layer_weights * (1 + compute / element) + layer_weights
    if streaming:  # everything outside the layers (the head only at the end, when the layers are gone)
        rest = max(0, weights - structure["num_layers"] * layer_weights)
        parts["weights"] = rest
        host = OVERHEAD + rest + layer_peak + activations + stats + solve
    else:
        parts["host_heap"] = HOST_HEAP if on_cpu else 0
        host = OVERHEAD + 2 * weights + activations + stats + solve + parts["host_heap"]
    # offloaded: the activations live in host memory (already counted), one batch's worth on the device
    device_activations = activations // max(1, cfg.nsamples) * 2 if cfg.offload_activations else activations
    device_peak = device_activations + stats + solve + layer_weights
    return {"parts": parts, "host_bytes": host, "device_bytes": device_peak}


def check(cfg: PruneConfig, est: dict, device: torch.device) -> None:
    """Refuse, with what to change, a run whose estimated peak exceeds the memory available."""
    gib = 2**30
    host_free = available_bytes(torch.device("cpu"))
    parts = est["parts"]
    advice = (f"activations take {parts['activations'] / gib:.1f} GiB (--nsamples {cfg.nsamples} x --seqlen "
              f"{cfg.seqlen}): use fewer --nsamples or a shorter --seqlen; --no-memory-check to try anyway")
    if est["host_bytes"] > host_free:
        raise OneshotError(f"this run needs about {est['host_bytes'] / gib:.1f} GiB of host memory, "
                           f"{host_free / gib:.1f} GiB is available: {advice}")
    if device.type == "cuda":
        free = available_bytes(device)
        if est["device_bytes"] > free:
            raise OneshotError(f"this run needs about {est['device_bytes'] / gib:.1f} GiB on {device}, "
                               f"{free / gib:.1f} GiB is free: {advice}, --offload-activations, or --device cpu")
