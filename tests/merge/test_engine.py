"""In-place merging: equality with an out-of-place reference, determinism, stats, recipe errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge import ExpertParams, GroupRule, MergeEngine, MergeError, MergeRecipe
from evomerge.merge.methods import MagnitudeTable, MethodOptions, get_method, mask_generator


def _state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def mixed_recipe(method: str = "ties", trial: int = 0) -> MergeRecipe:
    """A global rule plus per-layer / per-kind overrides, some leaving tensors at the base."""
    return MergeRecipe(rules=[
        GroupRule(method=method, experts={"a": ExpertParams(weight=0.6, density=0.5), "b": ExpertParams(weight=0.4, density=0.7)}),
        GroupRule(layers=[1], kinds=["mlp"], method=method,
                  experts={"a": ExpertParams(weight=1.0, density=0.2), "b": ExpertParams(weight=0.3, density=0.9),
                           "c": ExpertParams(weight=-0.5, density=0.4)}),
        GroupRule(layers=[2, "head"], kinds=["attention", "head"], method="task_arithmetic",
                  experts={"c": ExpertParams(weight=0.8)}),
    ], normalize=True, seed=7, trial=trial)


def reference_merge(recipe: MergeRecipe, paths: dict[str, Path], layout) -> dict[str, torch.Tensor]:
    """Out of place: full state dicts in memory, deltas recomputed, the same methods called."""
    base = _state(paths["base"])
    experts = {e: _state(paths[e]) for e in ("a", "b", "c")}
    result = {}
    for name, slot in layout.slots.items():
        rule = recipe.rule_for(slot.layer, slot.kind)
        if rule is None:
            result[name] = base[name]
            continue
        method = get_method(rule.method)
        deltas = [experts[e][name] - base[name] for e in rule.experts]
        # the engine's contract: tables name their task vector, options carry the run seed (DARE's field)
        tables = [MagnitudeTable.build(d, identity=f"{e}\x1f{name}") for e, d in zip(rule.experts, deltas)]
        gen = mask_generator(recipe.seed, recipe.trial, name, torch.device("cpu")) if method.is_random else None
        out = torch.empty(base[name].shape, dtype=torch.float32)
        method.merge(out, deltas, list(rule.experts.values()), base=base[name],
                     options=MethodOptions(normalize=recipe.normalize, lambda_=recipe.lambda_, rescale=recipe.rescale, t=rule.t,
                                           seed=recipe.seed),
                     tables=tables, generator=gen)
        result[name] = base[name] + out
    return result


@pytest.fixture(scope="module")
def engine(llama_family: dict[str, Path]) -> MergeEngine:
    return MergeEngine.load(llama_family["base"], {e: llama_family[e] for e in ("a", "b", "c")}, progress=False)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_apply_in_place_equals_out_of_place_reference(engine: MergeEngine, llama_family: dict[str, Path], method: str) -> None:
    recipe = mixed_recipe(method)
    model = engine.new_target_model()
    params = dict(model.named_parameters())
    before = {n: p.data_ptr() for n, p in params.items()}
    engine.apply(recipe, model)
    expected = reference_merge(recipe, llama_family, engine.layout)
    for name in engine.layout.slots:
        assert torch.equal(params[name], expected[name]), name
        assert params[name].data_ptr() == before[name]  # written in place, no new storage
    assert engine.new_target_model() is model


def test_untouched_tensors_return_to_base_and_stats_count_changes(engine: MergeEngine) -> None:
    target = {n: torch.zeros_like(engine.base_tensor(n)) for n in engine.layout.slots}
    only_mlp = MergeRecipe(rules=[GroupRule(layers=[0], kinds=["mlp"], method="task_arithmetic",
                                             experts={"a": ExpertParams(weight=1.0)})], normalize=False)
    stats = engine.apply(only_mlp, target)
    changed = 0
    l1 = 0.0
    for name, slot in engine.layout.slots.items():
        delta = target[name] - engine.base_tensor(name)
        if slot.layer == 0 and slot.kind == "mlp":
            changed += int(torch.count_nonzero(delta))
            l1 += float(delta.abs().sum())
        else:
            assert torch.equal(target[name], engine.base_tensor(name)), name
    assert stats.changed_params == changed > 0
    assert stats.kept_fraction == pytest.approx(changed / engine.num_params)
    assert stats.l1_distance == pytest.approx(l1, rel=1e-4)
    quiet = engine.apply(only_mlp, target, stats=False)
    assert quiet.changed_params is None and quiet.seconds >= 0


def test_random_masks_are_reproducible_across_applies_and_engines(engine: MergeEngine, llama_family: dict[str, Path]) -> None:
    recipe = mixed_recipe("dare_ties", trial=3)
    first = {n: t.clone() for n, t in engine.merged_state(recipe).items()}
    again = engine.merged_state(recipe)
    fresh = MergeEngine.load(llama_family["base"], {e: llama_family[e] for e in ("a", "b", "c")}, progress=False)
    other = fresh.merged_state(recipe)
    different_trial = engine.merged_state(mixed_recipe("dare_ties", trial=4))
    for name in first:
        assert torch.equal(first[name], again[name]) and torch.equal(first[name], other[name]), name
    assert any(not torch.equal(first[n], different_trial[n]) for n in first)


def test_recipe_errors_name_the_rule_and_culprit(engine: MergeEngine) -> None:
    target = engine.new_target_model()
    bad_expert = MergeRecipe(rules=[GroupRule(method="ties", experts={"zzz": ExpertParams()})])
    with pytest.raises(MergeError, match=r"rule 0: unknown expert 'zzz'.*\['a', 'b', 'c'\]"):
        engine.apply(bad_expert, target)
    bad_method = MergeRecipe(rules=[GroupRule(method="ties", experts={"a": ExpertParams()}),
                                    GroupRule(method="nonesuch", experts={"a": ExpertParams()})])
    with pytest.raises(MergeError, match=r"rule 1: .*nonesuch"):
        engine.apply(bad_method, target)
    two_for_slerp = MergeRecipe(rules=[GroupRule(method="slerp", t=0.5, experts={"a": ExpertParams(), "b": ExpertParams()})])
    with pytest.raises(MergeError, match=r"rule 0: method 'slerp' takes exactly 1 expert\(s\), got 2 \(a, b\)"):
        engine.apply(two_for_slerp, target)
    della = MergeRecipe(rules=[GroupRule(method="della", experts={"a": ExpertParams(density=0.95, epsilon=0.1)})])
    with pytest.raises(MergeError, match=r"tensor [\w.]+, method 'della': DELLA needs density - epsilon > 0"):
        engine.apply(della, target)
    with pytest.raises(MergeError, match="target lacks tensor"):
        engine.apply(mixed_recipe(), {})
