"""The decode-kernel sweep: every fixed Triton variant against cuBLAS at decode sizes, checked and timed.

    python benchmarks/kernels/sweep.py [--out DIR] [--dry-run] [--iters 30] [--workers 12]

For 2:4, bitmask 50% and bitmask 70% weights at the Llama-3-8B shapes (4096 x 4096, 1024 x 4096,
14336 x 4096, 4096 x 14336) and M = 1, 4, 8, 16, bf16: dense ``F.linear`` (cuBLAS) and each variant of
``kernels.triton_sparse.sweep_configs`` (a small fixed list per shape and M: CUDA-core and tl.dot
tiles, each at the K split that fills the GPU and at twice that, and the two-kernel reduction). Each
variant is first checked against the fp32 reference (relative error within the dtype's tolerance)
and run twice for the same bits; only a variant that passes both is timed and can enter the tuning
table. Timing: kernels.bench.Timer (CUDA events, L2 flushed, each call a CUDA graph, median).

Compiling ~100 variants one after another takes minutes, so ``--workers`` processes first compile
them in parallel by running each once (Triton's on-disk cache then serves the timed process).

Writes DIR/sweep.json (default benchmarks/out) with every row and the tuning cells
(``{"bfloat16": {"NxK": {M: "triton:<variant>" or "dense"}}, "bfloat16/bitmask": {...}}``, the bitmask
table from the 50% rows). benchmarks/gpu_check.py runs the same sweep as its ``decode`` section.
"""

# ruff: noqa: B023 - every closure here is timed at once, inside the iteration that made it
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
TINY_SHAPES = [(64, 128), (48, 200)]
M_SIZES = (1, 4, 8, 16)
KINDS = {"2:4": None, "bitmask50": 0.5, "bitmask70": 0.7}  # kind -> sparsity of a bitmask weight
TOLERANCE = {"bfloat16": 1.2e-2, "float16": 2e-3, "float32": 1e-4}


def make_weight(kind: str, n: int, k: int, dtype, device, seed: int = 0):
    """(dense masked weight, sparse weight object) drawn on ``device`` from a seeded generator: 2:4 with
    exactly 2 of every 4 kept, bitmask with exactly the kind's sparsity in every row."""
    import torch

    from oneshot.kernels import Bitmask, Packed24

    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device)
    w = torch.where(w == 0, torch.ones((), device=device), w)
    score = torch.rand(n, k, generator=g, device=device)
    if KINDS[kind] is None:
        groups = score.view(n, k // 4, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.argsort(-1)[..., :2], True).view(n, k)
    else:
        pruned = int(round(KINDS[kind] * k))
        keep = torch.ones(n, k, dtype=torch.bool, device=device)
        if pruned:
            keep.scatter_(1, score.topk(pruned, dim=1).indices, False)
    dense = torch.where(keep, w, torch.zeros((), device=device)).to(dtype)
    return dense, (Packed24 if KINDS[kind] is None else Bitmask).from_dense(dense)


def plan(dry: bool) -> list[tuple]:
    """(kind, N, K, M, [variant keys]) of the whole sweep, in the order it runs."""
    from oneshot.kernels.triton_sparse import sweep_configs

    shapes, sizes = (TINY_SHAPES, (1, 4)) if dry else (SHAPES, M_SIZES)
    out = []
    for kind in KINDS:
        for n, k in shapes:
            if KINDS[kind] is None and k % 4:
                continue
            for m in sizes:
                configs = [c.key() for c in sweep_configs(n, k, m)]
                out.append((kind, n, k, m, configs[:3] if dry else configs))
    return out


def warm(items: list[tuple], device, dtype) -> int:
    """Run each (kind, N, K, M, variant) once, so that Triton compiles and caches it; returns failures."""
    import torch

    from oneshot.kernels import sparse_linear

    weights, failed = {}, 0
    for kind, n, k, m, key in items:
        if (kind, n, k) not in weights:
            weights = {(kind, n, k): make_weight(kind, n, k, dtype, device)[1]}  # one weight at a time
        x = torch.randn(m, k, device=device).to(dtype)
        try:
            sparse_linear(x, weights[(kind, n, k)], None, f"triton:{key}")
        except Exception:  # noqa: BLE001 - the timed process records the error
            failed += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return failed


def spawn_warmers(workers: int, dry: bool) -> dict:
    """Compile every variant of the sweep in ``workers`` parallel processes; {"seconds", "variants"}."""
    items = [(kind, n, k, m, key) for kind, n, k, m, keys in plan(dry) for key in keys]
    t = time.time()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--warm", f"{i}/{workers}"]
                              + (["--dry-run"] if dry else []), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in range(workers)]
    errors = [p.communicate()[1][-500:] for p in procs if p.wait() != 0]
    return {"seconds": round(time.time() - t, 1), "variants": len(items), "workers": workers,
            "worker_errors": [e for e in errors if e]}


def weight_bytes(weight) -> int:
    from oneshot.kernels.triton_sparse import GROUP

    extra = weight.offsets(GROUP).numel() * weight.offsets(GROUP).element_size() if weight.kind == "bitmask" else 0
    return weight.nbytes() + extra


def run_sweep(device, dtype, timer, dry: bool, on_case=None) -> list[dict]:
    """Every case of :func:`plan`: dense, then each variant checked (error, same bits twice) and timed."""
    import torch
    import torch.nn.functional as F

    from oneshot.kernels import sparse_linear

    name = str(dtype).split(".")[-1]
    graph = device.type == "cuda"
    rows, current = [], None
    for kind, n, k, m, keys in plan(dry):
        if current is None or current[0] != (kind, n, k):
            current = ((kind, n, k), *make_weight(kind, n, k, dtype, device))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        _, dense_w, weight = current
        x = torch.randn(m, k, generator=torch.Generator(device=device).manual_seed(m), device=device).to(dtype)
        ref = F.linear(x.float(), dense_w.float())
        dense_s = timer(lambda: F.linear(x, dense_w), graph=graph)
        moved = weight_bytes(weight) + (m * k + m * n) * x.element_size()
        dense_moved = dense_w.numel() * dense_w.element_size() + (m * k + m * n) * x.element_size()
        case = []
        for key in keys:
            row = {"kind": kind, "N": n, "K": k, "M": m, "dtype": name, "variant": key,
                   "dense_us": round(dense_s * 1e6, 2), "dense_gbps": round(dense_moved / dense_s / 1e9, 1),
                   "ideal_speedup": round(dense_moved / moved, 3)}
            backend = f"triton:{key}"
            try:
                y = sparse_linear(x, weight, None, backend)
                err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))
                same = bool(torch.equal(y, sparse_linear(x, weight, None, backend)))
                row.update(rel_error=float(f"{err:.3g}"), deterministic=same,
                           ok=same and err <= TOLERANCE[name] and bool(torch.isfinite(y).all()))
                if row["ok"]:
                    seconds = timer(lambda: sparse_linear(x, weight, None, backend), graph=graph)
                    row.update(us=round(seconds * 1e6, 2), gbps=round(moved / seconds / 1e9, 1),
                               speedup=round(dense_s / seconds, 3), timing=timer.mode)
            except Exception as exc:  # noqa: BLE001 - a variant that fails is a result, not the end
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            case.append(row)
        rows += case
        if on_case is not None:
            on_case(case)
    return rows


def tuning_cells(rows: list[dict]) -> dict:
    """{table key: {"NxK": {M: "triton:<fastest passing variant>" or "dense"}}} from the sweep's rows:
    2:4 under the dtype's name, bitmask (from the 50% rows) under ``<dtype>/bitmask``."""
    best: dict = {}
    for r in rows:
        if r["kind"] == "bitmask70" or "speedup" not in r:
            continue
        key = r["dtype"] if r["kind"] == "2:4" else f"{r['dtype']}/bitmask"
        cell = best.setdefault(key, {}).setdefault(f"{r['N']}x{r['K']}", {})
        m = str(r["M"])
        if r["speedup"] > cell.get(m, ("dense", 1.0))[1]:
            cell[m] = (f"triton:{r['variant']}", r["speedup"])
        cell.setdefault(m, ("dense", 1.0))
    return {table: {shape: {m: v[0] for m, v in cells.items()} for shape, cells in shapes.items()}
            for table, shapes in best.items()}


def best_rows(rows: list[dict]) -> list[dict]:
    """The fastest passing variant of each (kind, N, K, M), or the case's dense row when none passed."""
    out: dict = {}
    for r in rows:
        key = (r["kind"], r["N"], r["K"], r["M"])
        if key not in out or r.get("speedup", 0) > out[key].get("speedup", 0):
            out[key] = r
    return list(out.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the Triton interpreter")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--workers", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--warm", default=None, help=argparse.SUPPRESS)  # I/N: compile every N-th variant from I
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from oneshot.kernels.bench import Timer, device_info

    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.warm:
        i, n = (int(v) for v in args.warm.split("/"))
        items = [(kind, nn, k, m, key) for kind, nn, k, m, keys in plan(args.dry_run) for key in keys]
        return 1 if warm(items[i::n], device, dtype) else 0
    result = {"device": device_info(device), "dtype": str(dtype)}
    if cuda or args.workers > 1:
        result["warm"] = spawn_warmers(args.workers, args.dry_run)
    timer = Timer(device, warmup=5, iters=args.iters if cuda else 3)
    t = time.time()
    result["rows"] = run_sweep(device, dtype, timer, args.dry_run)
    result["seconds"] = round(time.time() - t, 1)
    result["tuning"] = tuning_cells(result["rows"])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sweep.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    for r in best_rows(result["rows"]):
        print(f"{r['kind']:<10} {r['N']}x{r['K']} M={r['M']:<3} dense {r['dense_us']} us; best "
              + (f"{r['variant']} {r['us']} us ({r['speedup']:.2f}x, ideal {r['ideal_speedup']:.2f}x)"
                 if "us" in r else "none passed"))
    bad = [r for r in result["rows"] if not r.get("ok")]
    print(f"{path}: {len(result['rows'])} variants, {len(bad)} failed, {result['seconds']} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
