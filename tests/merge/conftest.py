"""Tiny random checkpoints built with stock transformers configs (no downloads) for merge tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import (
    AutoModelForCausalLM, Gemma2Config, GemmaConfig, LlamaConfig, MistralConfig, Phi3Config, PretrainedConfig, Qwen2Config,
)

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64)

ARCH_CONFIGS: dict[str, Callable[..., PretrainedConfig]] = {
    "llama": lambda **kw: LlamaConfig(head_dim=16, **kw),
    "qwen2": lambda **kw: Qwen2Config(**kw),
    "mistral": lambda **kw: MistralConfig(head_dim=16, sliding_window=None, **kw),
    "gemma": lambda **kw: GemmaConfig(head_dim=16, **kw),
    "gemma2": lambda **kw: Gemma2Config(head_dim=16, **kw),
    "phi3": lambda **kw: Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw),
}


def tiny_config(arch: str = "llama", **kw: object) -> PretrainedConfig:
    kw.setdefault("tie_word_embeddings", False)
    return ARCH_CONFIGS[arch](**{**COMMON, **kw})


def save_model(folder: Path, config: PretrainedConfig, seed: int, *, dtype: torch.dtype = torch.float32,
               max_shard_size: str | None = None, noise_of: Path | None = None, noise: float = 0.02) -> Path:
    """A random model (or `noise_of`'s weights plus Gaussian noise: an 'expert') saved as an HF folder."""
    torch.manual_seed(seed)
    if noise_of is not None:
        model = AutoModelForCausalLM.from_pretrained(noise_of, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fp32 Llama base and three noisy experts (one saved sharded)."""
    root = tmp_path_factory.mktemp("llama_family")
    config = tiny_config("llama")
    base = save_model(root / "base", config, 0)
    return {
        "base": base,
        "a": save_model(root / "a", config, 1, noise_of=base),
        "b": save_model(root / "b", config, 2, noise_of=base, max_shard_size="20KB"),
        "c": save_model(root / "c", config, 3, noise_of=base),
    }


def save_lora(folder: Path, base: Path, seed: int, *, r: int = 4, alpha: int = 8, rslora: bool = False,
              targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B on `base`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def lora_family(tmp_path_factory: pytest.TempPathFactory, llama_family: dict[str, Path]) -> dict[str, Path]:
    """Two LoRA adapters of the same rank on the Llama base (one with rslora)."""
    root = tmp_path_factory.mktemp("lora_family")
    return {
        "la": save_lora(root / "la", llama_family["base"], 10),
        "lb": save_lora(root / "lb", llama_family["base"], 11, alpha=16, rslora=True),
    }


def assert_compiled_equals_eager(engines, recipe, *, exact: bool = False) -> None:
    """Apply ``recipe`` with a compiled engine and an eager one (that order) into fresh targets and
    check the compiled merge against the eager one: to the bit with equal stats when ``exact``, else
    within fp32 rounding (kernels may reorder sums), changed-entry counts within 2."""
    import pytest

    results = []
    for engine in engines:
        target = {n: torch.empty_like(engine.base_tensor(n)) for n in engine.layout.slots}
        results.append((target, engine.apply(recipe, target, stats=True)))
    (t_fused, s_fused), (t_eager, s_eager) = results
    for name in t_eager:
        if exact:
            assert torch.equal(t_fused[name], t_eager[name]), name
        else:
            torch.testing.assert_close(t_fused[name], t_eager[name], rtol=1e-6, atol=1e-7, msg=name)
    if exact:
        assert s_fused.changed_params == s_eager.changed_params
    else:
        assert abs(s_fused.changed_params - s_eager.changed_params) <= 2
    assert s_fused.l1_distance == pytest.approx(s_eager.l1_distance, rel=1e-6 if exact else 1e-5)
