"""Issue 14 bar: a Qwen3-30B-A3B-shape mixture of experts, streamed, on this CPU.

    python benchmarks/moe.py make /tmp/q3moe   # 3 decoder layers, ~5 GB of bf16 shards
    python benchmarks/moe.py run /tmp/q3moe    # SparseGPT 50%, Wanda 2:4, SparseGPT 50% + --remove-experts 0.5

``make`` writes a random checkpoint with Qwen3-30B-A3B's real sizes (hidden 2048, 128 experts of
width 768, top-8, 32 query / 4 key-value heads of 128, vocabulary 151936, untied head) and a few
decoder layers, shard by shard (never the whole model in memory), in the hub's per-expert layout
(``mlp.experts.E.gate_proj.weight``…) that transformers 5 fuses when it loads: oneshot streams it by
assembling each fused parameter from those tensors. ``run`` prunes it in a child process per
configuration (calibration: the shared WikiText-2 validation text, ``--nsamples`` x ``--seqlen``, every
token through every expert for the statistics) and prints peak RSS (``getrusage`` of that child), wall
time, seconds per layer and per phase, the time extrapolated to the model's 48 layers, and the output's
size. Results: benchmarks/RESULTS.md, "Mixture of experts".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("ONESHOT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
FULL_LAYERS = 48

QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     vocab_size=151936, max_position_embeddings=40960, norm_topk_prob=True,
                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

RUNS = {
    "sparsegpt-50": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "wanda-2of4": ["--method", "wanda", "--pattern", "2:4"],
    "sparsegpt-50-remove-0.5": ["--method", "sparsegpt", "--sparsity", "0.5", "--remove-experts", "0.5"],
}


def make(directory: str, layers: int, seed: int) -> None:
    import torch
    import transformers as tf
    from accelerate import init_empty_weights
    from transformers.core_model_loading import revert_weight_conversion

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    from benchmarks.common import write_random_shards
    from tiny import make_tokenizer

    config = tf.Qwen3MoeConfig(dtype="bfloat16", num_hidden_layers=layers, **QWEN3_30B_A3B)
    with init_empty_weights():
        skeleton = tf.AutoModelForCausalLM.from_config(config)
    meta = {n: torch.empty(p.shape, device="meta") for n, p in skeleton.named_parameters()}
    shapes = {k: tuple(v.shape) for k, v in revert_weight_conversion(skeleton, meta).items()}  # the hub's names
    total = write_random_shards(directory, shapes, layers, seed)
    config.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    print(f"{directory}: {total / 1e9:.2f} GB of bf16 weights, {layers} layers of Qwen3-30B-A3B's shape")


def _bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if n.endswith(".safetensors"))


def run_one(directory: str, label: str, extra: list[str], nsamples: int, seqlen: int, keep: bool) -> dict:
    calib = os.path.join(SHARED, "data", "wikitext-2", "wiki.valid.tokens")
    out = directory.rstrip("/") + f"-{label}"
    if os.path.exists(out):
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "oneshot", "prune", directory, *extra, "--calib", calib, "--nsamples", str(nsamples),
           "--seqlen", str(seqlen), "--load", "stream", "--out", out, "--quiet"]
    print(" ".join(cmd), flush=True)
    # a fresh parent per run, so that getrusage(RUSAGE_CHILDREN) is this run's peak alone
    probe = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
             "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, rc)")
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, *cmd], env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    sys.stderr.write(done.stderr[-3000:])
    peak, rc = [int(x) for x in done.stdout.split("PEAK")[-1].split()]
    result = {"label": label, "args": extra, "exit": rc, "peak_rss_bytes": peak, "wall_seconds": round(wall, 1)}
    if rc == 0:
        with open(os.path.join(out, "report.json")) as fh:
            report = json.load(fh)
        layers, phases = report["num_layers"], report["phases_seconds"]
        per_layer = (phases.get("prune_and_propagate", 0) + phases.get("expert_removal", 0)) / layers
        fixed = report["seconds"] - per_layer * layers
        result.update({
            "layers": layers, "seconds": report["seconds"], "seconds_per_layer": round(per_layer, 1),
            "extrapolated_48_layers_seconds": round(fixed + per_layer * FULL_LAYERS),
            "phases_seconds": phases, "sparsity": report["sparsity"], "coverage": {
                k: report["coverage"][k] for k in ("share_of_block_matrices", "share_of_prunable",
                                                   "kept_dense_by_reason")},
            "source_bytes": _bytes(directory), "output_bytes": _bytes(out),
            "parameters": report["total_parameters"], "experts": report.get("experts"),
            "memory_estimate_host_bytes": report["memory_estimate"]["host_bytes"],
        })
        verify = subprocess.run([sys.executable, "-m", "oneshot", "verify", out],
                                env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
        result["verify"] = (verify.stdout.strip().splitlines() or ["?"])[-1]
    if not keep and os.path.exists(out):
        shutil.rmtree(out)  # the disk holds the source and one output at a time
    print(json.dumps(result, indent=1), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("dir")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("run")
    p.add_argument("dir")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--keep", action="store_true", help="keep the outputs (each is as large as the source)")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "out", "moe.json"))
    args = parser.parse_args()
    if args.command == "make":
        make(args.dir, args.layers, args.seed)
        return
    labels = args.only.split(",") if args.only else list(RUNS)
    results = [run_one(args.dir, label, RUNS[label], args.nsamples, args.seqlen, args.keep) for label in labels]
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
