"""`oneshot eval` of a bfloat16 checkpoint on the CPU: the same perplexity as an independent float32
computation, at float32 speed (issue 13).

Model: the bfloat16 SmolLM2-135M-Instruct (``benchmarks.common.smollm2_bf16``). Text: the first
``--windows`` x ``--seqlen`` windows of WikiText-2 test (oneshot reads its bundled copy; the
independent computation reads ``../shared/data/wikitext-2/wiki.test.raw``, the same text).

1. ``oneshot eval``'s perplexity (``oneshot.evaluate.evaluate``, which computes 16-bit models in float32
   on the CPU), timed;
2. an independent one: transformers loads the checkpoint with ``dtype=torch.float32`` and each window's
   mean loss comes from the model's own ``labels=`` path; exp of their mean;
3. what eval did before: the same windows computed in bfloat16, timed on ``--bf16-windows`` of them and
   extrapolated (the whole run takes over ten minutes).

    python benchmarks/eval_cpu.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import OUT, TEST, machine, smollm2_bf16  # noqa: E402


def independent(directory: str, dtype, windows: int, seqlen: int) -> tuple[float, float]:
    """(perplexity, seconds) from transformers alone, the model in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    ids = tok(open(TEST, encoding="utf-8").read(), return_tensors="pt").input_ids
    t = time.perf_counter()
    losses = []
    with torch.no_grad():
        for i in range(windows):
            window = ids[:, i * seqlen : (i + 1) * seqlen]
            losses.append(float(model(input_ids=window, labels=window).loss))
    return math.exp(sum(losses) / len(losses)), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--bf16-windows", type=int, default=2, help="windows timed in bfloat16 (then extrapolated)")
    args = ap.parse_args()

    import torch

    from oneshot.config import EvalConfig
    from oneshot.evaluate import evaluate

    directory = smollm2_bf16()
    t = time.perf_counter()
    result = evaluate(directory, EvalConfig(ppl="wikitext2", seqlen=args.seqlen, max_windows=args.windows),
                      device="cpu")
    oneshot_s = time.perf_counter() - t
    got = result["models"][directory]
    ppl = got["perplexity"]["perplexity"]
    ref, ref_s = independent(directory, torch.float32, args.windows, args.seqlen)
    _, bf16_s = independent(directory, torch.bfloat16, args.bf16_windows, args.seqlen)
    row = {
        "machine": machine(), "model": directory, "windows": args.windows, "seqlen": args.seqlen,
        "oneshot_eval_perplexity": ppl, "oneshot_eval_compute_dtype": got["compute_dtype"],
        "oneshot_eval_seconds": round(oneshot_s, 1),
        "independent_float32_perplexity": ref, "independent_float32_seconds": round(ref_s, 1),
        "same_to_4_significant_digits": f"{ppl:.4g}" == f"{ref:.4g}",
        "relative_difference": abs(ppl - ref) / ref,
        "bfloat16_seconds_per_window": round(bf16_s / args.bf16_windows, 1),
        "bfloat16_seconds_extrapolated": round(bf16_s / args.bf16_windows * args.windows, 1),
    }
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "eval_cpu.json"), "w") as fh:
        json.dump(row, fh, indent=2)
    print(json.dumps(row, indent=2))
    print(f"\n| computation | perplexity | seconds ({args.windows} x {args.seqlen}) |\n|---|---|---|")
    print(f"| `oneshot eval` ({got['compute_dtype']} compute) | {ppl:.4f} | {oneshot_s:.1f} (load and tokenize "
          "included) |")
    print(f"| independent, transformers in float32 | {ref:.4f} | {ref_s:.1f} (forward passes only) |")
    print(f"| bfloat16 compute (eval before this change) | — | {row['bfloat16_seconds_extrapolated']:.0f} "
          f"(extrapolated from {args.bf16_windows} windows) |")


if __name__ == "__main__":
    main()
