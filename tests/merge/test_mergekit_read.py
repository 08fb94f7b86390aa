"""mergekit YAML read back as a recipe: per tensor, the values mergekit's own evaluate_setting gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.config import evaluate_setting as mergekit_setting
from mergekit.merge_methods.registry import registered_methods

from evomerge.merge import ExpertParams, GroupRule, MergeEngine, MergeError, MergeRecipe, recipe_from_mergekit, recipe_to_mergekit
from evomerge.merge._mergekit_read import MERGEKIT_DEFAULTS, PER_MODEL_DEFAULTS, evaluate_setting


@pytest.fixture(scope="module")
def engine(llama_family: dict[str, Path]) -> MergeEngine:
    return MergeEngine.load(llama_family["base"], {"a": llama_family["a"], "b": llama_family["b"]}, progress=False)


def _expert_of(engine: MergeEngine):
    paths = {str(p): n for n, p in engine.expert_paths.items()}
    return lambda ref: paths.get(ref)


def test_defaults_match_mergekit_registry() -> None:
    registry = {m.spec.name: {p.name: p.default for p in m.spec.parameters} for m in registered_methods()}
    for name, defaults in MERGEKIT_DEFAULTS.items():
        for key, value in defaults.items():
            assert registry[name][key] == value, (name, key)
    for key, value in PER_MODEL_DEFAULTS.items():
        assert registry["della" if key == "epsilon" else "breadcrumbs" if key == "gamma" else "ties"][key] == value


def test_round_trip_of_a_per_layer_recipe(engine: MergeEngine) -> None:
    recipe = MergeRecipe(rules=[
        GroupRule(method="ties", experts={"a": ExpertParams(weight=0.7, density=0.5), "b": ExpertParams(weight=0.3, density=0.8)}),
        GroupRule(layers=[1], kinds=["mlp", "norm"], method="ties",
                  experts={"a": ExpertParams(weight=-0.2, density=0.9), "b": ExpertParams(weight=1.2, density=0.25)}),
    ], normalize=False, lambda_=0.9)
    text = recipe_to_mergekit(recipe, engine.layout, str(engine.base_path), {n: str(p) for n, p in engine.expert_paths.items()})
    back, notes = recipe_from_mergekit(yaml.safe_load(text), engine.layout, _expert_of(engine))
    assert notes == []
    assert (back.normalize, back.lambda_) == (False, 0.9)
    for slot in set(engine.layout.slots.values()):
        want, got = recipe.rule_for(slot.layer, slot.kind), back.rule_for(slot.layer, slot.kind)
        assert got.method == "ties"
        for expert in ("a", "b"):
            assert got.experts[expert].weight == pytest.approx(want.experts[expert].weight), slot
            assert got.experts[expert].density == pytest.approx(want.experts[expert].density), slot


def test_gradients_and_filters_follow_mergekit(engine: MergeEngine) -> None:
    """Per tensor our evaluate_setting equals mergekit's; per slot the recipe holds the tensors' mean."""
    a, b = (str(engine.expert_paths[n]) for n in "ab")
    config = {
        "merge_method": "dare_ties",
        "base_model": str(engine.base_path),
        "models": [
            {"model": str(engine.base_path)},
            {"model": a, "parameters": {"weight": [0.2, 1.0], "density": [{"filter": "q_proj", "value": 0.3}, {"value": 0.6}]}},
            {"model": b, "parameters": {"weight": 0.5}},
        ],
        "parameters": {"density": 0.9, "int8_mask": True},
    }
    recipe, notes = recipe_from_mergekit(config, engine.layout, _expert_of(engine))
    assert recipe.normalize is False  # dare_ties' mergekit default
    assert any("averaged: density[a]" in n for n in notes), notes
    parsed = MergeConfiguration.model_validate(config)  # mergekit's own reading, for its evaluate_setting
    layers = engine.layout.num_layers
    by_slot: dict = {}
    for name, slot in engine.layout.slots.items():
        t = slot.layer / (layers - 1) if isinstance(slot.layer, int) else 0.0
        for i, expert in ((1, "a"), (2, "b")):
            for kind in ("weight", "density"):
                raw = config["models"][i]["parameters"]
                setting = raw[kind] if kind in raw else config["parameters"][kind]
                theirs = parsed.models[i].parameters.get(kind, parsed.parameters.get(kind))
                ours = evaluate_setting(name, setting, t)
                assert ours == pytest.approx(mergekit_setting(name, theirs, t, validate=float)), (name, kind)
                by_slot.setdefault((slot.layer, slot.kind, expert, kind), []).append(ours)
    for (layer, kind, expert, param), values in by_slot.items():
        got = getattr(recipe.rule_for(layer, kind).experts[expert], param)
        assert got == pytest.approx(sum(values) / len(values)), (layer, kind, expert, param)


def test_what_cannot_be_read_is_one_line(engine: MergeEngine) -> None:
    expert_of = _expert_of(engine)
    with pytest.raises(MergeError, match="'slices' configs"):
        recipe_from_mergekit({"slices": [], "merge_method": "passthrough"}, engine.layout, expert_of)
    with pytest.raises(MergeError, match=r"merge_method 'sce' is not one of"):
        recipe_from_mergekit({"merge_method": "sce", "models": [{"model": "x"}]}, engine.layout, expert_of)
    with pytest.raises(MergeError, match="names none of the spec's experts"):
        recipe_from_mergekit({"merge_method": "ties", "models": [{"model": "/elsewhere", "parameters": {"weight": 1}}]}, engine.layout, expert_of)
    with pytest.raises(MergeError, match="has no 'weight'"):
        recipe_from_mergekit({"merge_method": "ties", "models": [{"model": str(engine.expert_paths["a"])}]}, engine.layout, expert_of)


def test_mergekit_rescale_of_magnitude_pruning_is_noted(engine: MergeEngine) -> None:
    """mergekit's ties honours `rescale: true` (an L1 rescale after pruning); evomerge has none: a note."""
    models = [{"model": str(engine.expert_paths[n]), "parameters": {"weight": 0.5, "density": 0.4}} for n in "ab"]
    config = {"merge_method": "ties", "base_model": str(engine.base_path), "models": models}
    _, notes = recipe_from_mergekit({**config, "parameters": {"rescale": True}}, engine.layout, _expert_of(engine))
    assert any("rescale: true is not expressible for ties" in note for note in notes), notes
    _, notes = recipe_from_mergekit(config, engine.layout, _expert_of(engine))
    assert notes == []


def test_della_values_that_average_out_of_range_are_refused_at_import(engine: MergeEngine) -> None:
    """A filter gives one tensor density 0.8 and the rest 1.0: the layer's mean with epsilon 0.1
    leaves DELLA's range, which the import says (not the merge, later, as a traceback)."""
    one = next(n for n, s in engine.layout.slots.items() if s.layer == 1 and s.kind == "attention")
    density = [{"filter": one, "value": 0.8}, {"value": 1.0}]
    models = [{"model": str(engine.expert_paths[n]), "parameters": {"weight": 0.5, "epsilon": 0.1, "density": density}} for n in "ab"]
    config = {"merge_method": "della", "base_model": str(engine.base_path), "models": models}
    with pytest.raises(MergeError, match=r"layer 1 attention: DELLA needs density - epsilon > 0.*averages"):
        recipe_from_mergekit(config, engine.layout, _expert_of(engine))


@pytest.mark.parametrize("method", ["nuslerp", "model_stock"])
def test_exported_nuslerp_and_model_stock_read_back(method: str, engine: MergeEngine) -> None:
    """What `recipe_to_mergekit` writes for the two-task-vector methods reads back as the same merge."""
    experts = {"a": ExpertParams(weight=0.3), "b": ExpertParams(weight=0.9)} if method == "nuslerp" else \
        {"a": ExpertParams(), "b": ExpertParams()}
    rules = [GroupRule(method=method, experts=experts)]
    if method == "nuslerp":
        rules.append(GroupRule(layers=[1], method=method, experts={"a": ExpertParams(weight=1.0), "b": ExpertParams(weight=0.2)}))
    recipe = MergeRecipe(rules=rules)
    text = recipe_to_mergekit(recipe, engine.layout, str(engine.base_path), {n: str(p) for n, p in engine.expert_paths.items()})
    back, notes = recipe_from_mergekit(yaml.safe_load(text), engine.layout, _expert_of(engine))
    assert notes == []
    want, got = engine.merged_state(recipe), engine.merged_state(back)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_nuslerp_and_model_stock_without_a_base_or_with_other_counts_are_one_line(engine: MergeEngine) -> None:
    a, b = (str(engine.expert_paths[n]) for n in "ab")
    weighted = [{"model": p, "parameters": {"weight": 0.5}} for p in (a, b)]
    with pytest.raises(MergeError, match="nuslerp without 'base_model' merges whole models"):
        recipe_from_mergekit({"merge_method": "nuslerp", "models": weighted}, engine.layout, _expert_of(engine))
    three = [*weighted, {"model": "c", "parameters": {"weight": 0.5}}]
    config = {"merge_method": "nuslerp", "base_model": str(engine.base_path), "models": three}
    with pytest.raises(MergeError, match="nuslerp merges exactly 2 model.* the config lists 3"):
        recipe_from_mergekit(config, engine.layout, lambda ref: _expert_of(engine)(ref) or ("c" if ref == "c" else None))
    config = {"merge_method": "model_stock", "base_model": str(engine.base_path), "models": [{"model": a}],
              "parameters": {"filter_wise": True}}
    with pytest.raises(MergeError, match="model_stock merges at least 2"):
        recipe_from_mergekit(config, engine.layout, _expert_of(engine))
    config["models"] = [{"model": a}, {"model": b}]
    _, notes = recipe_from_mergekit(config, engine.layout, _expert_of(engine))
    assert notes == ["filter_wise: True is not expressible: evomerge's model_stock is mergekit's with filter_wise: False"]


def _mergekit_linear(engine: MergeEngine, config: dict, name: str, t: float) -> torch.Tensor:
    """mergekit's linear at one tensor: the models' weights averaged (normalize) or summed."""
    tensors = {str(engine.base_path): engine.base_tensor(name).float()}
    for expert, path in engine.expert_paths.items():
        tensors[str(path)] = engine.base_tensor(name).float() + engine.task_vector(expert, name).float()
    weights = [mergekit_setting(name, entry["parameters"]["weight"], t, validate=float) for entry in config["models"]]
    total = sum(w * tensors[entry["model"]] for w, entry in zip(weights, config["models"]))
    return total / sum(weights) if config.get("parameters", {}).get("normalize", True) else total


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_listing_the_base_averages_it_in(normalize: bool, engine: MergeEngine) -> None:
    """`models: [base: 0.5, a: [0.2, 0.6], b: 0.3]` is mergekit's average of the three models: read as
    task arithmetic with weights w / (sum of weights), the same merge; without normalize the base's
    term cannot be written, which a note says."""
    base, a, b = str(engine.base_path), str(engine.expert_paths["a"]), str(engine.expert_paths["b"])
    config = {"merge_method": "linear", "models": [
        {"model": base, "parameters": {"weight": 0.5}},
        {"model": a, "parameters": {"weight": [0.2, 0.6]}},
        {"model": b, "parameters": {"weight": 0.3}},
    ], "parameters": {"normalize": normalize}}
    recipe, notes = recipe_from_mergekit(config, engine.layout, _expert_of(engine), is_base=lambda ref: ref == base)
    merged = engine.merged_state(recipe)
    if not normalize:
        assert any("base model's linear weight is dropped" in n for n in notes), notes
        return
    assert {r.method for r in recipe.rules} == {"task_arithmetic"}
    assert any("read as task_arithmetic" in n for n in notes), notes
    layers = engine.layout.num_layers
    for name, slot in engine.layout.slots.items():
        t = slot.layer / (layers - 1) if isinstance(slot.layer, int) else 0.0
        torch.testing.assert_close(merged[name].float(), _mergekit_linear(engine, config, name, t), rtol=1e-5, atol=1e-6, msg=name)
    # without the base listed, nothing changes: evomerge's linear over the experts
    config["models"] = config["models"][1:]
    recipe, notes = recipe_from_mergekit(config, engine.layout, _expert_of(engine), is_base=lambda ref: ref == base)
    assert {r.method for r in recipe.rules} == {"linear"} and notes == []


def test_non_finite_values_and_another_base_are_said(engine: MergeEngine) -> None:
    a, b = (str(engine.expert_paths[n]) for n in "ab")
    base = str(engine.base_path)
    for weight in (float("nan"), [0.2, float("inf")]):
        config = {"merge_method": "task_arithmetic", "base_model": base,
                  "models": [{"model": a, "parameters": {"weight": weight}}, {"model": b, "parameters": {"weight": 0.5}}]}
        with pytest.raises(MergeError, match="not a finite number"):
            recipe_from_mergekit(config, engine.layout, _expert_of(engine), is_base=lambda ref: ref == base)
    config = {"merge_method": "task_arithmetic", "base_model": "/elsewhere/other-base",
              "models": [{"model": a, "parameters": {"weight": 0.5}}]}
    _, notes = recipe_from_mergekit(config, engine.layout, _expert_of(engine), is_base=lambda ref: ref == base)
    assert notes == ["base_model '/elsewhere/other-base' is not the spec's base: the merge is of the task vectors over the spec's base"]
