"""Export: the folder reloads with transformers and gives the in-place model's exact logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.merge import MergeEngine, MergeError, MergeRecipe

from .test_engine import mixed_recipe


def test_export_reloads_with_identical_logits(tmp_path: Path, llama_family: dict[str, Path]) -> None:
    engine = MergeEngine.load(llama_family["base"], {e: llama_family[e] for e in ("a", "b", "c")}, progress=False)
    recipe = mixed_recipe("dare_ties", trial=5)
    live = engine.new_target_model()
    engine.apply(recipe, live)
    out = engine.export(recipe, tmp_path / "merged", shard_size="40KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert MergeRecipe.from_json((out / "recipe.json").read_text()) == recipe
    assert "dare_ties" in (out / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.arange(0, 40).reshape(2, 20) % 96
    with torch.no_grad():
        assert torch.equal(live(ids).logits, reloaded(ids).logits)
    with pytest.raises(MergeError, match="shard_size 'big' is not a size"):
        engine.export(recipe, tmp_path / "x", shard_size="big")


def test_mixed_method_recipe_exports_without_mergekit_yaml(tmp_path: Path, llama_family: dict[str, Path]) -> None:
    engine = MergeEngine.load(llama_family["base"], {e: llama_family[e] for e in ("a", "b", "c")}, progress=False)
    out = engine.export(mixed_recipe("ties"), tmp_path / "m")
    assert not (out / "mergekit.yaml").exists()
    assert "different methods (task_arithmetic, ties)" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
