"""A rough time estimate for a prune, before the first layer: the work counted from the model's shapes
and the calibration size, divided by a quick measurement of this device's matmul speed.

Counted per decoder layer: two forward passes of the calibration tokens through every prunable
matrix (the statistics pass and the pass that makes the next layer's inputs) and attention's
``4 * seqlen * hidden`` per token; with a Hessian-based solver, each distinct input's Hessian
(``2 * tokens * d_in^2``), its inverse (``d_in^3``) and the OBS solve (``2 * d_out * d_in^2``).
The measured rate is that of one large matmul, which the real layers never reach, so the estimate is
scaled by ``OVERHEAD`` (fitted on SmolLM2-135M runs on the CPU, benchmarks/RESULTS.md). It is meant to
tell a minute from an hour, nothing finer.
"""

from __future__ import annotations

import time

import torch

OVERHEAD = 1.5
CPU_SUGGESTION = (32, 512)  # the usual CPU calibration: what RESULTS.md measures SmolLM2 with


def layer_flops(structure: dict, tokens: int, seqlen: int, hidden: int, hessian: bool) -> float:
    """Floating-point operations of the whole prune (every layer) for ``tokens`` calibration tokens."""
    shapes = structure["linears"].values()
    flops = sum(2 * 2.0 * d_out * d_in * tokens for d_out, d_in in shapes)  # two passes
    flops += 2 * structure["num_layers"] * 4.0 * tokens * seqlen * hidden  # attention scores and values
    if hessian:
        inputs: dict[int, int] = {}
        for d_out, d_in in shapes:
            inputs[d_in] = inputs.get(d_in, 0) + 1
            flops += 2.0 * d_out * d_in * d_in  # the OBS solve
        # linears that read the same input share one Hessian and its inverse: about one per 2.5 linears
        shared = sum(count / 2.5 * (2.0 * tokens * d_in * d_in + d_in ** 3) for d_in, count in inputs.items())
        flops += shared
    return flops


def measure_rate(device: torch.device, dtype: torch.dtype, hidden: int, seconds: float = 0.2) -> float:
    """FLOP/s of a ``[512, hidden] @ [hidden, hidden]`` matmul on ``device`` in ``dtype``, for ``seconds``."""
    n = max(64, min(int(hidden), 4096))
    a = torch.randn(512, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    runs, t = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t
        if elapsed >= seconds or runs >= 1000:
            break
    return 2.0 * 512 * n * n * runs / elapsed


def estimate_time(structure: dict, hidden: int, nsamples: int, seqlen: int, hessian: bool, device: torch.device,
                  dtype: torch.dtype, world: int = 1) -> dict:
    """{"seconds", "tokens", "gflops_per_second", and, on a CPU with a GPU-sized calibration,
    "suggestion": the seconds at :data:`CPU_SUGGESTION`}."""
    rate = measure_rate(device, dtype, hidden)
    tokens = nsamples * seqlen // max(world, 1)

    def seconds(tok: int, sl: int) -> float:
        return OVERHEAD * layer_flops(structure, tok, sl, hidden, hessian) / rate

    result = {"seconds": round(seconds(tokens, seqlen), 1), "tokens": nsamples * seqlen,
              "gflops_per_second": round(rate / 1e9, 1)}
    n, s = CPU_SUGGESTION
    if device.type == "cpu" and nsamples * seqlen > n * s and result["seconds"] > 600:
        result["suggestion"] = {"nsamples": min(n, nsamples), "seqlen": min(s, seqlen),
                                "seconds": round(seconds(min(n, nsamples) * min(s, seqlen), min(s, seqlen)), 1)}
    return result


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``1 h 45 min``."""
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def announce(structure: dict, method: str, pattern: str, device: torch.device, nsamples: int, seqlen: int,
             estimate: dict) -> str:
    """The line printed before the first layer."""
    line = (f"{structure['architecture']}, {structure['num_layers']} layers: {method} {pattern} on {device}; "
            f"calibration {nsamples} x {seqlen} = {nsamples * seqlen:,} tokens; "
            f"{'about ' if estimate['seconds'] >= 1 else ''}{duration(estimate['seconds'])} "
            f"(rough estimate, {estimate['gflops_per_second']:g} GFLOP/s measured)")
    if "suggestion" in estimate:
        s = estimate["suggestion"]
        line += (f"\n  on a CPU, --nsamples {s['nsamples']} --seqlen {s['seqlen']} would take about "
                 f"{duration(s['seconds'])} (the defaults of {nsamples} x {seqlen} are meant for GPUs)")
    return line
