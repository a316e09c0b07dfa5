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
    if dev.type == "cpu" and not backends:
        return run_cpu_bench(spec, m_sizes, e2e, batches, decode_context, iters)
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


def _cpu_variants(spec: str):
    """(name, builder) of the loads timed on a CPU: plain bf16 and fp32 as transformers gives them, this
    project's dense kernel on the pruned linears, and the sparse kernels on them (a oneshot output read
    from its stored parts; any other model's linears that are 2:4, or at least 30% zeros)."""
    import os

    import torch

    from .evaluate import load_for_eval
    from .formats.store import SIDECAR
    from .kernels import SparseLinear, install, sparsify
    from .kernels.weights import DenseWeight
    from .model.source import resolve_source

    source = resolve_source(spec)
    is_output = source.kind == "local" and os.path.isfile(os.path.join(source.path, SIDECAR))

    def plain(dtype):
        return lambda: load_for_eval(spec, dtype)[0]

    def sparse():
        if is_output:
            from .formats import load

            return load(source.path, kernels="cpu", dtype=torch.bfloat16)
        model = plain("bfloat16")()
        sparsify(model, backend="cpu", kind="auto")
        return model

    names: list[str] = []

    def own_dense():
        model = plain("bfloat16")()
        install(model, {n: (DenseWeight(model.get_submodule(n).weight.detach().contiguous()), None) for n in names},
                "cpu")
        return model

    def sparse_first():
        model = sparse()
        names.extend(n for n, m in model.named_modules() if isinstance(m, SparseLinear))
        return model

    return [("sparse kernels", sparse_first), ("torch bf16", plain("bfloat16")), ("torch fp32", plain("float32")),
            ("dense kernel", own_dense)]


def run_cpu_bench(spec: str, m_sizes=None, e2e: bool = True, batches=(1,), decode_context: int = 32,
                  iters: int = 50) -> dict:
    """``oneshot bench DIR --device cpu``: the per-shape GEMV table (torch fp32 and bf16, this project's
    dense kernel, the sparse one at the model's own pattern) and decode tokens/s of each load, one process."""
    import gc

    import torch

    from .kernels import SparseLinear, cpu
    from .kernels.bench import device_info
    from .kernels.cpu_bench import decode_tokens_per_s, gemv_rows, read_bandwidth

    if cpu.build() is None:
        raise OneshotError(f"the CPU kernels are not built here: {cpu.build_error()}")
    result: dict = {"model": spec, "device": device_info(torch.device("cpu")),
                    "cpu": {"name": cpu.cpu_name(), "flags": cpu.cpu_flags(), "path": cpu.isa_name(),
                            "threads": torch.get_num_threads()}}
    variants, decode, shapes, kinds = _cpu_variants(spec), {}, [], set()
    for name, build in variants:
        model = build()
        if name == "sparse kernels":
            layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
            if not layers:
                raise OneshotError(f"{spec}: no pruned linears for the sparse kernels (2:4, or >= 30% zeros)")
            result["dtype"] = str(layers[0].dtype).split(".")[-1]
            result["sparse_linears"] = len(layers)
            for m in layers:
                if (m.out_features, m.in_features) not in shapes:
                    shapes.append((m.out_features, m.in_features))
                kinds.add("2:4" if m.kind == "2:4" else f"bitmask{round(100 * m.packed.sparsity)}")
        if e2e:
            decode[name] = {f"batch{b}": round(decode_tokens_per_s({name: model}, max(3, iters // 5),
                                                                   decode_context, b)[name], 2) for b in batches}
        del model
        gc.collect()
    result["kinds"] = sorted(kinds)
    result["bandwidth_gbps"] = round(read_bandwidth(), 1)
    result["gemv"] = gemv_rows(shapes, tuple(m_sizes or (1, 4, 8)), tuple(sorted(kinds))[:3],
                               iters=max(10, iters // 2))
    if e2e:
        result["decode_tokens_per_s"] = decode
    return result


def format_bench(result: dict) -> str:
    if "cpu" in result:
        from .kernels.cpu_bench import format_gemv

        c = result["cpu"]
        lines = [f"{result['model']} ({result.get('dtype', '?')}, {result.get('sparse_linears', 0)} sparse linears, "
                 f"{', '.join(result['kinds'])}) on {c['name']}, {c['threads']} threads, path {c['path']}",
                 f"flags: {' '.join(c['flags'])}", format_gemv(result["gemv"], result["bandwidth_gbps"])]
        for name, by_batch in result.get("decode_tokens_per_s", {}).items():
            lines.append(f"decode {name:<15}: " + ", ".join(f"{k} {v:.2f} tok/s" for k, v in by_batch.items()))
        return "\n".join(lines)
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
