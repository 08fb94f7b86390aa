"""mergekit YAML read back as a recipe: per tensor, the values mergekit's own evaluate_setting gives."""

from __future__ import annotations

from pathlib import Path

import pytest
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
