"""Tiny random-initialised checkpoints, one per supported architecture, built from configs offline."""

from __future__ import annotations

import os
import random

import torch

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will what can more about up "
    "river castle music album storm season game army ship church king war city team song film road island"
).split()


def sample_text(n_words: int = 4000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + " .")
    return "\n".join(lines)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([sample_text()], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


COMMON = dict(vocab_size=384, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def tiny_config(arch: str):
    import transformers as tf

    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, **COMMON)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like, tie_word_embeddings=True)
    if arch == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=16)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if arch == "qwen3":
        return tf.Qwen3Config(**llama_like, head_dim=16)
    if arch == "gemma":
        return tf.GemmaConfig(**llama_like, head_dim=16)
    if arch == "gemma2":
        return tf.Gemma2Config(**llama_like, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                               layer_types=["sliding_attention", "full_attention"])
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**llama_like, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"])
    if arch == "phi3":
        return tf.Phi3Config(**llama_like)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=64, **COMMON)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=256, **COMMON)
    moe = dict(num_experts_per_tok=2, max_position_embeddings=256, **COMMON)
    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    if arch == "qwen2_moe":  # a shared expert with its gate
        return tf.Qwen2MoeConfig(**small, **moe, intermediate_size=128, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=64, num_experts=8)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**small, **moe, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                                 num_experts=8)
    if arch == "mixtral":
        return tf.MixtralConfig(**small, **moe, intermediate_size=64, num_local_experts=8)
    if arch == "gpt_oss":  # experts stored [E, in, out] with biases, interleaved gate/up
        return tf.GptOssConfig(**small, **moe, head_dim=16, intermediate_size=32, num_local_experts=8,
                               layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    if arch == "deepseek_v3":  # multi-head latent attention, a shared expert, a first dense layer, group routing
        return tf.DeepseekV3Config(**{**small, "num_hidden_layers": 3}, **moe, intermediate_size=128,
                                   moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                                   first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                                   qk_nope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1)
    if arch == "qwen3_next":  # hybrid: gated-delta-net linear attention and full attention layers
        return tf.Qwen3NextConfig(**{**small, "num_hidden_layers": 4}, **moe, head_dim=16, intermediate_size=64,
                                  moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
                                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                  linear_value_head_dim=16)
    if arch == "jamba":  # hybrid whose decoder list mixes layer classes (Mamba and attention), experts every 2nd
        return tf.JambaConfig(**{**small, "num_hidden_layers": 4}, **moe, intermediate_size=64, num_experts=4,
                              expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
                              mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=384,
                             bos_token_id=1, eos_token_id=2)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "opt", "gpt_neox", "gpt2"]
MOE_ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "qwen3_next", "jamba"]


def make_tiny_model(arch: str, directory: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    with torch.no_grad():  # larger-than-default weights so layers do visible work (experts' fused ones too)
        for name, p in model.named_parameters():
            if p.dim() in (2, 3) and "conv" not in name and "A_log" not in name:
                p.normal_(0, 0.08)
    model = model.to(dtype)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


def make_sharded_llama(directory: str, layers: int = 6, hidden: int = 128, dtype: torch.dtype = torch.bfloat16,
                       max_shard_size: str = "300KB", seed: int = 0) -> str:
    """A random Llama checkpoint with several decoder layers, saved as sharded safetensors (an index
    and several shards), untied head: what streaming reads."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            tie_word_embeddings=False, **COMMON)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model = model.to(dtype)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    make_tokenizer().save_pretrained(directory)
    return directory


def fail_after_first_layer(monkeypatch):
    """Make a run fail once its first pruned layer is done (and journaled); returns the error class."""
    import oneshot.run as run_module
    from oneshot.errors import OneshotError

    original = run_module.Run._layer_done

    def fail_after_first(self, i, layer, state):
        original(self, i, layer, state)
        if i == 0:
            raise OneshotError("injected failure after layer 0")

    monkeypatch.setattr(run_module.Run, "_layer_done", fail_after_first)
    return OneshotError


def expert_statistics(layer, call, mode: str):
    """One statistics pass of ``layer`` (prefix ``L``) through ``call()``, as the engine gathers it with
    ``--moe-calibrate MODE``; returns (the pruner with its statistics, the routing record, the output)."""
    from oneshot.constraint import Constraint
    from oneshot.engine.layer import LayerPruner
    from oneshot.model.experts import ExpertRouting
    from oneshot.model.structure import find_linears
    from oneshot.solvers import SOLVERS

    linears = find_linears(layer, "L")
    pruner = LayerPruner(linears, SOLVERS["sparsegpt"], Constraint(0.5), {}, 1, torch.device("cpu"), 0)
    with pruner, ExpertRouting(layer, "L", linears) as routing, torch.no_grad():
        routing.record, routing.quiet, routing.all_tokens = True, pruner.paused, mode == "all"
        with pruner.collecting():
            pruner.start_batch(0)
            out = call()
        pruner.stats.close()
    return pruner, routing, out
