"""Issue 6 bar: prune a checkpoint bigger than memory allows, streaming, and measure peak RSS.

    python benchmarks/streaming.py make /tmp/big            # ~8.8 GB bf16 Llama, 42 layers, sharded
    python benchmarks/streaming.py run /tmp/big --load stream
    python benchmarks/streaming.py run /tmp/big --load full
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


def run(directory: str, load: str, nsamples: int, seqlen: int, out: str, method: str, pattern: str | None,
        device: str) -> None:
    calib = os.path.join(SHARED, "data", "wikitext-2", "wiki.valid.tokens")
    if os.path.exists(out):
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "oneshot", "prune", directory, "--method", method,
           *(["--pattern", pattern] if pattern else ["--sparsity", "0.5"]), "--device", device,
           "--calib", calib, "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--load", load, "--out", out,
           "--quiet", "--no-memory-check"]
    print(" ".join(cmd), flush=True)
    t = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": ROOT})
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    size = sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if n.endswith(".safetensors"))
    print(f"exit {done.returncode}; checkpoint {size / 1e9:.2f} GB; peak RSS {peak / 1e9:.2f} GB "
          f"({peak / 2**30:.2f} GiB); wall {wall:.0f} s")
    if done.returncode == 0:
        with open(os.path.join(out, "report.json")) as fh:
            report = json.load(fh)
        print("phases:", report["phases_seconds"])
        print("peak memory:", report["peak_memory"])
        print("estimate host:", round(report["memory_estimate"]["host_bytes"] / 1e9, 2), "GB; sparsity",
              round(report["sparsity"], 4), "; load", report["load"])


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
    args = parser.parse_args()
    if args.command == "make":
        make(args.dir, args.shape, args.layers, args.seed)
    else:
        run(args.dir, args.load, args.nsamples, args.seqlen, args.out or args.dir.rstrip("/") + f"-pruned-{args.load}",
            args.method, args.pattern, args.device)


if __name__ == "__main__":
    main()
