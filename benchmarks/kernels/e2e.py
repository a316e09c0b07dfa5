"""End to end: a random-init model with Llama-3-8B shapes, every decoder linear 2:4, prefill (time to
first token) and decode tokens/s at batch 1, 8, 32, dense against each kernels backend.

    python benchmarks/kernels/e2e.py [--layers 32] [--prompt-len 2048] [--batches 1,8,32] [--decode-context 512]

Random weights are fine for speed. The 2:4 mask is magnitude-chosen per group of 4 on the GPU (no
calibration: quality is not the point here). --layers trims the depth for a quick look; the tokens/s
then describe that shallower model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def main() -> None:
    import torch
    from gpu_check import LLAMA3_8B, llama

    from oneshot.kernels import sparsify
    from oneshot.kernels.bench import Timer, device_info, end_to_end, set_backend, usable_backends

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--decode-context", type=int, default=512)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU with whatever sizes are given (harness check)")
    ap.add_argument("--json-out", default=os.path.join(ROOT, "benchmarks", "out", "e2e.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("needs a CUDA GPU (or --allow-cpu to check the harness)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    heads = max(1, args.hidden // 128)
    dims = {**LLAMA3_8B, "hidden_size": args.hidden, "intermediate_size": args.intermediate,
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 4), "head_dim": 128}
    model = llama(dims, args.layers, device)  # every decoder linear 2:4 by magnitude, as gpu_check's
    info = device_info(device)
    timer = Timer(device, warmup=2, iters=args.iters)
    batches = tuple(int(b) for b in args.batches.split(","))
    runs = {"dense": end_to_end(model, device, timer, args.prompt_len, batches, args.decode_context)}
    print("dense", json.dumps(runs["dense"]), flush=True)
    sparsify(model, backend="dense")
    for backend in usable_backends(model) + ["auto"]:
        set_backend(model, backend)
        runs[backend] = end_to_end(model, device, timer, args.prompt_len, batches, args.decode_context)
        print(backend, json.dumps(runs[backend]), flush=True)
    os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
    with open(args.json_out, "w") as fh:
        json.dump({"device": info, "args": vars(args), "runs": runs}, fh, indent=2)
    dense = runs["dense"]
    print(f"\n{info}\n")
    print("| backend | prefill tok/s | x dense | " + " | ".join(f"decode b{b} tok/s | x dense" for b in batches) + " |")
    print("|---|---|---|" + "---|---|" * len(batches))
    for name, run in runs.items():
        cells = [f"{run['prefill_tokens_per_s']:.0f}",
                 f"{run['prefill_tokens_per_s'] / dense['prefill_tokens_per_s']:.2f}"]
        for b in batches:
            key = f"decode_tokens_per_s_batch{b}"
            cells += [f"{run[key]:.1f}", f"{run[key] / dense[key]:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
