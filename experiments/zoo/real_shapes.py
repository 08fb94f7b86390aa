"""Real-shaped fixtures: published architectures, random weights, cut to a few layers, built offline.

The toy zoo (0.8M parameters, 64-token vocabulary) cannot show what users' checkpoints do to the
loader, the merge engine and the scorers: a 151,936-row tied embedding, grouped-query attention,
llama3 rope scaling, sliding windows, Gemma-2's logit soft-capping and alternating local/global
layers, bf16 weights in several shards. These fixtures have exactly those properties. Each one is:

- ``base/``: a model of the family's PUBLISHED config (the values below are copied from the
  config.json of the named checkpoint) with ``num_hidden_layers`` cut to a few layers, random
  initialisation (transformers' own ``_init_weights``, seeded), saved in bf16 as sharded
  safetensors with an index, plus a tokenizer whose length is the published vocabulary size
  (the zoo's character tokenizer padded with reserved entries; it loads with ``AutoTokenizer``);
- ``experts/<skill>/``: full fine-tunes of the base, a few AdamW steps on one toy-zoo skill
  (``skills.py``): the attention projections and the MLP ``down_proj`` of every decoder layer
  are trained, embeddings, norms and the MLP gate/up projections stay frozen, so an expert's task
  vector is the structured update of an optimiser, not noise, and building stays within a few GiB
  (Mistral's two layers hold 436M parameters; AdamW over all of them would need ~8 GiB);
- ``adapters/<skill>-lora/``: one PEFT LoRA adapter (rank 8 on q/k/v/o/gate/up/down) trained the
  same way on another skill;
- ``data/<skill>/{calib,test}.jsonl``: tiny calibration and held-out sets of each skill.

Training runs in float32 on one copy of the model, which starts from the base exactly as saved in
bf16 (the trained tensors are restored from a copy between experts); every folder is saved in bf16. Fine-tuned weights move by about the
learning rate per step (AdamW), far above bf16's resolution, so the saved experts differ from
the base on every trained tensor. The models are random: their outputs are not meaningful text,
and the manifest records the training loss before and after, not an accuracy.

Folders are read back through the same code as real checkpoints (``MergeEngine.load``,
``AutoModelForCausalLM.from_pretrained``, ``AutoTokenizer``). The build is deterministic for a
given (family, layers, seed) on one machine and cached like the toy zoo, under
``$EVOMERGE_CACHE/real-shapes/<family>-L<layers>-seed<N>``; it is written into a temporary sibling
and renamed into place when complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .build import ZooBuildError, _fixed_threads, _publish, _quiet_transformers, cache_root, derive_seed, is_complete
from .manifest import write_manifest
from .skills import SKILLS, sample_unique, skill_rng, write_jsonl
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer
from .training import train

#: Bump whenever the output of a build changes; it is part of the cache key.
REAL_SHAPES_VERSION = "1"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Substrings of the decoder-layer parameter names that experts train (see the module docstring).
TRAINED = ("self_attn.", "mlp.down_proj.")
#: Shard limit of ``save_pretrained``: small enough that every fixture has several shards.
SHARD_SIZE = "100MB"


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

#: Training budget of every expert and adapter: a few optimiser steps, as the issue asks.
STEPS = 6
LR = 1e-3
LORA_LR = 3e-3
LORA_RANK = 8
BATCH = 8
N_TRAIN = 64
N_CALIB = 8
N_TEST = 8


class RealShapeError(ZooBuildError):
    """A real-shaped fixture cannot be built with the given arguments."""


def default_real_shape_dir(family: str, layers: int, seed: int = 0) -> Path:
    """``$EVOMERGE_CACHE/real-shapes/<family>-L<layers>-seed<N>``."""
    return cache_root() / "real-shapes" / f"{family}-L{layers}-seed{seed}"


def real_config(shape: RealShape, layers: int) -> PretrainedConfig:
    """The published config with the deviations applied and the depth cut to ``layers``."""
    values = {**shape.config, **shape.deviations, "num_hidden_layers": layers,
              "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    if "max_window_layers" in values:
        values["max_window_layers"] = layers
    return AutoConfig.for_model(shape.model_type, **values)


def build_real_shape(
    family: str = "qwen2.5",
    *,
    layers: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Build the fixture of ``family`` (or find it cached) and return its directory.

    The directory holds ``manifest.json`` and the folders it names (paths relative to the
    directory): ``base`` (``<dir>/base``), ``experts`` (skill -> ``experts/<skill>``),
    ``lora_experts`` (skill -> ``adapters/<skill>-lora``) and ``data`` (skill -> calib/test JSONL).
    ``layers`` defaults to the family's depth (Qwen2.5: 4; the others: 2). A complete fixture
    with the same key (family, layers, seed, builder version) is returned at once unless ``force``.
    """
    if family not in FAMILIES:
        raise RealShapeError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    shape = FAMILIES[family]
    layers = shape.layers if layers is None else int(layers)
    minimum = 2 if family == "gemma2" else 1  # Gemma-2 alternates local/global: two layers show both
    if layers < minimum:
        raise RealShapeError(f"layers must be >= {minimum} for {family}, got {layers}")
    out_dir = Path(out).expanduser().resolve() if out is not None else default_real_shape_dir(family, layers, seed)
    key = {"real_shapes_version": REAL_SHAPES_VERSION, "family": family, "layers": layers, "seed": seed}
    if not force and is_complete(out_dir, key):
        return out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise RealShapeError(f"output path {out_dir} exists and is not a directory")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    except OSError as e:
        raise RealShapeError(f"cannot write fixture to {out_dir}: {e.strerror or e}") from e
    try:
        threads = int(os.environ.get("EVOMERGE_ZOO_THREADS", max(1, min(4, os.cpu_count() or 1))))
        with _fixed_threads(threads):
            _build_into(tmp, out_dir, shape, layers, seed, key, progress)
        _publish(tmp, out_dir, key, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _trained_params(model: PreTrainedModel) -> dict[str, torch.nn.Parameter]:
    """The parameters experts train: attention and MLP down_proj of the decoder layers."""
    return {n: p for n, p in model.named_parameters() if ".layers." in n and any(t in n for t in TRAINED)}


def _save(model: PreTrainedModel, tokenizer, path: Path) -> None:
    """Save in bf16, sharded; the model comes back in float32 holding exactly the saved values.

    Converting the module (rather than saving a converted state dict) keeps tied embeddings one
    tensor, so ``save_pretrained`` writes them once and records the dtype as bfloat16.
    """
    model.to(torch.bfloat16)
    with _quiet_transformers():
        model.save_pretrained(path, safe_serialization=True, max_shard_size=SHARD_SIZE)
    tokenizer.save_pretrained(path)
    model.to(torch.float32)


def _folder_info(path: Path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    return {"shards": len(files), "bytes": sum(f.stat().st_size for f in files)}


def _build_into(tmp: Path, final: Path, shape: RealShape, layers: int, seed: int, key: dict, progress: bool) -> None:
    t0 = time.perf_counter()
    config = real_config(shape, layers)
    tokenizer = build_tokenizer(vocab_size=shape.config["vocab_size"])
    skills = [*shape.experts, shape.lora_skill]
    data = {}
    for i, s in enumerate(skills):
        calib = sample_unique(SKILLS[s], skill_rng(seed, 60, i, 0), N_CALIB)
        test = sample_unique(SKILLS[s], skill_rng(seed, 60, i, 1), N_TEST, exclude=[e.prompt for e in calib])
        held = [e.prompt for e in calib + test]
        data[s] = sample_unique(SKILLS[s], skill_rng(seed, 61, i), N_TRAIN, exclude=held)
        write_jsonl(tmp / "data" / s / "calib.jsonl", calib)
        write_jsonl(tmp / "data" / s / "test.jsonl", test)

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    torch.manual_seed(derive_seed(seed, 70))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    _save(model, tokenizer, tmp / "base")
    seconds["base"] = round(time.perf_counter() - t, 2)
    log = _log(progress, shape.family)
    log(f"base: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters ({seconds['base']:.1f} s)")

    trained = _trained_params(model)
    model.requires_grad_(False)
    for p in trained.values():
        p.requires_grad_(True)
    initial = {n: p.detach().clone() for n, p in trained.items()}
    training: dict[str, dict] = {}
    for i, s in enumerate(shape.experts):
        t = time.perf_counter()
        torch.manual_seed(derive_seed(seed, 71, i))
        res = train(model, data[s], steps=STEPS, lr=LR, batch_size=BATCH, rng=skill_rng(seed, 72, i))
        _save(model, tokenizer, tmp / "experts" / s)
        training[f"expert:{s}"] = {**res.to_dict(), "trained": list(TRAINED), "seed": derive_seed(seed, 71, i)}
        with torch.no_grad():
            for n, p in trained.items():
                p.copy_(initial[n])
        seconds[f"expert:{s}"] = round(time.perf_counter() - t, 2)
        log(f"expert {s}: loss {res.first_loss:.2f} -> {res.final_loss:.2f} ({seconds[f'expert:{s}']:.1f} s)")
    del initial
    model.requires_grad_(False)

    from peft import LoraConfig, get_peft_model

    t = time.perf_counter()
    s = shape.lora_skill
    lseed = derive_seed(seed, 73)
    torch.manual_seed(lseed)
    cfg = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    peft_model = get_peft_model(model, cfg)
    res = train(peft_model, data[s], steps=STEPS, lr=LORA_LR, batch_size=BATCH, rng=skill_rng(seed, 74))
    peft_model.peft_config["default"].base_model_name_or_path = str(final / "base")
    with warnings.catch_warnings():  # the recorded base path exists only once the fixture is published
        warnings.filterwarnings("ignore", message="Could not find a config file")
        peft_model.save_pretrained(tmp / "adapters" / f"{s}-lora", safe_serialization=True)
    training[f"lora:{s}"] = {**res.to_dict(), "rank": LORA_RANK, "targets": LORA_TARGETS, "seed": lseed}
    seconds[f"lora:{s}"] = round(time.perf_counter() - t, 2)
    log(f"lora {s}: loss {res.first_loss:.2f} -> {res.final_loss:.2f} ({seconds[f'lora:{s}']:.1f} s)")
    architecture = type(model).__name__
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    n_trained = sum(p.numel() for p in trained.values())
    del peft_model, model, trained

    folders = {"base": _folder_info(tmp / "base"),
               **{f"expert:{s}": _folder_info(tmp / "experts" / s) for s in shape.experts}}
    manifest = {
        **key,
        "source": shape.source,
        "model_type": shape.model_type,
        "features": shape.features,
        "published_config": dict(shape.config),
        "deviations": {k: {"value": v, "why": shape.deviation_reasons.get(k, "")} for k, v in shape.deviations.items()},
        "skills": skills,
        "base": "base",
        "experts": {s: f"experts/{s}" for s in shape.experts},
        "lora_experts": {shape.lora_skill: f"adapters/{shape.lora_skill}-lora"},
        "data": {s: {"calib": f"data/{s}/calib.jsonl", "test": f"data/{s}/test.jsonl"} for s in skills},
        "model": {"architecture": architecture,
                  "n_params": n_params, "n_trained_by_experts": n_trained, "num_layers": layers,
                  "vocab_size": shape.config["vocab_size"], "dtype": "bfloat16", "lora_targets": LORA_TARGETS},
        "folders": folders,
        "training": training,
        "build_threads": torch.get_num_threads(),
        "build_seconds_by_step": seconds,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    write_manifest(tmp, manifest)


def _log(enabled: bool, family: str):
    def log(message: str) -> None:
        if enabled:
            print(f"[{family}] {message}", flush=True)

    return log
