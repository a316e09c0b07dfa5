"""Issue 28's evidence: the CPU kernels against torch and against a dense kernel of the same hand.

    python benchmarks/cpu_kernels.py                       # GEMV table + end to end, JSON under benchmarks/results/
    python benchmarks/cpu_kernels.py --no-e2e --iters 20   # the GEMV table only
    python benchmarks/cpu_kernels.py --callgrind           # + instruction counts (AVX2 and scalar paths)

1. The machine's read bandwidth (the kernels' own read loop, all threads) and the GEMV table: M = 1, 4, 8 on
   2048x8192, 8192x2048, 4096x4096, 14336x4096 (bf16 weights) for torch fp32, torch bf16, this project's
   dense kernel, bitmask 50/60/70% and 2:4, on this CPU's best path and on AVX2; interleaved in one
   process, weights rotated among copies larger than the caches, median of ``--iters``.
2. End to end decode tokens/s (batch 1, one step after 32 cached tokens, static cache) on a random Llama
   of a 1B model's width (Llama-3.2-1B's config: hidden 2048, MLP 8192, 16 layers, vocab 128256) and on
   the real SmolLM2-135M-Instruct in bf16: torch bf16, torch fp32, the dense kernel on the decoder's
   linears, and the sparse kernels at 50% unstructured (bitmask) and 2:4. The masks are magnitude masks
   (the speed does not depend on which weights are kept); the head, tied to the embeddings, stays dense.
   Beside the speeds: the cosine of each kernel variant's logits (a 16-token prompt) against the fp32 load
   of the same weights.
3. ``--callgrind``: ``valgrind --tool=callgrind`` instructions of each kernel function on 4096x4096, M = 1,
   one thread, from the standalone harness ``benchmarks/kernels/cpu_gemv.cpp`` (valgrind cannot run the
   AVX-512 path). Counts repeat exactly, whatever else the machine does.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, machine, save_result  # noqa: E402

from oneshot.kernels import cpu, sparsify  # noqa: E402
from oneshot.kernels.cpu_bench import SHAPES, decode_tokens_per_s, format_gemv, gemv_rows, read_bandwidth  # noqa: E402


def magnitude(model, pattern: str) -> None:
    """Zero the decoder linears' smallest weights in place: half of each row, or 2 of every 4."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
                continue
            w = module.weight
            a = w.abs().float()
            if pattern == "2:4":
                groups = a.reshape(w.shape[0], -1, 4)
                keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, -1).indices, True)
                keep = keep.reshape(w.shape)
            else:
                kth = a.kthvalue(w.shape[1] // 2, dim=1, keepdim=True).values
                keep = a > kth
            w.masked_fill_(~keep, 0.0)  # +0.0: a product with a mask would leave -0.0, which the formats keep


def decode_runs(model, iters: int, label: str) -> dict:
    """Decode tokens/s of one bf16 model and every variant made from it, timed interleaved (fp32 alone
    first: a second copy of the model in fp32 would not fit beside the others at 8B-class sizes)."""
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    reference = {}  # fp32 logits of the model each kernel variant computes (dense, or pruned by magnitude)
    runs = {"torch fp32": decode_tokens_per_s({"fp32": model.float()}, iters)["fp32"]}
    reference["dense kernel"] = reference["torch bf16"] = logits(model, prompt)  # torch bf16: the rounding of
    # bf16 activations alone, the floor every bf16 variant shares
    model.to(torch.bfloat16)  # bf16 -> fp32 -> bf16 is exact
    variants = {"torch bf16": model}
    variants["dense kernel"] = copy.deepcopy(model)
    sparsify(variants["dense kernel"], backend="cpu", kind="dense")
    for pattern, kind in (("50%", "bitmask"), ("2:4", "2:4")):
        pruned = copy.deepcopy(model)
        magnitude(pruned, pattern)
        reference[f"{kind} kernel {pattern}"] = reference[f"torch bf16 {pattern}"] = logits(pruned.float(), prompt)
        pruned.to(torch.bfloat16)
        variants[f"torch bf16 {pattern}"] = pruned  # the pruned model run dense: its zeros change nothing
        sparse = copy.deepcopy(pruned)
        if not sparsify(sparse, backend="cpu", kind=kind):
            raise SystemExit(f"{label}: no linear became a {kind} SparseLinear")
        variants[f"{kind} kernel {pattern}"] = sparse
    runs.update(decode_tokens_per_s(variants, iters))
    runs = {name: round(v, 3) for name, v in runs.items()}
    for name, v in runs.items():
        print(f"  {label} {name:<22} {v:8.3f} tok/s", flush=True)
    cosine = {name: round(float(F.cosine_similarity(logits(variants[name], prompt).flatten(), ref.flatten(), 0)), 6)
              for name, ref in reference.items()}
    print(f"  {label} logits cosine against the fp32 load: {cosine}", flush=True)
    return {"tokens_per_s": runs, "logits_cosine_vs_fp32": cosine}


def logits(model, prompt) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=prompt).logits.float()


def llama_1b():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64,
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def smollm2():
    from common import smollm2_bf16
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_bf16(), dtype=torch.bfloat16).eval()


def callgrind_counts() -> list[dict]:
    """Instructions of each kernel function (callgrind, one thread, 4096x4096, M = 1, 3 calls)."""
    binary = os.path.join(tempfile.mkdtemp(), "cpu_gemv")
    subprocess.run(["g++", "-O3", "-std=c++17", "-pthread", "-I", os.path.join(ROOT, "kernels", "csrc"),
                    os.path.join(ROOT, "benchmarks", "kernels", "cpu_gemv.cpp"), "-o", binary], check=True)
    rows = []
    for kind, sparsity in (("dense", 0.0), ("bitmask", 0.5), ("bitmask", 0.7), ("24", 0.5)):
        for isa in (1, 0):
            out = os.path.join(os.path.dirname(binary), f"cg.{kind}.{sparsity}.{isa}")
            subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary, kind, "4096", "4096",
                            str(sparsity), "1", "1", str(isa)], check=True, capture_output=True,
                           env={**os.environ, "CPU_GEMV_HOT": "1"})
            text = subprocess.run(["callgrind_annotate", out], check=True, capture_output=True, text=True).stdout
            total = 0  # every kernel function (the blocks of a path are their own functions where not inlined)
            for line in text.splitlines():
                match = re.match(r"\s*([\d,]+)\s.*oneshot_cpu::(?:dense|blocked)_(?:avx2|scalar)(?:_block)?<", line)
                if match:
                    total += int(match.group(1).replace(",", ""))
            rows.append({"kind": kind if kind != "24" else "2:4", "sparsity": sparsity,
                         "path": "avx2" if isa else "scalar",
                         "instructions_per_call": total // 3})  # 3 calls: 2 warm-up + 1 timed
    return rows


def markdown(result: dict) -> str:
    """The recorded run as the tables of benchmarks/RESULTS.md (µs, GB/s of the bytes read, speed against
    the fastest dense at that shape and M)."""
    cases = list(dict.fromkeys(r["case"] for r in result["gemv"]))
    out = [f"{result['machine']}; flags {' '.join(result['flags'])}; read bandwidth "
           f"{result['read_bandwidth_gbps']} GB/s (all threads)", ""]
    for m in sorted({r["M"] for r in result["gemv"]}):
        out += [f"M = {m}: µs / GB/s / × the fastest dense", "",
                "| N×K | " + " | ".join(cases) + " |", "|---" * (len(cases) + 1) + "|"]
        for n, k in dict.fromkeys((r["N"], r["K"]) for r in result["gemv"]):
            by = {r["case"]: r for r in result["gemv"] if (r["N"], r["K"], r["M"]) == (n, k, m)}
            out.append(f"| {n}×{k} | " + " | ".join(
                f"{by[c]['us']:.0f} / {by[c]['gbps']:.1f} / {by[c]['speedup']:.2f}×" for c in cases) + " |")
        out.append("")
    for r in result.get("callgrind", []):
        out.append(f"- callgrind {r['kind']} {r['sparsity']:.0%} {r['path']}: {r['instructions_per_call']:,} "
                   "instructions per call")
    for model, runs in result.get("decode", {}).items():
        speeds = runs.get("tokens_per_s", runs)  # runs before the cosine check hold the speeds alone
        out.append(f"- decode {model}: " + ", ".join(f"{k} {v:.2f}" for k, v in speeds.items()) + " tok/s")
        if "logits_cosine_vs_fp32" in runs:
            out.append(f"  logits cosine against the fp32 load: {runs['logits_cosine_vs_fp32']}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=40, help="timed calls per GEMV case (median)")
    ap.add_argument("--decode-iters", type=int, default=20, help="timed decode steps per variant (median)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--no-gemv", action="store_true", help="end to end only; keep the GEMV table of the last run")
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--callgrind", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--markdown", metavar="JSON", help="print a recorded run as markdown tables; measure nothing")
    args = ap.parse_args()
    if args.markdown:
        with open(args.markdown, encoding="utf-8") as fh:
            print(markdown(json.load(fh)))
        return 0
    torch.set_num_threads(args.threads)
    if cpu.build() is None:
        raise SystemExit(f"the CPU kernels are not built here: {cpu.build_error()}")
    result = {"machine": machine(), "cpu": cpu.cpu_name(), "flags": cpu.cpu_flags(), "best_path": cpu.isa_name(),
              "threads": args.threads, "torch": torch.__version__}
    print(f"{result['cpu']} ({' '.join(result['flags'])}), {args.threads} threads, best path {result['best_path']}")
    tag = re.sub(r"[^a-z0-9]+", "-", result["cpu"].lower()).strip("-")[:40]
    path = os.path.join(args.out, f"cpu-kernels-{tag}.json")
    if args.no_gemv:  # keep the table (and counts) of the last full run on this CPU
        with open(path, encoding="utf-8") as fh:
            last = json.load(fh)
        result.update({k: last[k] for k in ("read_bandwidth_gbps", "gemv", "callgrind") if k in last})
    else:
        result["read_bandwidth_gbps"] = round(read_bandwidth(), 2)
        rows = gemv_rows(SHAPES, (1, 4, 8), iters=args.iters, progress=lambda s: print("  gemv", s, flush=True))
        result["gemv"] = rows
        print(format_gemv(rows, result["read_bandwidth_gbps"]))
    if not args.no_e2e:
        result["decode"] = {"llama 1B width (random)": decode_runs(llama_1b(), args.decode_iters, "llama-1b")}
        if not args.no_smollm2:
            result["decode"]["SmolLM2-135M bf16"] = decode_runs(smollm2(), args.decode_iters, "smollm2")
    if args.callgrind:
        result["callgrind"] = callgrind_counts()
        for r in result["callgrind"]:
            print(f"  callgrind {r['kind']:<8} {r['sparsity']:.1f} {r['path']:<7} {r['instructions_per_call']:>12,}")
    save_result(path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
