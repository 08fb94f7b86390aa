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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "della"])
def test_export_holds_the_bits_apply_wrote(tmp_path: Path, tiny_zoo: Path, method: str, dtype: torch.dtype) -> None:
    """The export is what was scored, bit for bit, with the fused kernels too (an eager export pass
    rounded task-arithmetic entries differently from the fused apply: 13 of 21 bf16 tensors of the
    tiny zoo, 15 in fp32)."""
    from safetensors.torch import load_file

    from evomerge.experiments.zoo import load_manifest
    from evomerge.merge import ExpertParams, GroupRule

    manifest = load_manifest(tiny_zoo)
    experts = {e: tiny_zoo / p for e, p in manifest["experts"].items()}
    engine = MergeEngine.load(tiny_zoo / manifest["base"], experts, dtype=dtype, progress=False)
    assert engine.fused
    density = lambda d: 1.0 if method == "task_arithmetic" else d  # noqa: E731
    extra = {"epsilon": 0.1} if method == "della" else {}
    rules = [GroupRule(method=method, experts={e: ExpertParams(weight=0.4, density=density(0.5), **extra) for e in experts})]
    rules += [GroupRule(layers=[layer], method=method, experts={
        e: ExpertParams(weight=0.3 + 0.1 * j + 0.05 * layer, density=density(0.3 + 0.1 * layer), **extra)
        for j, e in enumerate(experts)})
        for layer in range(engine.layout.num_layers)]
    recipe = MergeRecipe(rules=rules, seed=3, trial=7)
    live = engine.new_target_model()
    engine.apply(recipe, live)
    out = engine.export(recipe, tmp_path / "merged")
    saved: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        saved.update(load_file(shard))
    state = live.state_dict()
    assert saved and [n for n, t in saved.items() if not torch.equal(t, state[n])] == []
