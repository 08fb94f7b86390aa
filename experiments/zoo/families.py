"""The published architectures of the real-shaped fixtures, as data (no torch import).

Each entry copies the architecture fields of the named checkpoint's config.json; the builder
(``real_shapes.py``) cuts the depth and documents every other deviation in the manifest. Kept
apart from the builder so the command line can list the families without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class RealShape:
    """One published architecture: its config.json values and how the fixture cuts and trains it.

    ``config`` holds the architecture fields of the checkpoint's published config.json, verbatim
    (token ids are left out: they belong to the tokenizer, which here is the zoo's). ``deviations``
    are the fields set differently from the publication, each with its reason; the manifest records
    both.
    """

    family: str
    source: str
    model_type: str
    config: Mapping[str, Any]
    layers: int
    experts: tuple[str, ...]
    lora_skill: str
    features: str
    deviations: Mapping[str, Any] = field(default_factory=dict)
    deviation_reasons: Mapping[str, str] = field(default_factory=dict)


FAMILIES: dict[str, RealShape] = {
    "qwen2.5": RealShape(
        family="qwen2.5",
        source="Qwen/Qwen2.5-0.5B",
        model_type="qwen2",
        config={
            "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_act": "silu",
            "max_position_embeddings": 32768, "max_window_layers": 24, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False,
            "tie_word_embeddings": True, "vocab_size": 151936, "attention_dropout": 0.0,
            "initializer_range": 0.02,
        },
        layers=4,
        experts=("rev", "sort"),
        lora_skill="shift",
        features="GQA 14:2, q/k/v biases, tied embeddings, vocabulary 151,936",
    ),
    "llama3.2": RealShape(
        family="llama3.2",
        source="meta-llama/Llama-3.2-1B",
        model_type="llama",
        config={
            "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "silu",
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
            "tie_word_embeddings": True, "vocab_size": 128256, "attention_dropout": 0.0,
            "initializer_range": 0.02,
        },
        layers=2,
        experts=("rev", "sort"),
        lora_skill="shift",
        features="GQA 32:8, llama3 rope scaling (factor 32), tied embeddings, vocabulary 128,256",
    ),
    "mistral0.3": RealShape(
        family="mistral0.3",
        source="mistralai/Mistral-7B-v0.3",
        model_type="mistral",
        config={
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
            "sliding_window": None, "tie_word_embeddings": False, "vocab_size": 32768,
            "attention_dropout": 0.0, "initializer_range": 0.02,
        },
        layers=2,
        experts=("rev",),
        lora_skill="shift",
        features="GQA 32:8, sliding-window attention (4096), untied 32,768-row head, 14,336-wide MLP",
        deviations={"sliding_window": 4096},
        deviation_reasons={"sliding_window": "v0.3 publishes null (v0.2 dropped SWA); Mistral-7B-v0.1's "
                                             "4096 is set so the fixture exercises the sliding-window field"},
    ),
    "gemma2": RealShape(
        family="gemma2",
        source="google/gemma-2-2b",
        model_type="gemma2",
        config={
            "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
            "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 256, "sliding_window": 4096, "cache_implementation": "hybrid",
            "attention_bias": False, "tie_word_embeddings": True, "vocab_size": 256000,
            "attention_dropout": 0.0, "initializer_range": 0.02,
        },
        layers=2,
        experts=("rev",),
        lora_skill="shift",
        features="logit soft-capping (attention 50, final 30), alternating local (4096) / global layers, "
                 "head_dim 256, tied 256,000-row embedding",
    ),
}
