"""Model configs for the zoo's base: Llama by default, Qwen2 and Mistral variants.

The variants differ only where the real architectures differ (Qwen2 has q/k/v biases,
Mistral a sliding-window field), so code that claims to be architecture-agnostic is
exercised on real differences, not on renamed copies. Only stock transformers classes are
used: vLLM and ``AutoModelForCausalLM`` load the folders without custom code.
"""
from __future__ import annotations

from transformers import LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

from .sizes import ARCHS, ZooSize
from .tokenizer import BOS_ID, EOS_ID, MODEL_VOCAB_SIZE, PAD_ID


def make_config(arch: str, size: ZooSize, tie_word_embeddings: bool = False) -> PretrainedConfig:
    """A stock config for ``arch`` with the shape of ``size`` (head_dim = 32, >= vLLM's CPU minimum)."""
    common = dict(
        vocab_size=MODEL_VOCAB_SIZE,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        max_position_embeddings=size.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        hidden_act="silu",
        initializer_range=0.02,
        rope_theta=10000.0,
        dtype="float32",
    )
    head_dim = size.hidden_size // size.num_heads
    if head_dim < 32 or head_dim * size.num_heads != size.hidden_size:
        raise ValueError(f"head_dim must be an integer >= 32 (vLLM CPU attention), got {size.hidden_size}/{size.num_heads}")
    if arch == "llama":
        cfg = LlamaConfig(**common, attention_bias=False, mlp_bias=False, head_dim=head_dim)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common, use_sliding_window=False)
    elif arch == "mistral":
        cfg = MistralConfig(**common, sliding_window=None, head_dim=head_dim)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    return cfg
