"""Issue 16: structured pruning of SmolLM2-135M-Instruct (bf16) — perplexity, prune time and CPU speed.

    python benchmarks/structured.py quality [--fractions 0.2,0.35] [--recipes ...]
    python benchmarks/structured.py speed DIR [DIR ...]
    python benchmarks/structured.py compare DENSE_DIR DIR [DIR ...] [--rounds 7]   # interleaved

``quality``: for each fraction of the decoder blocks' parameters, each recipe runs as its own
`oneshot prune` process (calibration 32 x 512 tokens of WikiText-2 validation), then perplexity on
the first 32 x 1024 windows of WikiText-2 test (float32), and the CPU speed of the output. Recipes:
``blocks`` (ShortGPT: the blocks of least Block Influence, no compensation), ``channels``,
``heads,channels`` (group OBS). ``speed``: plain transformers on the CPU, float32 (as a CPU user
runs a bf16 checkpoint), same threads: prefill tokens/s (batch 1, 512 tokens) and decode tokens/s
(batch 1 and 8, 64 new tokens after a 32-token prompt, greedy, KV cache), median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, VALID, machine, smollm2_bf16  # noqa: E402
from benchmarks.quality import ppl_of  # noqa: E402

RECIPES = {"blocks": "--structure blocks", "channels": "--structure channels",
           "heads,channels": "--structure heads,channels", "channels,blocks": "--structure channels,blocks"}
UPDATE = "--update block --block-target model --block-epochs 2 --block-lr 1e-3 --block-batch 2"
RECIPES.update({f"{name}/update": f"{flags} {UPDATE}" for name, flags in list(RECIPES.items())})


def speed(directory: str, repeats: int = 5) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    prompt = torch.randint(0, vocab, (1, 512), generator=gen)
    with torch.no_grad():
        prefill = timed(lambda: model(input_ids=prompt, use_cache=False))
        result = {"prefill_tokens_per_s": 512 / prefill}
        for batch in (1, 8):
            ids = torch.randint(0, vocab, (batch, 32), generator=gen)
            run = timed(lambda ids=ids: model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                                        pad_token_id=0))
            result[f"decode_b{batch}_tokens_per_s"] = batch * 64 / run
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["threads"] = torch.get_num_threads()
    return result


def compare(dirs: list[str], rounds: int, new_tokens: int = 64) -> list[dict]:
    """CPU speed of several checkpoints measured in turn, round after round (the machine's speed
    drifts by up to 1.5x between runs minutes apart, so a ratio is only fair within a round): per
    round and model, prefill of 512 tokens at batch 1 and a greedy decode of ``new_tokens`` at batch
    1 and 8; per model the median over rounds, and the median over rounds of each round's ratio to
    the first checkpoint (the dense one)."""
    import torch
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in dirs]
    vocab = models[0].config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, 512), generator=gen)
    ids = {b: torch.randint(0, vocab, (b, 32), generator=gen) for b in (1, 8)}
    keys = ("prefill_tokens_per_s", "decode_b1_tokens_per_s", "decode_b8_tokens_per_s")
    samples = [{k: [] for k in keys} for _ in models]

    def tokens_per_s(fn, tokens: int) -> float:
        t = time.perf_counter()
        fn()
        return tokens / (time.perf_counter() - t)

    with torch.no_grad():
        for m in models:  # warm-up
            m(input_ids=prompt, use_cache=False)
            m.generate(ids[1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        for r in range(rounds):
            for i, m in enumerate(models):
                samples[i]["prefill_tokens_per_s"].append(tokens_per_s(lambda m=m: m(input_ids=prompt, use_cache=False),
                                                                       512))
                for b in (1, 8):
                    samples[i][f"decode_b{b}_tokens_per_s"].append(tokens_per_s(
                        lambda m=m, b=b: m.generate(ids[b], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                    do_sample=False, pad_token_id=0), b * new_tokens))
            print(f"round {r + 1}/{rounds}: decode b1 " + ", ".join(f"{s['decode_b1_tokens_per_s'][-1]:.1f}"
                                                                     for s in samples), flush=True)
    rows = []
    for d, m, smp in zip(dirs, models, samples):
        row = {"dir": d, "parameters": sum(p.numel() for p in m.parameters()), "rounds": rounds,
               "threads": torch.get_num_threads()}
        for k in keys:
            row[k] = statistics.median(smp[k])
            row[k.replace("_tokens_per_s", "_vs_first")] = statistics.median(
                a / b for a, b in zip(smp[k], samples[0][k]))
        rows.append(row)
    return rows


def quality(fractions: list[float], recipes: list[str], repeats: int, keep: str | None = None) -> None:
    model = smollm2_bf16()
    rows = [{"recipe": "dense", "fraction": 0.0, "perplexity": ppl_of(model, 32, 1024), **speed(model, repeats)}]
    print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = keep or scratch
        for fraction in fractions:
            for recipe in recipes:
                out = os.path.join(tmp, f"{recipe}-{fraction}".replace(",", "+").replace("/", "_"))
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "oneshot", "prune", model, *RECIPES[recipe].split(),
                                "--remove", str(fraction), "--calib", VALID, "--nsamples", "32", "--seqlen", "512",
                                "--out", out, "--quiet"], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
                wall = time.perf_counter() - t
                with open(os.path.join(out, "report.json")) as fh:
                    st = json.load(fh)["structured"]
                removed = 1 - st["decoder_parameters_after"] / st["decoder_parameters_before"]
                rows.append({"recipe": recipe, "fraction": fraction, "removed": removed, "prune_wall_s": wall,
                             "perplexity": ppl_of(out, 32, 1024), **speed(out, repeats)})
                print(rows[-1], flush=True)
    dense = rows[0]
    print(machine())
    print("| recipe | asked | removed (decoder blocks) | parameters | perplexity | prune wall s | prefill tok/s "
          "(b1, 512) | decode tok/s b1 | decode tok/s b8 | decode b1 vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['fraction']:.0%} | {r.get('removed', 0):.1%} | {r['parameters'] / 1e6:.1f} M | "
              f"{r['perplexity']:.2f} | {r.get('prune_wall_s', 0):.0f} | {r['prefill_tokens_per_s']:.0f} | "
              f"{r['decode_b1_tokens_per_s']:.1f} | {r['decode_b8_tokens_per_s']:.1f} | "
              f"{r['decode_b1_tokens_per_s'] / dense['decode_b1_tokens_per_s']:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--fractions", default="0.2,0.35")
    q.add_argument("--recipes", default="blocks,channels,heads+channels",
                   help="comma list of recipes; '+' inside one: blocks, channels, heads+channels, channels+blocks; "
                        "NAME/update adds a block update toward the dense model's stream")
    q.add_argument("--repeats", type=int, default=5)
    q.add_argument("--keep", default=None, help="keep the pruned outputs in this directory")
    c = sub.add_parser("compare", help="interleaved CPU speed of DENSE_DIR and pruned outputs, ratios per round")
    c.add_argument("dirs", nargs="+")
    c.add_argument("--rounds", type=int, default=7)
    c.add_argument("--json-out", default=None)
    s = sub.add_parser("speed")
    s.add_argument("dirs", nargs="+")
    s.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    if a.command == "compare":
        rows = compare(a.dirs, a.rounds)
        print(machine())
        print("| checkpoint | parameters | prefill tok/s | vs dense | decode b1 tok/s | vs dense | decode b8 tok/s | "
              "vs dense |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            cells = [f"{r['prefill_tokens_per_s']:.0f}", f"{r['prefill_vs_first']:.2f}x",
                     f"{r['decode_b1_tokens_per_s']:.1f}", f"{r['decode_b1_vs_first']:.2f}x",
                     f"{r['decode_b8_tokens_per_s']:.1f}", f"{r['decode_b8_vs_first']:.2f}x"]
            print(f"| {os.path.basename(r['dir'].rstrip('/'))} | {r['parameters'] / 1e6:.1f} M | " + " | ".join(cells)
                  + " |")
        if a.json_out:
            with open(a.json_out, "w") as fh:
                json.dump({"machine": machine(), "rows": rows}, fh, indent=1)
    elif a.command == "speed":
        for d in a.dirs:
            print(d, speed(d, a.repeats))
    else:
        quality([float(f) for f in a.fractions.split(",")], [r.replace("+", ",") for r in a.recipes.split(",")],
                a.repeats, a.keep)


if __name__ == "__main__":
    main()
