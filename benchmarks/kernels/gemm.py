"""2:4 GEMMs at Llama-3 shapes: dense (cuBLAS via F.linear) against every available kernels backend.

    python benchmarks/kernels/gemm.py [--shapes llama3-8b,llama3-70b] [--m 1,8,16,64,256,1024,4096,16384]
                                      [--dtype bfloat16] [--write-tuning]

CUDA events, warm-up, L2 flushed between runs, CUDA graphs for M <= 64, median of --iters runs
(kernels.bench). Prints a table and writes benchmarks/out/gemm.json with the GPU's name, clocks,
driver and library versions. --write-tuning records the fastest backend per (N, K, M) for this GPU
in kernels/tuning.json, which sparse_linear(backend="auto") reads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> None:
    import torch

    from oneshot.kernels.backends import TUNING
    from oneshot.kernels.bench import M_SIZES, SHAPES, Timer, device_info, fastest_table, gemm_case

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama3-8b,llama3-70b")
    ap.add_argument("--m", default=",".join(map(str, M_SIZES)))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--backends", default=None)
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU (a harness check; the times mean nothing)")
    ap.add_argument("--write-tuning", action="store_true")
    ap.add_argument("--json-out", default=os.path.join(ROOT, "benchmarks", "out", "gemm.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("needs a CUDA GPU (or --allow-cpu to check the harness)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    info = device_info(device)
    timer = Timer(device, warmup=max(5, args.iters // 5), iters=args.iters)
    rows = []
    for model in args.shapes.split(","):
        for layer, n, k in SHAPES[model]:
            for m in (int(v) for v in args.m.split(",")):
                for row in gemm_case(m, n, k, dtype, device, timer, args.backends.split(",") if args.backends else None,
                                     info):
                    rows.append({"model": model, "layer": layer, **row})
                    print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
    with open(args.json_out, "w") as fh:
        json.dump({"device": info, "args": vars(args), "rows": rows}, fh, indent=2)
    print(f"\n{info}\n")
    print("| model | layer | M | N x K | dense us | best 2:4 backend | us | speedup | of ideal |")
    print("|---|---|---|---|---|---|---|---|---|")
    best = {}
    for r in rows:
        key = (r["model"], r["layer"], r["M"])
        if r["backend"] == "dense":
            best.setdefault(key, {})["dense"] = r
        elif r["latency_us"] < best.setdefault(key, {}).get("sparse", {"latency_us": float("inf")})["latency_us"]:
            best[key]["sparse"] = r
    for (model, layer, m), pair in best.items():
        s = pair.get("sparse")
        if s:
            print(f"| {model} | {layer} | {m} | {s['N']} x {s['K']} | {pair['dense']['latency_us']} | {s['backend']} "
                  f"| {s['latency_us']} | {s['speedup']:.2f}x | {s['fraction_of_ideal']:.2f} |")
    if args.write_tuning and device.type == "cuda":
        try:
            table = json.load(open(TUNING))
        except (OSError, ValueError):
            table = {}
        per_gpu = table.setdefault(info["name"], {}).setdefault(args.dtype, {})
        for shape, cells in fastest_table(rows).items():  # the M measured now replace theirs; others stay
            per_gpu.setdefault(shape, {}).update(cells)
        with open(TUNING, "w") as fh:
            json.dump(table, fh, indent=1, sort_keys=True)
        print(f"tuning table written: {TUNING}")


if __name__ == "__main__":
    main()
