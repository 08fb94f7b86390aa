"""LoRA experts: PEFT key mapping and scaling, materialized deltas, adapter-space merging, PEFT export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from evomerge.merge import ExpertParams, GroupRule, LoraAdapter, MergeEngine, MergeError, MergeRecipe

Q = "model.layers.1.self_attn.q_proj.weight"


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def test_peft_keys_map_to_base_tensors_with_rslora_scale(lora_family: dict[str, Path]) -> None:
    adapter = LoraAdapter.load(lora_family["lb"])
    assert Q in adapter.modules and "model.layers.0.mlp.down_proj.weight" in adapter.modules
    assert adapter.modules[Q].scale == pytest.approx(16 / 4**0.5)
    assert LoraAdapter.load(lora_family["la"]).modules[Q].scale == pytest.approx(8 / 4)


def test_materialized_lora_matches_peft_merge_and_mixes_with_full_experts(llama_family: dict[str, Path], lora_family: dict[str, Path]) -> None:
    engine = MergeEngine.load(llama_family["base"], {"lb": lora_family["lb"], "a": llama_family["a"]}, progress=False)
    only_lora = MergeRecipe(rules=[GroupRule(method="task_arithmetic", experts={"lb": ExpertParams(weight=1.0)})], normalize=False)
    merged = engine.merged_state(only_lora)
    expected = _peft_merged(llama_family["base"], lora_family["lb"])
    for name in engine.layout.slots:
        torch.testing.assert_close(merged[name], expected[name], atol=1e-6, rtol=1e-5)
    mixed = MergeRecipe(rules=[GroupRule(method="ties", experts={"lb": ExpertParams(density=0.5), "a": ExpertParams(density=0.5)})])
    stats = engine.apply(mixed, engine.new_target_model())
    assert 0 < stats.kept_fraction < 1


def test_adapter_mode_merges_factors_and_exports_a_peft_adapter(tmp_path: Path, llama_family: dict[str, Path], lora_family: dict[str, Path]) -> None:
    engine = MergeEngine.load(llama_family["base"], dict(lora_family), progress=False)
    recipe = MergeRecipe(rules=[GroupRule(method="task_arithmetic",
                                          experts={"la": ExpertParams(weight=0.7), "lb": ExpertParams(weight=0.4)})],
                         normalize=False, lora_mode="adapter")
    merged = engine.merged_state(recipe)
    la, lb = (engine.adapter(n).modules[Q] for n in ("la", "lb"))
    a_merged = 0.7 * la.a + 0.4 * lb.a
    b_merged = 0.7 * la.scale * la.b + 0.4 * lb.scale * lb.b
    torch.testing.assert_close(merged[Q], engine.base_tensor(Q) + b_merged @ a_merged, atol=1e-6, rtol=1e-5)
    untouched = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(merged[untouched], engine.base_tensor(untouched))

    out = engine.export_lora(recipe, tmp_path / "pool")
    reloaded = _peft_merged(llama_family["base"], out)
    for name in engine.layout.slots:
        torch.testing.assert_close(reloaded[name], merged[name], atol=1e-6, rtol=1e-5)


def test_adapter_mode_prunes_a_only(llama_family: dict[str, Path], lora_family: dict[str, Path]) -> None:
    engine = MergeEngine.load(llama_family["base"], {"la": lora_family["la"]}, progress=False)
    recipe = MergeRecipe(rules=[GroupRule(method="topk", experts={"la": ExpertParams(weight=1.0, density=0.25)})],
                         normalize=False, lora_mode="adapter")
    module = engine.merged_adapter(recipe)[Q]
    source = engine.adapter("la").modules[Q]
    assert torch.count_nonzero(module.a) <= 0.25 * source.a.numel() + 1
    torch.testing.assert_close(module.b, source.b * source.scale)


def test_adapter_mode_refuses_full_experts(llama_family: dict[str, Path], lora_family: dict[str, Path]) -> None:
    engine = MergeEngine.load(llama_family["base"], {"la": lora_family["la"], "a": llama_family["a"]}, progress=False)
    recipe = MergeRecipe(rules=[GroupRule(method="task_arithmetic", experts={"la": ExpertParams(), "a": ExpertParams()})], lora_mode="adapter")
    with pytest.raises(MergeError, match=r"rule 0: lora_mode='adapter' merges LoRA adapters only, but 'a' is a full model"):
        engine.apply(recipe, engine.new_target_model())


@pytest.mark.parametrize(("change", "problem"), [
    ({"lora_alpha": "sixteen"}, r"adapter_config.json: lora_alpha is 'sixteen'; it must be a positive number"),
    ({"lora_alpha": True}, r"lora_alpha is True"),
    ({"r": 0}, r"r is 0; it must be a positive whole number"),
    ({"r": 3}, r"adapter_config.json: r \(or rank_pattern\) says rank 3 for .*, but its lora_A has 4 rows"),
    ({"rank_pattern": {"q_proj": 2}}, r"says rank 2 for model.layers.\d.self_attn.q_proj"),
    ({"alpha_pattern": {"q_proj": "x"}}, r"alpha_pattern\['q_proj'\] is 'x'"),
])
def test_an_adapter_config_that_disagrees_with_peft_is_one_line(tmp_path: Path, lora_family: dict[str, Path],
                                                                 change: dict, problem: str) -> None:
    """PEFT scales by lora_alpha / r from the config: a config whose numbers are not numbers, or
    whose rank is not the weights', would scale every delta wrongly (PEFT itself refuses to load it)."""
    folder = Path(shutil.copytree(lora_family["la"], tmp_path / "adapter"))
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(MergeError, match=problem):
        LoraAdapter.load(folder)
