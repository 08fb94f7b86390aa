"""mergekit YAML: parses with mergekit's own MergeConfiguration and resolves to the recipe's values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mergekit.config import MergeConfiguration, evaluate_setting
from mergekit.merge_methods.registry import registered_methods

from evomerge.merge import ExpertParams, GroupRule, MergeEngine, MergeError, MergeRecipe
from evomerge.merge._mergekit import MERGEKIT_PARAMETERS, recipe_to_mergekit


@pytest.fixture(scope="module")
def engine(llama_family: dict[str, Path], lora_family: dict[str, Path]) -> MergeEngine:
    paths = {"a": llama_family["a"], "b": llama_family["b"], "la": lora_family["la"]}
    return MergeEngine.load(llama_family["base"], paths, progress=False)


def _yaml(engine: MergeEngine, recipe: MergeRecipe) -> str:
    return recipe_to_mergekit(recipe, engine.layout, str(engine.base_path), {n: str(p) for n, p in engine.expert_paths.items()},
                              lora_experts=frozenset(engine.lora_expert_names), dtype="float32")


def test_parameter_table_matches_mergekit_registry() -> None:
    registry = {m.spec.name: m for m in registered_methods()}
    for name, (shared, per_model) in MERGEKIT_PARAMETERS.items():
        declared = {p.name for p in registry[name].spec.parameters}
        assert shared | per_model <= declared, name


def test_per_layer_ties_recipe_parses_and_resolves_per_tensor(engine: MergeEngine) -> None:
    recipe = MergeRecipe(rules=[
        GroupRule(method="ties", experts={"a": ExpertParams(weight=0.7, density=0.5), "la": ExpertParams(weight=0.3, density=0.8)}),
        GroupRule(layers=[1], kinds=["mlp", "norm"], method="ties", experts={"b": ExpertParams(weight=1.2, density=0.25)}),
        GroupRule(layers=["head"], method="ties", experts={"a": ExpertParams(weight=0.1, density=0.9)}),
    ], normalize=False, lambda_=0.9)
    text = _yaml(engine, recipe)
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    assert config.merge_method == "ties" and config.parameters["lambda"] == 0.9
    models = {str(m.model): m for m in config.models}
    lora_ref = f"{engine.base_path}+{engine.expert_paths['la']}"
    assert lora_ref in models
    refs = {"a": str(engine.expert_paths["a"]), "b": str(engine.expert_paths["b"]), "la": lora_ref}
    for name, slot in engine.layout.slots.items():
        rule = recipe.rule_for(slot.layer, slot.kind)
        for expert, ref in refs.items():
            setting = models[ref].parameters
            want = rule.experts.get(expert, ExpertParams(weight=0.0))
            assert evaluate_setting(name, setting["weight"], validate=float) == want.weight, (name, expert)
            assert evaluate_setting(name, setting["density"], validate=float) == want.density, (name, expert)


def test_unexpressible_recipes_list_every_reason(engine: MergeEngine) -> None:
    recipe = MergeRecipe(rules=[
        GroupRule(method="dare_ties", experts={"a": ExpertParams(density=0.3)}),
        GroupRule(kinds=["mlp"], method="topk", experts={"b": ExpertParams(density=0.3)}),
    ], lora_mode="adapter")
    with pytest.raises(MergeError) as info:
        _yaml(engine, recipe)
    message = str(info.value)
    assert "lora_mode='adapter'" in message and "different methods (dare_ties, topk)" in message
    with pytest.raises(MergeError, match="method 'topk' has no mergekit equivalent"):
        _yaml(engine, MergeRecipe(rules=[GroupRule(method="topk", experts={"a": ExpertParams(density=0.3)})]))
    with pytest.raises(MergeError, match="rescale='paper'"):
        _yaml(engine, MergeRecipe(rules=[GroupRule(method="dare_linear", experts={"a": ExpertParams(density=0.3)})], rescale="paper"))


def test_linear_and_slerp_keep_base_tensors(engine: MergeEngine) -> None:
    linear = MergeRecipe(rules=[GroupRule(kinds=["attention"], method="linear", experts={"a": ExpertParams(weight=2.0)})])
    config = MergeConfiguration.model_validate(yaml.safe_load(_yaml(engine, linear)))
    base = next(m for m in config.models if str(m.model) == str(engine.base_path))
    assert evaluate_setting("model.layers.0.mlp.up_proj.weight", base.parameters["weight"], validate=float) == 1.0
    assert evaluate_setting("model.layers.0.self_attn.q_proj.weight", base.parameters["weight"], validate=float) == 0.0
    # mergekit copies config.json and the tokenizer from base_model, else from the first of an unordered set
    assert str(config.base_model) == str(engine.base_path)
    slerp = MergeRecipe(rules=[GroupRule(layers=[0], method="slerp", t=0.3, experts={"a": ExpertParams()})])
    config = MergeConfiguration.model_validate(yaml.safe_load(_yaml(engine, slerp)))
    assert evaluate_setting("model.layers.0.mlp.up_proj.weight", config.parameters["t"], validate=float) == 0.3
    assert evaluate_setting("model.layers.1.mlp.up_proj.weight", config.parameters["t"], validate=float) == 0.0
