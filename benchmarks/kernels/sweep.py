"""Why the 2:4 kernels lose to dense on a GPU, and what their tiles should be: two sweeps in one run.

    python benchmarks/kernels/sweep.py [--out DIR] [--dry-run]

1. The Triton kernel's tile (BLOCK_N, BLOCK_K, warps, stages) at decode sizes M = 1, 16, 64 on the
   Llama-3-8B shapes, against dense cuBLAS; the best tile per shape and M.
2. cuSPARSELt called directly (``torch._cslt_sparse_mm``: no padding, no copy), with its default
   algorithm and with the one ``torch._cslt_sparse_mm_search`` picks, at M = 1 ... 16384, all
   replayed as CUDA graphs (kernel time, no host overhead), against dense.

Writes DIR/sweep.json (default benchmarks/out). Timing: kernels.bench.Timer (CUDA events, L2 flushed,
median). Results: benchmarks/RESULTS.md, "Issue 17".
"""

# ruff: noqa: B023 - every closure here is timed at once, inside the iteration that made it
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
TILES = list(itertools.product((16, 32, 64), (128, 256), (4, 8), (3, 4)))  # BLOCK_N, BLOCK_K, warps, stages


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out"))
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.nn.functional as F

    from oneshot.kernels import Packed24
    from oneshot.kernels.bench import Timer, device_info, random_24
    from oneshot.kernels.triton24 import sparse24_linear

    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = SHAPES if cuda else [(64, 128)]
    tiles = TILES if cuda else [(16, 128, 4, 3), (32, 64, 4, 3)]
    timer = Timer(device, warmup=5, iters=args.iters if cuda else 3)
    result = {"device": device_info(device), "triton": [], "cusparselt": [], "errors": []}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sweep.json")

    def save():
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)

    started = time.time()
    for n, k in shapes:
        w = random_24(n, k, dtype, device, seed=0)
        packed = Packed24.from_dense(w)
        for m in (1, 16, 64) if cuda else (1, 16):
            x = torch.randn(m, k, device=device).to(dtype)
            dense = timer(lambda: F.linear(x, w), graph=cuda)
            ref = F.linear(x.float(), w.float())
            best = None
            for bn, bk, warps, stages in tiles:
                if k % bk:
                    continue
                label = f"n{bn} k{bk} w{warps} s{stages}"

                def run(bn=bn, bk=bk, warps=warps, stages=stages):
                    return sparse24_linear(x, packed.values, packed.meta, None, block_m=16, block_n=bn, block_k=bk,
                                           num_warps=warps, num_stages=stages)

                try:
                    err = float((run().float() - ref).norm() / ref.norm())
                    seconds = timer(run, graph=cuda)
                except Exception as exc:  # noqa: BLE001 - a tile that fails to compile is a result
                    result["errors"].append(f"triton {label} {n}x{k} M={m}: {type(exc).__name__}: {str(exc)[:150]}")
                    continue
                row = {"N": n, "K": k, "M": m, "tile": label, "us": round(seconds * 1e6, 2),
                       "dense_us": round(dense * 1e6, 2), "speedup": round(dense / seconds, 3),
                       "rel_error": float(f"{err:.3g}")}
                result["triton"].append(row)
                if best is None or row["us"] < best["us"]:
                    best = row
            if best:
                print(f"triton {n}x{k} M={m}: dense {best['dense_us']} us, best {best['tile']} {best['us']} us "
                      f"({best['speedup']:.2f}x)", flush=True)
            save()
        if not cuda:
            continue
        compressed = torch._cslt_compress(w)
        for m in (1, 16, 64, 256, 1024, 4096, 16384):
            x = torch.randn(m, k, device=device).to(dtype)
            dense = timer(lambda: F.linear(x, w), graph=True)
            row = {"N": n, "K": k, "M": m, "dense_us": round(dense * 1e6, 2)}
            xt = x.t()
            try:
                y = torch._cslt_sparse_mm(compressed, xt, transpose_result=True)
                ref = F.linear(x.float(), w.float())
                row["rel_error"] = float(f"{float((y.float() - ref).norm() / ref.norm()):.3g}")
                seconds = timer(lambda: torch._cslt_sparse_mm(compressed, xt, transpose_result=True), graph=True)
                row.update(default_us=round(seconds * 1e6, 2), default_speedup=round(dense / seconds, 3))
                found = torch._cslt_sparse_mm_search(compressed, xt, transpose_result=True)
                alg = found[0] if isinstance(found, (tuple, list)) else int(found)
                row["alg_id"] = alg
                seconds = timer(lambda: torch._cslt_sparse_mm(compressed, xt, transpose_result=True, alg_id=alg),
                                graph=True)
                row.update(searched_us=round(seconds * 1e6, 2), searched_speedup=round(dense / seconds, 3))
            except Exception as exc:  # noqa: BLE001
                result["errors"].append(f"cusparselt {n}x{k} M={m}: {type(exc).__name__}: {str(exc)[:150]}")
            result["cusparselt"].append(row)
            print(f"cusparselt {json.dumps(row)}", flush=True)
            save()
        torch.cuda.empty_cache()
    result["seconds"] = round(time.time() - started, 1)
    save()
    for e in result["errors"][:20]:
        print("error:", e)
    print(f"{path}: {len(result['triton'])} triton rows, {len(result['cusparselt'])} cusparselt rows, "
          f"{result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
