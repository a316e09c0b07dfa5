"""Issue 6 bar: prune a checkpoint bigger than memory allows, streaming, and measure peak RSS.

    python benchmarks/streaming.py make /tmp/big            # ~8.8 GB bf16 Llama, 42 layers, sharded
    python benchmarks/streaming.py run /tmp/big --load stream
    python benchmarks/streaming.py run /tmp/big --load full
    python benchmarks/streaming.py run /tmp/big --structure channels --remove 0.2   # structured, streamed
    # the GPU bar (a GPU machine): Llama-3-8B shape, SparseGPT 2:4 at 128 x 2048, then Wanda
    python benchmarks/streaming.py make /tmp/l3 --shape llama3-8b
    python benchmarks/streaming.py run /tmp/l3 --method sparsegpt --pattern 2:4 --nsamples 128 --seqlen 2048
    python benchmarks/streaming.py run /tmp/l3 --method wanda --nsamples 128 --seqlen 2048

``make`` writes the random checkpoint shard by shard (never the whole model in memory): Llama
architecture, by default hidden 3072, MLP 8192, 24 heads / 8 KV heads, vocabulary 32000, untied head.
``run`` prunes it with Wanda 50% (calibration from the shared WikiText-2 validation text) in a
child process and prints its peak RSS (``getrusage(RUSAGE_CHILDREN)``), wall time and the report's
phases. Results: benchmarks/RESULTS.md, "Issue 6".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("ONESHOT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))

SHAPES = {
    # the CPU bar: ~8.85 GB with 42 layers, small enough layers for 2.5 GB of RSS
    "cpu": dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                vocab_size=32000, max_position_embeddings=4096, num_hidden_layers=42),
    # the GPU bar: Llama-3-8B's shape (16 GB of bf16)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, vocab_size=128256, max_position_embeddings=8192, num_hidden_layers=32),
}


def make(directory: str, shape: str, layers: int | None, seed: int) -> None:
    import transformers as tf
    from accelerate import init_empty_weights

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    from benchmarks.common import write_random_shards
    from tiny import make_tokenizer

    dims = dict(SHAPES[shape])
    if layers:
        dims["num_hidden_layers"] = layers
    layers = dims["num_hidden_layers"]
    config = tf.LlamaConfig(dtype="bfloat16", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **dims)
    with init_empty_weights():
        skeleton = tf.AutoModelForCausalLM.from_config(config)
    shapes = {n: p.shape for n, p in skeleton.named_parameters()}
    total = write_random_shards(directory, shapes, layers, seed)
    config.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    print(f"{directory}: {total / 1e9:.2f} GB ({total / 2**30:.2f} GiB) of bf16 weights, {layers} layers")


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _max_rss(stderr_file: str) -> int | None:
    """``Maximum resident set size (kbytes)`` from ``/usr/bin/time -v``: the whole process, in bytes."""
    with open(stderr_file, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if "Maximum resident set size" in line:
                return int(line.rsplit(":", 1)[1]) * 1024
    return None


def run(directory: str, load: str, nsamples: int, seqlen: int, out: str, method: str, pattern: str | None,
        device: str, history: str | None, structure: str | None = None, remove: float | None = None) -> None:
    calib = os.path.join(SHARED, "data", "wikitext-2", "wiki.valid.tokens")
    if os.path.exists(out):
        shutil.rmtree(out)
    if structure:  # structured removal, then the weight pruning only when a pattern is given
        prune = ["--structure", structure, "--remove", str(remove), *(["--method", method, "--pattern", pattern]
                                                                     if pattern else [])]
    else:
        prune = ["--method", method, *(["--pattern", pattern] if pattern else ["--sparsity", "0.5"])]
    cmd = [sys.executable, "-m", "oneshot", "prune", directory, *prune, "--device", device,
           "--calib", calib, "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--load", load, "--out", out,
           "--quiet", "--no-memory-check"]
    timer = shutil.which("time") and os.path.exists("/usr/bin/time")
    if timer:  # the whole process's peak, as a user measures it
        cmd = ["/usr/bin/time", "-v", "-o", out + ".time", *cmd]
    print(" ".join(cmd), flush=True)
    commit = _commit()  # the code the run starts with
    t = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": ROOT})
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if timer and os.path.exists(out + ".time"):
        peak = _max_rss(out + ".time") or peak
        os.remove(out + ".time")
    size = sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if n.endswith(".safetensors"))
    print(f"exit {done.returncode}; checkpoint {size / 1e9:.2f} GB; peak RSS {peak / 1e9:.2f} GB "
          f"({peak / 2**30:.2f} GiB); wall {wall:.0f} s")
    label = (f"structure {structure} {remove}" + (f" + {method}" if pattern else "")) if structure else method
    record = {"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
              "checkpoint_gb": round(size / 1e9, 2), "load": load, "method": label,
              "pattern": pattern or ("none" if structure else "50%"),
              "calibration": f"{nsamples}x{seqlen}", "exit": done.returncode, "peak_rss_gb": round(peak / 1e9, 3),
              "wall_s": round(wall)}
    if done.returncode == 0:
        with open(os.path.join(out, "report.json")) as fh:
            report = json.load(fh)
        print("phases:", report["phases_seconds"])
        print("peak memory:", report["peak_memory"])
        estimate = report["memory_estimate"]["host_bytes"]
        print("estimate host:", round(estimate / 1e9, 2), "GB; sparsity", round(report["sparsity"], 4), "; load",
              report["load"])
        record["estimate_host_gb"] = round(estimate / 1e9, 3)
    if history:
        _record(history, record)


def _record(history: str, record: dict) -> None:
    """Append this run to the history (one JSON line per run) and compare it with the last run of the same
    checkpoint and settings at another commit, so that a regression in peak RSS shows."""
    key = ("checkpoint_gb", "load", "method", "pattern", "calibration")
    earlier = []
    if os.path.exists(history):
        with open(history, encoding="utf-8") as fh:
            earlier = [json.loads(line) for line in fh if line.strip()]
    same = [r for r in earlier if all(r.get(k) == record[k] for k in key) and r.get("exit") == 0]
    with open(history, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    print(f"recorded in {os.path.relpath(history)} (commit {record['commit']})")
    if same and record["exit"] == 0:
        last = same[-1]
        change = record["peak_rss_gb"] / last["peak_rss_gb"] - 1
        flag = "  <-- REGRESSION (more than 5%)" if change > 0.05 else ""
        print(f"peak RSS {record['peak_rss_gb']:.2f} GB against {last['peak_rss_gb']:.2f} GB at {last['commit']} "
              f"({change:+.1%}){flag}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("dir")
    p.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("run")
    p.add_argument("dir")
    p.add_argument("--load", default="stream", choices=("stream", "full"))
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--out", default=None)
    p.add_argument("--method", default="wanda")
    p.add_argument("--pattern", default=None, help="e.g. 2:4 (default: 50%% unstructured)")
    p.add_argument("--device", default="auto")
    p.add_argument("--structure", default=None, help="e.g. channels: structured removal (issue 16) instead of 50%%")
    p.add_argument("--remove", type=float, default=0.2, help="with --structure: the fraction of the blocks' parameters")
    p.add_argument("--history", default=os.path.join(ROOT, "benchmarks", "streaming-history.jsonl"),
                   help="append the run (commit, peak RSS, wall) to this JSON-lines file; '' for none")
    args = parser.parse_args()
    if args.command == "make":
        make(args.dir, args.shape, args.layers, args.seed)
    else:
        run(args.dir, args.load, args.nsamples, args.seqlen, args.out or args.dir.rstrip("/") + f"-pruned-{args.load}",
            args.method, args.pattern, args.device, args.history or None, args.structure, args.remove)


if __name__ == "__main__":
    main()
