"""Layouts beyond the catalogue of tiny.py, built here: a model whose forward reads attributes of its
layer objects, layers that return tuples, state carried from layer to layer, layers called more than
once, router state in a router's submodule, a forward that fails. Each prunes with coverage 1.000 or is
refused in one line."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from oneshot import prune
from oneshot.errors import OneshotError
from tiny import COMMON

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
