"""``oneshot bench MODEL_OR_DIR``: per-layer 2:4 GEMMs at the model's own shapes (or Llama-3's) and
end-to-end prefill and decode, dense against every available backend of ``kernels``."""

from __future__ import annotations

from .errors import OneshotError


def run_bench(spec: str, device: str = "auto", dtype: str = "auto", m_sizes=None, backends=None,
              shapes: str = "model", e2e: bool = True, prompt_len: int = 512, batches=(1, 8, 32),
              decode_context: int = 32, warmup: int = 10, iters: int = 50) -> dict:
    from .evaluate import load_for_eval
    from .kernels import BACKENDS, sparsify
    from .kernels.bench import (
        M_SIZES,
        SHAPES,
        Timer,
        device_info,
        end_to_end,
        gemm_case,
        model_shapes,
        set_backend,
        usable_backends,
    )
    from .runtime import resolve_device

    if shapes not in ("model",) + tuple(SHAPES):
        raise OneshotError(f"--shapes must be model, {', '.join(SHAPES)}; got {shapes!r}")
    unknown = sorted(set(backends or ()) - set(BACKENDS))
    if unknown:
        raise OneshotError(f"unknown backend(s): {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    dev = resolve_device(device)
    model, _, kind = load_for_eval(spec, dtype)
    model.to(dev)
    info = device_info(dev)
    result: dict = {"model": spec, "kind": kind, "dtype": str(model.dtype).split(".")[-1], "device": info}
    if dev.type != "cuda":
        result["note"] = "CPU timings check the harness only; GPU figures need a CUDA device"
    names = model_shapes(model) if shapes == "model" else SHAPES[shapes]
    if not names:
        raise OneshotError(f"{spec}: no 2:4 linear layers to benchmark (prune with --pattern 2:4)")
    timer = Timer(dev, warmup, iters)
    rows = []
    for layer, n, k in names:
        for m in m_sizes or M_SIZES:
            for row in gemm_case(m, n, k, model.dtype, dev, timer, list(backends) if backends else None, info):
                rows.append({"layer": layer, **row})
    result["gemm"] = rows
    if e2e:
        runs = {"dense": end_to_end(model, dev, timer, prompt_len, batches, decode_context)}
        replaced = sparsify(model, backend="dense")
        result["sparse_linears"] = len(replaced)
        for backend in [b for b in usable_backends(model) if not backends or b in backends] + ["auto"]:
            set_backend(model, backend)
            runs[backend] = end_to_end(model, dev, timer, prompt_len, batches, decode_context)
        result["end_to_end"] = runs
    return result


def format_bench(result: dict) -> str:
    lines = [f"{result['model']} ({result['dtype']}) on {result['device'].get('name', result['device']['device'])}"]
    if "note" in result:
        lines.append(f"note: {result['note']}")
    lines.append(f"{'layer':<10} {'M':>6} {'N':>6} {'K':>6}  {'backend':<10} {'us':>10} {'TFLOP/s':>8} {'GB/s':>8} "
                 f"{'speedup':>8} {'of ideal':>8}")
    for r in result["gemm"]:
        frac = "" if r["fraction_of_ideal"] is None else f"{r['fraction_of_ideal']:.2f}"
        lines.append(f"{r['layer']:<10} {r['M']:>6} {r['N']:>6} {r['K']:>6}  {r['backend']:<10} "
                     f"{r['latency_us']:>10.1f} "
                     f"{r['tflops']:>8.2f} {r['gbps']:>8.1f} {r['speedup']:>8.3f} {frac:>8}")
    for backend, run in result.get("end_to_end", {}).items():
        decode = ", ".join(f"b{k.split('batch')[-1]} {v:.1f}" for k, v in run.items() if k.startswith("decode_tokens"))
        lines.append(f"end to end {backend:<10}: prefill {run['prefill_tokens_per_s']:.1f} tok/s, "
                     f"decode tok/s {decode}")
    return "\n".join(lines)
