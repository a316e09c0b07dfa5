"""Timing and roofline arithmetic for 2:4 GEMMs and end-to-end decode/prefill.

GPU timing follows the usual rules: warm-up runs, CUDA events around each run, the L2 cache flushed
between runs (H100's 50 MB L2 would otherwise hold a whole 4096 x 4096 weight), CUDA graphs for small
M (launch overhead is a large part of a decode GEMM), and the median of the runs. On CPU the same
functions use ``time.perf_counter`` (for testing the harness; CPU times say nothing about GPUs).
"""

from __future__ import annotations

import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from .backends import BACKENDS, available, sparse_linear
from .weights import Bitmask, Packed24

M_SIZES = (1, 8, 16, 64, 256, 1024, 4096, 16384)

# (name, out_features N, in_features K) of each linear of a decoder layer
SHAPES = {
    "llama3-8b": [("q_proj", 4096, 4096), ("k_proj", 1024, 4096), ("v_proj", 1024, 4096), ("o_proj", 4096, 4096),
                  ("gate_proj", 14336, 4096), ("up_proj", 14336, 4096), ("down_proj", 4096, 14336)],
    "llama3-70b": [("q_proj", 8192, 8192), ("k_proj", 1024, 8192), ("v_proj", 1024, 8192), ("o_proj", 8192, 8192),
                   ("gate_proj", 28672, 8192), ("up_proj", 28672, 8192), ("down_proj", 8192, 28672)],
}

# dense 16-bit tensor-core peak (TFLOP/s, without sparsity) and memory bandwidth (GB/s), by device name
PEAKS = {"H100 80GB HBM3": (989.0, 3350.0), "H100": (989.0, 3350.0), "H200": (989.0, 4800.0)}


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__}
    if device.type != "cuda":
        return info
    props = torch.cuda.get_device_properties(device)
    info.update(name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    try:
        info["cusparselt"] = torch.backends.cusparselt.version()
    except Exception:  # noqa: BLE001
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit"
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip().splitlines()
        if out:
            info["nvidia_smi"] = dict(zip(query.split(","), (v.strip() for v in out[device.index or 0].split(","))))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def peaks(info: dict) -> tuple[float, float] | None:
    name = info.get("name", "")
    for key, value in PEAKS.items():
        if key in name:
            return value
    return None


class Timer:
    """Median seconds of ``fn()`` over ``iters`` runs after ``warmup``; L2 flushed between runs and a
    CUDA graph replayed instead of the eager calls when ``graph``."""

    def __init__(self, device: torch.device, warmup: int = 10, iters: int = 50, flush_l2: bool = True):
        self.device, self.warmup, self.iters = device, warmup, iters
        self.mode = "eager"  # how the last call ran: eager, cuda-graph, or eager after a failed capture
        self.flush = None
        if device.type == "cuda" and flush_l2:
            self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # > any L2

    def __call__(self, fn, graph: bool = False) -> float:
        if self.device.type != "cuda":
            for _ in range(max(1, self.warmup // 5)):
                fn()
            times = []
            for _ in range(max(3, self.iters // 5)):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times)
        run, self.mode = fn, "eager"
        if graph:
            try:
                run, self.mode = self._capture(fn), "cuda-graph"
            except Exception as exc:  # noqa: BLE001 - a step that cannot be captured is timed eagerly, and says so
                torch.cuda.synchronize(self.device)
                self.mode = f"eager (capture failed: {type(exc).__name__}: {str(exc)[:120]})"
        for _ in range(self.warmup):
            run()
        torch.cuda.synchronize(self.device)
        times = []
        for _ in range(self.iters):
            if self.flush is not None:
                self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    def _capture(self, fn):
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay


def _sig(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def gemm_bytes(m: int, n: int, k: int, element: int, packed: bool) -> int:
    """Bytes a GEMM must move at least: the weight (packed: values + metadata), x and y."""
    weight = n * (k // 2) * element + n * ((k // 4 + 1) // 2) if packed else n * k * element
    return weight + m * k * element + m * n * element


def random_24(n: int, k: int, dtype: torch.dtype, device, seed: int = 0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """A random [n, k] weight with exactly 2 of every 4 consecutive inputs kept (drawn on the CPU, so
    the same on every device)."""
    g = generator or torch.Generator(device="cpu").manual_seed(seed)
    weight = torch.randn(n, k, generator=g)
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    keep.scatter_(-1, torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2], True)
    return torch.where(keep.reshape(n, k), weight, torch.zeros(())).to(dtype).to(device)


def random_bitmask(n: int, k: int, sparsity: float, dtype: torch.dtype, device, seed: int = 0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A random [n, k] weight with exactly round(sparsity * k) entries of every row +0.0 (drawn on the CPU)."""
    g = generator or torch.Generator(device="cpu").manual_seed(seed)
    weight = torch.randn(n, k, generator=g)
    weight = torch.where(weight == 0, torch.ones(()), weight)
    pruned = int(round(sparsity * k))
    if pruned:
        weight.scatter_(1, torch.rand(n, k, generator=g).topk(pruned, dim=1).indices, 0.0)
    return weight.to(dtype).to(device)


def fastest_table(rows: list[dict]) -> dict:
    """The tuning table ``auto`` reads, from :func:`gemm_case` rows: {"NxK": {M: the fastest backend,
    or dense when none beats it}}."""
    table: dict = {}
    for r in rows:
        if r["backend"] == "dense":
            continue
        cell = table.setdefault(f"{r['N']}x{r['K']}", {})
        key = str(r["M"])
        if r["speedup"] > 1.0 and (key not in cell or r["speedup"] > cell[key][1]):
            cell[key] = (r["backend"], r["speedup"])
        cell.setdefault(key, ("dense", 1.0))
    return {shape: {m: choice[0] for m, choice in cells.items()} for shape, cells in table.items()}


def gemm_case(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, timer: Timer,
              backends: list[str] | None = None, info: dict | None = None, seed: int = 0,
              kind: str = "2:4") -> list[dict]:
    """Dense ``F.linear`` and every available sparse backend on one random weight [n, k] and x [m, k]:
    2:4 (``kind="2:4"``) or bitmask at a sparsity (``kind="bitmask50"``, ``"bitmask70"``)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "2:4":
        weight = random_24(n, k, dtype, device, generator=g)
        packed = Packed24.from_dense(weight)
    else:
        weight = random_bitmask(n, k, int(kind.removeprefix("bitmask")) / 100, dtype, device, generator=g)
        packed = Bitmask.from_dense(weight)
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    names = [b for b in (backends or list(BACKENDS)) if b in available(x, packed) and b not in ("reference", "dense")]
    graph = device.type == "cuda" and m <= 64
    element = torch.tensor([], dtype=dtype).element_size()
    peak = peaks(info or {})
    rows = []
    dense_s = timer(lambda: F.linear(x, weight), graph=graph)
    dense_mode = timer.mode
    flops = 2 * m * n * k
    dense_bytes = gemm_bytes(m, n, k, element, packed=False)
    sparse_bytes = gemm_bytes(m, n, k, element, packed=True) if kind == "2:4" else \
        packed.nbytes() + (m * k + m * n) * element
    compute_bound = peak is not None and flops / (peak[0] * 1e12) > dense_bytes / (peak[1] * 1e9)
    ideal = 2.0 if compute_bound else dense_bytes / sparse_bytes
    for name in ["dense"] + names:
        if name == "dense":
            seconds, moved = dense_s, dense_bytes
        else:
            sparse_linear(x, packed, None, name)  # build the cached form outside the timing
            seconds = timer(lambda name=name: sparse_linear(x, packed, None, name), graph=graph)
            moved = sparse_bytes
        mode = dense_mode if name == "dense" else timer.mode
        row = {"M": m, "N": n, "K": k, "dtype": str(dtype).split(".")[-1], "kind": kind, "backend": name,
               "latency_us": _sig(seconds * 1e6), "tflops": _sig(flops / seconds / 1e12),
               "gbps": _sig(moved / seconds / 1e9), "speedup": round(dense_s / seconds, 3), "timing": mode}
        if peak is not None:
            floor = max(flops / (peak[0] * 1e12) / (1 if name == "dense" else 2), moved / (peak[1] * 1e9))
            row["roofline_floor_us"] = round(floor * 1e6, 2)
            row["bound"] = "compute" if compute_bound else "memory"
        row["fraction_of_ideal"] = round(dense_s / seconds / ideal, 3) if name != "dense" else None
        row["ideal_speedup"] = round(ideal, 3)
        rows.append(row)
    return rows


def model_shapes(model) -> list[tuple[str, int, int]]:
    """(name, N, K) of the distinct linear shapes of a model's decoder layers (first layer's names)."""
    from .format24 import is_24
    from .modules import SparseLinear

    seen, shapes = set(), []
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            n, k = module.out_features, module.in_features
        elif isinstance(module, torch.nn.Linear) and is_24(module.weight.detach()):
            n, k = module.weight.shape
        else:
            continue
        if (n, k) not in seen:
            seen.add((n, k))
            shapes.append((name.rsplit(".", 1)[-1], n, k))
    return shapes


def usable_backends(model) -> list[str]:
    """The GPU/Triton backends that can run this model's SparseLinear layers (judged on the first)."""
    from .modules import SparseLinear

    first = next((m for m in model.modules() if isinstance(m, SparseLinear)), None)
    if first is None:
        return []
    probe = torch.zeros(1, first.in_features, dtype=first.values.dtype, device=first.values.device)
    return [b for b in available(probe, first.packed) if b not in ("dense", "reference")]


def set_backend(model, backend: str) -> None:
    from .modules import SparseLinear

    for module in model.modules():
        if isinstance(module, SparseLinear):
            module.backend = backend


def decode_step_seconds(model, device: torch.device, timer: Timer, batch: int, context: int) -> tuple[float, str]:
    """Seconds of one decode step (one new token for each of ``batch`` sequences with ``context``
    tokens in a static KV cache), and how it was timed: on a GPU the step is replayed as a CUDA graph
    (the host's per-layer launches would otherwise be most of a decode step), eager if the capture
    fails or on a CPU. Every call writes the same cache slot (``context``), so replays repeat exactly."""
    from transformers import StaticCache

    from .decode import cache_kwargs, set_length

    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(batch)
    length = context + 8
    cache = StaticCache(config=model.config, max_cache_len=length)
    prompt = torch.randint(vocab, (batch, context), generator=g).to(device)
    span = torch.arange(length, device=device)
    with torch.no_grad():
        model(input_ids=prompt, attention_mask=(span.view(1, -1) <= torch.arange(context, device=device).view(-1, 1))
              .view(1, 1, context, length).expand(batch, 1, context, length),
              **cache_kwargs(model, cache, torch.arange(context, device=device), batch))
    step = torch.randint(vocab, (batch, 1), generator=g).to(device)
    position = torch.tensor([context], device=device)
    # an explicit 4-D mask (True: attend) keeps the step free of host-side mask logic, so it can be captured
    mask = (span <= context).view(1, 1, 1, length).expand(batch, 1, 1, length)
    kwargs = cache_kwargs(model, cache, position, batch)

    def run():
        set_length(cache, context)  # a self-counting cache (transformers >= 5.25) writes slot `context` again
        with torch.no_grad():
            model(input_ids=step, attention_mask=mask, **kwargs)

    seconds = timer(run, graph=device.type == "cuda")
    return seconds, timer.mode


@torch.no_grad()
def end_to_end(model, device: torch.device, timer: Timer, prompt_len: int = 512, batches=(1, 8, 32),
               context: int = 32) -> dict:
    """Prefill tokens/s (a prompt of ``prompt_len`` at batch 1) and decode tokens/s at each batch: one
    step after ``context`` tokens, static KV cache (:func:`decode_step_seconds`)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator(device="cpu").manual_seed(0)
    out = {}
    prompt = torch.randint(vocab, (1, prompt_len), generator=g).to(device)
    out["prefill_s"] = timer(lambda: model(input_ids=prompt, use_cache=False))
    out["prefill_tokens_per_s"] = prompt_len / out["prefill_s"]
    for batch in batches:
        seconds, mode = decode_step_seconds(model, device, timer, batch, context)
        out[f"decode_tokens_per_s_batch{batch}"] = batch / max(seconds, 1e-9)
        out[f"decode_timing_batch{batch}"] = mode
    return out
