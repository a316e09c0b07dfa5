"""Layouts beyond the catalogue of tiny.py, built here: a model whose forward reads attributes of its
layer objects, layers that return tuples, state carried from layer to layer, layers called more than
once, router state in a router's submodule, a forward that fails, expert containers that take only their
rows (Llama 4) or call a parent class's forward (Ergo). Each prunes with coverage 1.000 or is
refused in one line."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from oneshot import prune
from oneshot.errors import OneshotError
from tiny import COMMON, expert_statistics

ARGS = dict(method="sparsegpt", sparsity=0.5, progress=False)


def _config(layers: int = 2):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, **COMMON)


def _windows():
    return torch.randint(4, 384, (4, 32), generator=torch.Generator().manual_seed(0))


class TupleLayer(LlamaDecoderLayer):
    def forward(self, hidden_states, state=None, **kwargs):
        return super().forward(hidden_states, **kwargs), None


class OwnLoopModel(LlamaModel):
    """A decoder loop written out, as hybrids write theirs: ``order`` says which layers run; the model
    unpacks each layer's (hidden states, attention weights) and drops the weights."""

    order = None

    def _begin(self, input_ids, attention_mask):
        h = self.embed_tokens(input_ids)
        pos = torch.arange(h.shape[1], device=h.device)[None]
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask, cache=None,
                                  position_ids=pos)
        return h, dict(attention_mask=mask, position_embeddings=self.rotary_emb(h, pos), position_ids=pos)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        h, common = self._begin(input_ids, attention_mask)
        for i in self.order or range(len(self.layers)):
            decoder_layer = self.layers[i]
            h, attn_weights = decoder_layer(h, **common)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h))


class CarryModel(OwnLoopModel):
    """The second value each layer returns goes into the next layer (a DSA indexer's top-k, a router's state)."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        h, common = self._begin(input_ids, attention_mask)
        state = None
        for decoder_layer in self.layers:
            h, state = decoder_layer(h, state=state, **common)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h))


def _own_loop(layers=2, order=None, carry=False):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(layers))
    inner = (CarryModel if carry else OwnLoopModel)(model.config)
    inner.layers = torch.nn.ModuleList(TupleLayer(model.config, i) for i in range(layers))
    inner.order = order
    model.model = inner
    return model


def test_a_forward_that_reads_its_layer_objects_prunes():
    """Hybrids pick each layer's mask by an attribute of the layer (``decoder_layer.attention_type``): the
    capture keeps the layer objects in place, so the attribute is there."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config())
    for layer in model.model.layers:
        layer.block_type = "attention"
    original = model.model.forward

    def forward(*args, **kwargs):
        assert {layer.block_type for layer in model.model.layers} == {"attention"}
        return original(*args, **kwargs)

    model.model.forward = forward
    result = prune(model, calibration=_windows(), **ARGS)
    assert result.report["coverage"]["share_of_prunable"] == 1.0
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)  # the capture's stand-in is gone
    assert all(float((lin.weight == 0).float().mean()) == 0.5 for lin in model.model.layers[1].mlp.children()
               if isinstance(lin, torch.nn.Linear))


def test_layers_that_return_a_tuple_the_model_unpacks():
    model = _own_loop()
    result = prune(model, calibration=_windows(), **ARGS)
    assert result.report["coverage"]["share_of_prunable"] == 1.0
    assert len(result.report["linears"]) == 2 * 7


def test_state_carried_from_layer_to_layer_is_refused_in_one_line():
    with pytest.raises(OneshotError) as err:
        prune(_own_loop(carry=True), calibration=_windows(), **ARGS)
    message = str(err.value)
    assert "hands state to the next layer" in message and "(h, state)" in message and "CarryModel" in message
    assert "\n" not in message


def test_layers_called_more_than_once_are_refused_in_one_line():
    with pytest.raises(OneshotError) as err:
        prune(_own_loop(layers=3, order=[0, 1, 0, 1, 2]), calibration=_windows(), **ARGS)
    assert "called in the order [0, 1, 0, 1, 2]" in str(err.value) and "\n" not in str(err.value)


def test_a_forward_that_fails_before_the_layers_is_one_line():
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config())

    def broken(ids):
        raise RuntimeError("the embedding is broken\nsecond line")

    model.model.embed_tokens.forward = broken
    with pytest.raises(OneshotError) as err:
        prune(model, calibration=_windows(), **ARGS)
    assert "its forward failed on the calibration windows before decoder layer 0" in str(err.value)
    assert "RuntimeError: the embedding is broken" in str(err.value) and "\n" not in str(err.value)


def test_router_state_in_a_routers_submodule_is_router_state():
    """Ernie 4.5 MoE keeps its score-correction bias in ``gate.moe_statics``: a router's part, kept dense."""
    import transformers as tf

    config = tf.Ernie4_5_MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   moe_num_experts=8, moe_k=2, moe_layer_start_index=0,
                                   max_position_embeddings=256, **COMMON)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    assert any("moe_statics" in name for name, _ in model.named_parameters())
    result = prune(model, calibration=_windows(), **ARGS)
    coverage = result.report["coverage"]
    assert coverage["share_of_prunable"] == 1.0
    assert any("moe_statics" in k["name"] and k["reason"] == "router" for k in coverage["kept_dense"]), coverage


def _llama4():
    import transformers as tf

    config = tf.Llama4TextConfig(hidden_size=64, intermediate_size=48, intermediate_size_mlp=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 num_local_experts=4, num_experts_per_tok=1, max_position_embeddings=256,
                                 interleave_moe_layer_step=1, **COMMON)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    for p in model.parameters():  # the experts' parameters start at zero and empty: give them values
        torch.nn.init.normal_(p, std=0.05) if p.dim() == 3 else None
    return model


@pytest.mark.parametrize("mode", ["routed", "all"])
def test_experts_that_take_only_their_rows_see_each_experts_tokens(mode):
    """Llama 4's experts get [E·T, H]: every token once per expert, scaled by its router weight, zero where
    the router did not send it, and run one ``bmm``. Each expert's statistics come from its own rows."""
    layer = _llama4().model.layers[0]
    moe = layer.feed_forward
    x = torch.randn(40, 64)
    with torch.no_grad():
        scores, _ = moe.router(x)
        reference = moe(x)[0]
        routed = (x.repeat(4, 1) * scores.t().reshape(-1, 1)).reshape(4, 40, 64)
    pruner, routing, out = expert_statistics(layer, lambda: moe(x)[0], mode)
    assert torch.allclose(out, reference, atol=1e-5), "the block's output keeps the real routing"
    live = routed.abs().amax(-1) > 0
    every = routed[live]
    for e in range(4):
        xs = routed[e][live[e]] if mode == "routed" else every
        st = pruner.stats.stats[f"L.feed_forward.experts.{e}.gate_up_proj"]
        assert st.tokens == xs.shape[0] and torch.allclose(st.hessian, xs.t() @ xs, atol=1e-4)
        gate, up = (xs @ moe.experts.gate_up_proj[e]).chunk(2, dim=-1)
        h = up * torch.nn.functional.silu(gate)
        down = pruner.stats.stats[f"L.feed_forward.experts.{e}.down_proj"]
        assert torch.allclose(down.hessian, h.t() @ h, atol=1e-4)
        assert int(routing.blocks["L.feed_forward.experts"].routed[e]) == int(live[e].sum())


def test_llama4_experts_prune_exactly_and_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _llama4()
    result = prune(model, calibration=_windows(), out=str(tmp_path / "out"), **ARGS)
    assert result.report["coverage"]["share_of_prunable"] == 1.0
    experts = model.model.layers[0].feed_forward.experts
    for name in ("gate_up_proj", "down_proj"):
        for e in range(4):  # stored [in, out]: 50% of each expert's [out, in] rows, exactly
            w = getattr(experts, name)[e].t()
            assert ((w == 0).sum(1) == w.shape[1] // 2).all(), (name, e)
    with pytest.raises(OneshotError, match="--expert-score frequency"):
        prune(_llama4(), calibration=_windows(), remove_experts=0.5, **ARGS)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids = _windows()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_experts_whose_forward_calls_its_parents_forward(tmp_path):
    """Ergo's experts call ``super().forward`` of a class under transformers' implementation dispatch, and
    its checkpoints name (and transpose) its matrices otherwise than the model: the sidecar lists every
    pruned matrix as written, and the sparse load runs them."""
    import json

    import transformers as tf

    import oneshot

    config = tf.AutoConfig.for_model("ergo", hidden_size=64, first_dense_intermediate_size=128,
                                     moe_intermediate_size=32, shared_intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     num_experts=8, num_experts_per_tok=2, max_position_embeddings=256, **COMMON)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    out = str(tmp_path / "out")
    result = prune(model, calibration=_windows(), out=out, format="bitmask", **ARGS)
    assert result.report["coverage"]["share_of_prunable"] == 1.0
    experts = [e for e in result.report["linears"] if ".experts." in e["name"]]
    assert len(experts) == 2 * 8 and all(e["sparsity"] == 0.5 for e in experts), experts
    written = json.load(open(f"{out}/oneshot_sparsity.json"))["layers"]
    assert len(written) == len(result.report["linears"]) and "layers.0.attention.wqkv" in written, sorted(written)
    assert all(entry["sparsity"] == 0.5 for entry in written.values())
    plain, fast = oneshot.load(out), oneshot.load(out, kernels="cpu")
    ids = _windows()
    with torch.no_grad():
        assert torch.allclose(fast(ids).logits, plain(ids).logits, atol=1e-4)
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)


def test_a_loop_that_indexes_each_layers_result():
    """GPT-Neo's loop reads ``outputs = block(...)`` then ``hidden_states = outputs[0]``: the capture's
    stand-in must return a tuple there, or each layer would get the first window of the one before."""
    import transformers as tf

    config = tf.GPTNeoConfig(hidden_size=64, num_layers=6, num_heads=4, attention_types=[[["global", "local"], 3]],
                             max_position_embeddings=256, window_size=16, **COMMON)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    result = prune(model, calibration=_windows(), **ARGS)
    assert result.report["coverage"]["share_of_prunable"] == 1.0 and len(result.report["linears"]) == 6 * 6


def test_a_per_layer_config_gives_its_largest_head_count():
    """dots3's heterogeneous config refuses a global ``num_attention_heads`` read (memory planning)."""
    import transformers as tf

    from oneshot.engine.batching import attention_heads

    config = tf.AutoConfig.for_model("dots3_note_text")
    with pytest.raises(Exception, match="per-layer attribute"):
        config.num_attention_heads  # noqa: B018
    layers = range(config.num_hidden_layers)
    assert attention_heads(config) == max(config.per_layer_config[i].num_attention_heads for i in layers)
