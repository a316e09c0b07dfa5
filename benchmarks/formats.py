"""Issue 4's bar on the real SmolLM2-135M-Instruct: compressed formats and an independent perplexity.

1. Prune 2:4 with SparseGPT (32 x 512 calibration windows from the shared WikiText-2 validation
   text), write it as dense, then `oneshot convert` it to packed24 and bitmask.
2. Sizes: the pruned layers' bytes in each format against dense, and the weight files on disk.
3. Exactness: logits of the packed24 and bitmask outputs (loaded with `oneshot.load`) against the
   dense output loaded by plain transformers, on `--logit-windows` windows of the test text.
4. Perplexity: `oneshot eval OUT --ppl wiki.test.raw` (the packed24 output) against an independent
   computation of the same protocol written here with transformers' own loss (labels=input_ids):
   the whole file tokenized once, non-overlapping `--seqlen` windows, mean loss over windows (all
   windows have the same length, so that is the mean over tokens).

    python benchmarks/formats.py [--seqlen 2048] [--max-windows N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, TEST, VALID, machine, smollm2_gguf  # noqa: E402


def independent_perplexity(directory: str, seqlen: int, max_windows: int | None) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto").eval()
    ids = tok(open(TEST, encoding="utf-8").read(), return_tensors="pt").input_ids
    windows = ids.shape[1] // seqlen
    if max_windows:
        windows = min(windows, max_windows)
    losses = []
    with torch.no_grad():
        for i in range(windows):
            window = ids[:, i * seqlen:(i + 1) * seqlen]
            losses.append(float(model(input_ids=window, labels=window).loss))
    return math.exp(sum(losses) / len(losses)), windows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--seqlen", type=int, default=2048, help="perplexity window (the papers: 2048)")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--logit-windows", type=int, default=4)
    ap.add_argument("--dtype", default="auto", help="prune in this dtype (auto: the GGUF's dequantized float32)")
    ap.add_argument("--json-out", default=os.path.join(ROOT, "benchmarks", "out", "formats.json"))
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import oneshot
    from oneshot.formats import convert

    result: dict = {"machine": machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        dense = os.path.join(tmp, "dense")
        pruned = oneshot.prune(smollm2_gguf(), dense, method=args.method, pattern="2:4", calib=VALID,
                               nsamples=32, seqlen=512, dtype=args.dtype, progress=False)
        result["prune_seconds"] = pruned.report["seconds"]
        result["dtype"] = pruned.report["dtype"]
        del pruned
        outs = {"dense": dense}
        for fmt in ("packed24", "bitmask"):
            outs[fmt] = os.path.join(tmp, fmt)
            summary = convert(dense, fmt, outs[fmt])
            result.setdefault("storage", {})[fmt] = summary
        result["storage"]["dense"] = json.load(open(os.path.join(dense, "report.json")))["storage"]

        tok = AutoTokenizer.from_pretrained(dense)
        ids = tok(open(TEST, encoding="utf-8").read(), return_tensors="pt").input_ids
        windows = ids[:, : args.logit_windows * 512].reshape(args.logit_windows, 512)
        reference_model = AutoModelForCausalLM.from_pretrained(dense, dtype="auto").eval()
        with torch.no_grad():
            reference = reference_model(input_ids=windows).logits
        del reference_model
        for fmt in ("packed24", "bitmask"):
            with torch.no_grad():
                logits = oneshot.load(outs[fmt])(input_ids=windows).logits
            result.setdefault("logits_equal", {})[fmt] = bool(torch.equal(logits, reference))
            result.setdefault("logits_max_abs_diff", {})[fmt] = float((logits - reference).abs().max())

        cmd = [sys.executable, "-m", "oneshot", "eval", outs["packed24"], "--ppl", TEST, "--seqlen", str(args.seqlen),
               "--tasks", "none", "--json"] + (["--max-windows", str(args.max_windows)] if args.max_windows else [])
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        ours = json.loads(proc.stdout)["models"][outs["packed24"]]["perplexity"]
        result["oneshot_eval"] = {**ours, "seconds": round(time.perf_counter() - t, 1), "command": " ".join(cmd)}
        t = time.perf_counter()
        ppl, count = independent_perplexity(dense, args.seqlen, args.max_windows)
        result["independent"] = {"perplexity": ppl, "windows": count, "seconds": round(time.perf_counter() - t, 1)}
        result["agree_4_significant"] = f"{ours['perplexity']:.4g}" == f"{ppl:.4g}"

    os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
    with open(args.json_out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
