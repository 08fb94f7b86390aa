"""Tensor grouping from config + names for five decoder architectures (tiny random configs)."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from evomerge.merge import ModelLayout, TensorSlot, classify

from .conftest import tiny_config

SPECIFIC = {
    "llama": {"model.layers.2.self_attn.o_proj.weight": TensorSlot(2, "attention"),
              "model.layers.0.mlp.gate_proj.weight": TensorSlot(0, "mlp")},
    "qwen2": {"model.layers.1.self_attn.q_proj.bias": TensorSlot(1, "attention")},
    "mistral": {"model.layers.1.post_attention_layernorm.weight": TensorSlot(1, "norm")},
    "gemma2": {"model.layers.0.pre_feedforward_layernorm.weight": TensorSlot(0, "norm"),
               "model.layers.2.post_feedforward_layernorm.weight": TensorSlot(2, "norm")},
    "phi3": {"model.layers.1.self_attn.qkv_proj.weight": TensorSlot(1, "attention"),
             "model.layers.1.mlp.gate_up_proj.weight": TensorSlot(1, "mlp")},
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "gemma2", "phi3"])
def test_layout_groups_every_tensor_by_layer_and_kind(arch: str) -> None:
    config = tiny_config(arch)
    model = AutoModelForCausalLM.from_config(config)
    layout = ModelLayout.from_names(model.state_dict().keys(), config.to_dict())
    assert layout.num_layers == 3
    assert layout.slots["model.embed_tokens.weight"] == TensorSlot("embed", "embedding")
    assert layout.slots["model.norm.weight"] == TensorSlot("final_norm", "norm")
    assert layout.slots["lm_head.weight"] == TensorSlot("head", "head")
    assert layout.kinds == {"attention", "mlp", "norm", "embedding", "head"}
    for layer in range(3):
        kinds = {s.kind for s in layout.slots.values() if s.layer == layer}
        assert kinds == {"attention", "mlp", "norm"}, (arch, layer, kinds)
    for name, slot in SPECIFIC.get(arch, {}).items():
        assert layout.slots[name] == slot


def test_other_naming_schemes_and_unknown_modules() -> None:
    assert classify("transformer.h.11.attn.c_attn.weight") == TensorSlot(11, "attention")
    assert classify("transformer.h.3.mlp.c_proj.weight") == TensorSlot(3, "mlp")
    assert classify("transformer.h.3.ln_1.weight") == TensorSlot(3, "norm")
    assert classify("transformer.wte.weight") == TensorSlot("embed", "embedding")
    assert classify("transformer.ln_f.weight") == TensorSlot("final_norm", "norm")
    assert classify("model.rotary_emb.inv_freq") == TensorSlot(None, "other")


def test_layer_count_must_cover_the_names() -> None:
    with pytest.raises(ValueError, match="reach layer 4 but the config declares 2"):
        ModelLayout.from_names(["model.layers.4.mlp.up_proj.weight"], {"num_hidden_layers": 2})
