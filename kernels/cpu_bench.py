"""Timing the CPU kernels: the GEMV table (torch fp32, torch bf16, this project's dense kernel and the sparse
ones, interleaved in one process) and the machine's read bandwidth measured beside it.

The test machines are shared and noisy, so every case of one shape is timed in the same loop, one call
each in turn, and the median decides; the weights are rotated among copies that together exceed any
cache (``pool_bytes``), so every call reads its weight from memory as a decode step does.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from .bench import random_24, random_bitmask
from .weights import Bitmask, DenseWeight, Packed24

KINDS = ("bitmask50", "bitmask60", "bitmask70", "2:4")
SHAPES = ((2048, 8192), (8192, 2048), (4096, 4096), (14336, 4096))


def read_bandwidth(nbytes: int = 512 * 2**20, iters: int = 9) -> float:
    """GB/s of the kernels' own read loop over a buffer larger than any cache (all threads, median)."""
    from .cpu import build

    module = build()
    buf = torch.ones(nbytes // 8 * 8, dtype=torch.uint8)
    module.read_sum(buf)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        module.read_sum(buf)
        times.append(time.perf_counter() - t)
    return buf.numel() / statistics.median(times) / 1e9


def _weight(kind: str, n: int, k: int, dtype: torch.dtype, seed: int):
    if kind == "2:4":
        return Packed24.from_dense(random_24(n, k, dtype, "cpu", seed=seed))
    return Bitmask.from_dense(random_bitmask(n, k, int(kind.removeprefix("bitmask")) / 100, dtype, "cpu", seed=seed))


def _nbytes(weight) -> int:
    """Bytes a call reads for the weight: the kernel-side layout (values, masks, group offsets)."""
    from .cpu import layout

    form = layout(weight)
    if form[0] == "dense":
        return form[1].numel() * form[1].element_size()
    return form[1].numel() + form[3].numel() * 4 + form[2].numel() * 8


def gemv_rows(shapes=SHAPES, m_sizes=(1, 4, 8), kinds=KINDS, dtype: torch.dtype = torch.bfloat16,
              iters: int = 40, pool_bytes: int = 256 * 2**20, max_copies: int = 256, isas=None,
              seed: int = 0, progress=None) -> list[dict]:
    """One row per (shape, M, case): case ``torch fp32``, ``torch bf16`` (``F.linear``), ``dense <isa>`` (this
    project's dense kernel) and ``<kind> <isa>`` for each sparse kind, with median microseconds, the bytes
    a call reads, GB/s, ``speedup`` over the fastest dense case of the same shape and M, and ``vs_own_dense``
    over this project's dense kernel on the same path. ``isas``: the paths to time (default: this CPU's
    best, and AVX2 too where the best is AVX-512). Each weight has ``pool_bytes`` of copies (at most
    ``max_copies``), called in turn."""
    from .cpu import ISAS, cpu_linear, isa

    best = isa()
    isas = isas or ([best, ISAS["avx2"]] if best == ISAS["avx512"] else [best])
    names = {v: k for k, v in ISAS.items()}
    rows = []
    for n, k in shapes:
        copies = min(max_copies, max(2, -(-pool_bytes // (n * k * 2))))
        dense16 = [random_bitmask(n, k, 0.0, dtype, "cpu", seed=seed + i) for i in range(copies)]
        dense32 = [w.float() for w in dense16[: max(2, copies // 2)]]
        cases: dict[str, tuple[list, int]] = {
            "torch fp32": (dense32, n * k * 4), f"torch {str(dtype).split('.')[-1]}": (dense16, n * k * 2)}
        for code in isas:
            cases[f"dense {names[code]}"] = ([DenseWeight(w) for w in dense16], n * k * 2)
        sparse = {kind: [_weight(kind, n, k, dtype, seed + i) for i in range(copies)] for kind in kinds}
        for kind, weights in sparse.items():
            for code in isas:
                cases[f"{kind} {names[code]}"] = (weights, _nbytes(weights[0]))
        for m in m_sizes:
            g = torch.Generator().manual_seed(seed + m)
            x32 = torch.randn(m, k, generator=g)
            x16 = x32.to(dtype)
            calls = {}
            for case, (weights, _) in cases.items():
                head, _, path = case.partition(" ")
                if head == "torch":
                    x = x32 if path == "fp32" else x16
                    calls[case] = [lambda w=w, x=x: F.linear(x, w) for w in weights]
                else:
                    calls[case] = [lambda w=w, c=ISAS[path], x=x16: cpu_linear(x, w, None, c) for w in weights]
            for fns in calls.values():  # layouts built, pages touched, code warm
                for fn in fns:
                    fn()
            times: dict[str, list[float]] = {case: [] for case in calls}
            for it in range(iters):
                for case, fns in calls.items():
                    t = time.perf_counter()
                    fns[it % len(fns)]()
                    times[case].append(time.perf_counter() - t)
            med = {case: statistics.median(v) for case, v in times.items()}
            fastest_dense = min(v for case, v in med.items() if case.startswith(("torch", "dense")))
            for case, seconds in med.items():
                head, _, path = case.partition(" ")
                own = med.get(f"dense {path}")
                rows.append({"N": n, "K": k, "M": m, "case": case, "kind": head, "path": path,
                             "us": round(seconds * 1e6, 1), "bytes": cases[case][1],
                             "gbps": round(cases[case][1] / seconds / 1e9, 2),
                             "speedup": round(fastest_dense / seconds, 3),
                             "vs_own_dense": None if own is None or head == "torch" else round(own / seconds, 3)})
            if progress:
                progress(f"{n}x{k} M={m}")
        del dense16, dense32, sparse, cases
    return rows


def format_gemv(rows: list[dict], bandwidth: float | None = None) -> str:
    lines = []
    if bandwidth:
        lines.append(f"read bandwidth (all threads): {bandwidth:.1f} GB/s")
    lines.append(f"{'N x K':>12} {'M':>2}  {'case':<16} {'us':>9} {'GB/s':>6} {'vs fastest dense':>17} "
                 f"{'vs own dense':>13}")
    for r in rows:
        own = "" if r["vs_own_dense"] is None else f"{r['vs_own_dense']:.2f}x"
        lines.append(f"{r['N']:>6}x{r['K']:<5} {r['M']:>2}  {r['case']:<16} {r['us']:>9.1f} {r['gbps']:>6.1f} "
                     f"{r['speedup']:>16.2f}x {own:>13}")
    return "\n".join(lines)


class _Capture:
    """Stands in for a Timer: keeps the step ``decode_step_seconds`` would time, so several models' steps
    can be timed interleaved."""

    mode = "eager"

    def __init__(self):
        self.step = None

    def __call__(self, fn, graph: bool = False) -> float:
        self.step = fn
        return 1.0


def decode_tokens_per_s(models: dict, iters: int = 10, context: int = 32, batch: int = 1) -> dict:
    """{name: decode tokens/s at ``batch``} for several models timed in turn, one step each per round
    (one new token after ``context`` tokens in a static cache), median of ``iters`` rounds after one."""
    from .bench import decode_step_seconds

    steps = {}
    for name, model in models.items():
        capture = _Capture()
        decode_step_seconds(model, torch.device("cpu"), capture, batch, context)
        steps[name] = capture.step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for it in range(iters + 1):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            if it:
                times[name].append(time.perf_counter() - t)
    return {name: batch / statistics.median(v) for name, v in times.items()}
