"""The production peer, llmcompressor, on the same model, calibration windows and perplexity protocol.

Run it with a Python that has llmcompressor installed (it pins its own transformers), e.g.
    python -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.13.0 && /tmp/peer/bin/pip install llmcompressor gguf
    /tmp/peer/bin/python benchmarks/peer_llmcompressor.py --method sparsegpt --pattern 0:0
It prints one JSON line: method, pattern, prune seconds (the oneshot() call), perplexity, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

# appended, not first: this repository's kernels/ would shadow the `kernels` package transformers imports
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import TEST, VALID, smollm2_bf16, smollm2_gguf  # noqa: E402
from oneshot.calibration import load_calibration  # noqa: E402
from oneshot.evaluate import perplexity, tokenize_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=("sparsegpt", "wanda"), required=True)
    ap.add_argument("--pattern", default="0:0", help="0:0 = unstructured, or 2:4")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--model", default="gguf", choices=("gguf", "bf16"),
                    help="gguf: the float32 GGUF (earlier runs); bf16: the bfloat16 checkpoint, pruned in bf16 as "
                         "llmcompressor runs it, evaluated in float32 as quality.py evaluates every output")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model == "bf16":
        plain = smollm2_bf16()
        tokenizer = AutoTokenizer.from_pretrained(plain)
    else:
        gguf = smollm2_gguf()
        folder, name = os.path.split(gguf)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="auto")
        # llmcompressor re-reads the config from the model's path, which a GGUF folder lacks: give it a plain copy
        plain = tempfile.mkdtemp(prefix="smollm2-hf-")
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(plain)
        tokenizer.save_pretrained(plain)
    model = AutoModelForCausalLM.from_pretrained(plain, dtype="auto")
    calib = load_calibration(VALID, tokenizer, args.nsamples, args.seqlen, 0)
    ids = calib.input_ids.tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    cls = SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier
    sparsity = 0.5 if args.pattern != "0:0" else args.sparsity
    recipe = cls(sparsity=sparsity, mask_structure=args.pattern, targets=["Linear"], ignore=["re:.*lm_head"])
    t = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=args.nsamples,
            max_seq_length=args.seqlen, pipeline="sequential", shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t
    model.float().eval()  # a bf16 model upcast exactly, evaluated as quality.py evaluates every output
    tokens = tokenize_text(tokenizer, open(TEST, encoding="utf-8").read())
    ppl = perplexity(model, tokens, args.eval_seqlen, args.eval_windows)["perplexity"]
    zeros = total = 0
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers" in n:
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    print(json.dumps({
        "tool": "llmcompressor", "method": args.method,
        "pattern": "unstructured" if args.pattern == "0:0" else args.pattern,
        "prune_seconds": round(seconds, 1), "perplexity": round(ppl, 3), "sparsity": zeros / total,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }))


if __name__ == "__main__":
    main()
