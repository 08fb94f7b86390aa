"""The real-shaped fixtures (experiments/zoo/real_shapes.py) through the whole product path.

For each published architecture (Qwen2.5-0.5B, Llama-3.2-1B, Mistral-7B-v0.3, Gemma-2-2B, depth
cut to 2-4 layers, random weights): the folders have the published shape (config values, bf16
shards + index, a tokenizer of the published vocabulary size), the experts differ from the base
where fine-tuning changed them, and the checkpoints load, merge in place (TIES, or DARE-TIES for
Mistral, over the full experts and the LoRA adapter, compiled kernels as for any model of >= 50M
parameters), export (the exported folder gives the live merged model's logits exactly) and score
(TransformersScorer; the loss equals a plain forward pass of the merged model).

Each fixture is built once (about 0.5-2 minutes on 2 cores) and cached under $EVOMERGE_CACHE;
calibration sets are 4 items, because scoring a 128k-256k vocabulary on CPU is the slow part.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.experiments.zoo import FAMILIES, build_real_shape, load_manifest
from evomerge.merge import CheckpointReader, ExpertParams, GroupRule, MergeEngine, MergeRecipe
from evomerge.objectives import CalibrationSet, Objective, TransformersScorer

pytestmark = pytest.mark.slow
ITEMS = 4


@pytest.fixture(scope="module", params=list(FAMILIES))
def fixture(request) -> tuple[str, Path, dict]:
    root = build_real_shape(request.param)
    return request.param, root, load_manifest(root)


def _experts(root: Path, manifest: dict) -> dict[str, Path]:
    return {name: root / rel for name, rel in {**manifest["experts"], **manifest["lora_experts"]}.items()}


@pytest.fixture(scope="module")
def engine(fixture) -> MergeEngine:
    _, root, manifest = fixture
    return MergeEngine.load(root / manifest["base"], _experts(root, manifest), progress=False)


SPARSIFIED = {"mistral0.3": "dare_ties"}
"""The method `_sparsified` uses per family (TIES elsewhere): exact TIES sorts every trained tensor of
each expert once (mergekit's tie order), ~40 s of the 0.7B Mistral-shaped model's CPU time, while
DARE-TIES draws its masks, so the real-shaped tests cover both kinds of sparsification."""


def _sparsified(family: str, manifest: dict) -> MergeRecipe:
    """TIES (or DARE-TIES, `SPARSIFIED`) over every tensor, the full experts and the LoRA adapter with
    different weights."""
    names = [*manifest["experts"], *manifest["lora_experts"]]
    weights = [0.7, 0.5, 0.3][: len(names)]
    rule = GroupRule(method=SPARSIFIED.get(family, "ties"),
                     experts={n: ExpertParams(weight=w, density=0.6) for n, w in zip(names, weights)})
    return MergeRecipe(rules=[rule], seed=3)


def _mixed(family: str, manifest: dict) -> MergeRecipe:
    """Task arithmetic everywhere, `_sparsified`'s method on the first layer: the export test's recipe."""
    names = [*manifest["experts"], *manifest["lora_experts"]]
    return MergeRecipe(rules=[
        GroupRule(method="task_arithmetic", experts={n: ExpertParams(weight=0.4) for n in names}),
        GroupRule(layers=[0], method=SPARSIFIED.get(family, "ties"),
                  experts={n: ExpertParams(weight=0.4, density=0.5) for n in names}),
    ], normalize=False, seed=5)


def _tensor_names(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def test_fixture_has_the_published_shape(fixture):
    family, root, manifest = fixture
    shape = FAMILIES[family]
    config = json.loads((root / "base" / "config.json").read_text())
    for key, value in {**shape.config, **shape.deviations}.items():
        if key in ("num_hidden_layers", "rope_theta", "rope_scaling", "max_window_layers"):
            continue  # cut depth; transformers 5 writes rope fields as `rope_parameters`
        if key == "sliding_window" and config.get("use_sliding_window") is False:
            assert config[key] is None  # Qwen2: transformers drops the window when it is not used
            continue
        assert config[key] == value, key
    assert config["num_hidden_layers"] == shape.layers
    rope = config.get("rope_parameters") or {}
    assert rope.get("rope_theta", config.get("rope_theta")) == shape.config["rope_theta"]
    if "rope_scaling" in shape.config:
        assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0
    if family == "gemma2":
        assert config["layer_types"] == ["sliding_attention", "full_attention"]
    assert config["dtype"] == "bfloat16"

    weight_map = _tensor_names(root / "base")
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 2
    assert ("lm_head.weight" in weight_map) == (not shape.config["tie_word_embeddings"])
    with safe_open(str(root / "base" / shards[0]), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    embed = next(k for k in weight_map if k.endswith("embed_tokens.weight"))
    with safe_open(str(root / "base" / weight_map[embed]), "pt") as f:
        assert f.get_slice(embed).get_shape() == [shape.config["vocab_size"], shape.config["hidden_size"]]
    tok = AutoTokenizer.from_pretrained(root / "base")
    assert len(tok) == shape.config["vocab_size"]
    assert tok.decode(tok("rev abc=")["input_ids"], skip_special_tokens=True) == "rev abc="
    adapter = json.loads((root / manifest["lora_experts"][shape.lora_skill] / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8


def test_experts_are_fine_tunes_of_the_base(fixture):
    """Trained tensors moved by optimiser steps (not noise: the loss fell); frozen ones did not."""
    family, root, manifest = fixture
    base = CheckpointReader(root / manifest["base"])
    for name, rel in manifest["experts"].items():
        stats = manifest["training"][f"expert:{name}"]
        assert stats["final_loss"] < stats["first_loss"] - 1.0
        expert = CheckpointReader(root / rel)
        assert expert.names() == base.names()
        for tensor in base.names():
            trained = ".layers." in tensor and ("self_attn." in tensor or "mlp.down_proj." in tensor)
            if tensor.endswith("bias"):
                continue  # Qwen2's q/k/v biases start at zero and may stay there
            moved = not torch.equal(base.get(tensor), expert.get(tensor))
            assert moved == trained, (family, name, tensor)


IDS = torch.tensor([[1, 21, 8, 25, 40, 4, 5, 6, 41], [1, 22, 18, 21, 23, 40, 7, 9, 41]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.clone()


def test_merge_in_place_is_repeatable(fixture, engine):
    family, _, manifest = fixture
    model = engine.new_target_model()
    base = _logits(model)
    engine.apply(_sparsified(family, manifest), model)
    merged = _logits(model)
    assert not torch.equal(base, merged)
    engine.apply(_mixed(family, manifest), model)
    engine.apply(_sparsified(family, manifest), model)
    assert torch.equal(_logits(model), merged)


def test_export_reloads_with_identical_logits(fixture, engine, tmp_path):
    family, _, manifest = fixture
    recipe = _mixed(family, manifest)
    model = engine.new_target_model()
    engine.apply(recipe, model)  # the scored model: the export holds its bits (`MergeEngine.iter_merged`)
    merged = _logits(model)
    out = engine.export(recipe, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=engine.dtype).eval()
    assert torch.equal(_logits(reloaded), merged)
    assert len(AutoTokenizer.from_pretrained(out)) == FAMILIES[family].config["vocab_size"]


def test_scorer_matches_a_plain_forward_pass(fixture, engine):
    family, root, manifest = fixture
    skill = next(iter(manifest["experts"]))
    cal = CalibrationSet.load(root / manifest["data"][skill]["calib"], size=ITEMS, seed=0)
    objectives = [Objective("acc", "exact_match", cal), Objective("loss", "answer_loss", cal),
                  Objective("kept", "kept_fraction")]
    recipe = _sparsified(family, manifest)
    with TransformersScorer(engine, objectives, batch_size=ITEMS, max_new_tokens=4) as scorer:
        ev = scorer.evaluate(recipe)
        assert not ev.failed, ev.reason
        assert 0.0 <= ev.values["acc"] <= 1.0 and 0.0 < ev.values["kept"] <= 1.0
        tok, model = scorer.tokenizer, engine.new_target_model()
        losses = []
        for item in cal.items:
            prompt = tok(item.prompt)["input_ids"]
            answer = tok(item.prompt + item.answer)["input_ids"][len(prompt):]
            with torch.no_grad():
                logp = model(torch.tensor([prompt + answer])).logits[0].float().log_softmax(-1)
            losses += [-logp[len(prompt) - 1 + t, a].item() for t, a in enumerate(answer)]
    assert math.isfinite(ev.values["loss"])
    assert ev.values["loss"] == pytest.approx(sum(losses) / len(losses), rel=2e-2)
