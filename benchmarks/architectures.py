"""Every causal-LM model type transformers registers, shrunk to a tiny random model (common size keys
set small where the config has them), pruned in memory with Wanda 50%: one JSON line per type, with
``ok`` (coverage, and the written output reloads with transformers to the pruned model's logits),
``refused`` (oneshot's one line), ``build-fail`` (transformers could not build it, or its own forward
fails, at these sizes), ``too-big`` (over the children's 8 GiB while pruning or reloading: defaults this
shrinking leaves large), ``reload-differs`` or ``TRACEBACK``.

    python benchmarks/architectures.py               # all types, one subprocess each (90 s, 8 GiB)
    python benchmarks/architectures.py llama bamba   # these, in this process
    python benchmarks/architectures.py --after fuyu  # the types after this one
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import oneshot
from oneshot.errors import OneshotError
from tiny import make_tokenizer, sample_text

SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=384, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
    n_routed_experts=8, num_local_experts=8, num_experts_per_tok=2, head_dim=16, max_position_embeddings=256,
    n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
    v_head_dim=16, first_k_dense_replace=1, bos_token_id=1, eos_token_id=2, pad_token_id=3, n_shared_experts=1,
)
tok = make_tokenizer()
ids = tok(sample_text(3000, 1), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
windows = torch.stack([ids[i * 32:(i + 1) * 32] for i in range(4)])


def small(d: dict) -> dict:
    """The SMALL sizes this config has, kept consistent: MLA's rotary head is the head size its rotary
    table uses; DSA indexers get as many heads as attention; per-layer lists keep one layer of each kind."""
    mapped = {} if d.get("is_encoder_decoder") else d.get("attribute_map", {})  # (BART's maps to its encoder)
    kw = {k: v for k, v in SMALL.items() if k in d or k in mapped}
    if "qk_rope_head_dim" in kw and "head_dim" in kw:
        kw["head_dim"] = kw["qk_rope_head_dim"]
    if "kv_lora_rank" in kw and "num_key_value_heads" in kw:  # MLA: keys and values for every query head
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    for key, value in (("index_n_heads", 4), ("index_head_dim", 16), ("first_dense_intermediate_size", 128),
                       ("shared_intermediate_size", 32), ("intermediate_size_mlp", 128),
                       ("num_experts_per_token", 2), ("num_expert_group", 2), ("attn_layer_period", 2),
                       ("attn_layer_offset", 1), ("attn_layer_indices", [1]), ("d_head", 16)):
        if key in d:
            kw[key] = value
    for key in ("layer_types", "mlp_layer_types"):
        if isinstance(d.get(key), list) and d[key]:
            kinds = list(dict.fromkeys(d[key]))
            kw["num_hidden_layers"] = max(kw.get("num_hidden_layers", 2), len(kinds))
    for key in ("layer_types", "mlp_layer_types"):
        if isinstance(d.get(key), list) and d[key]:
            kinds = list(dict.fromkeys(d[key]))
            kw[key] = (kinds * kw["num_hidden_layers"])[: kw["num_hidden_layers"]]
    if "attention_types" in d:  # GPT-Neo: the layer pattern must add up to the layer count
        kw["attention_types"] = [[["global", "local"], kw.get("num_hidden_layers", 2) // 2]]
    return kw


def one(mt):
    try:
        base = AutoConfig.for_model(mt)
        cfg = AutoConfig.for_model(mt, **small({**base.to_dict(), "attribute_map": getattr(base, "attribute_map", {})}))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            dense = model(windows).logits
    except Exception as e:
        return "build-fail", f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
    try:
        with tempfile.TemporaryDirectory() as out:
            r = oneshot.prune(model, calibration=windows, method="wanda", sparsity=0.5, progress=False, out=out)
            with torch.no_grad():
                pruned = model(windows).logits
                back = AutoModelForCausalLM.from_pretrained(out).eval()(windows).logits
        if torch.equal(pruned, dense) or not torch.allclose(back, pruned, atol=1e-4, rtol=1e-4):
            return "reload-differs", float((back - pruned).abs().max())
        return "ok", r.report["coverage"]["share_of_prunable"]
    except OneshotError as e:
        return "refused", str(e)[:300]
    except Exception as e:
        if isinstance(e, MemoryError) or "allocate memory" in str(e):
            return "too-big", f"{type(e).__name__}: {str(e)[:150]} (the sweep's 8 GiB limit: defaults stay large)"
        tb = traceback.format_exc().splitlines()
        where = [line for line in tb if "File" in line][-1].strip()[:200]
        return "TRACEBACK", f"{type(e).__name__}: {str(e)[:200]} @ {where}"


def limit_memory(gib: int = 8) -> None:
    """A child's address space: a type whose defaults stay huge at these sizes fails to build, and
    cannot push the machine into swap or kill its neighbours."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (gib << 30, gib << 30))


if __name__ == "__main__":
    after = sys.argv.pop(1 + sys.argv.index("--after")) if "--after" in sys.argv else ""
    sys.argv = [a for a in sys.argv if a != "--after"]
    if len(sys.argv) > 1:
        for mt in sys.argv[1:]:
            t = time.time()
            s, why = one(mt)
            print(json.dumps({"type": mt, "status": s, "why": why, "s": round(time.time() - t, 1)}), flush=True)
    else:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        for mt in sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t > after):
            try:
                out = subprocess.run([sys.executable, __file__, mt], capture_output=True, text=True, timeout=90,
                                     preexec_fn=limit_memory).stdout
                line = next((x for x in out.splitlines() if x.startswith("{")), None)
            except subprocess.TimeoutExpired:
                line = None
            print(line or json.dumps({"type": mt, "status": "timeout-or-crash"}), flush=True)
