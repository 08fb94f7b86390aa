"""MergeRecipe: JSON round trip, last-matching-rule resolution, one-line validation errors."""

from __future__ import annotations

import pytest

from evomerge.merge import ExpertParams, GroupRule, MergeError, MergeRecipe


def test_json_round_trip_keeps_every_field() -> None:
    recipe = MergeRecipe(rules=[
        GroupRule(method="dare_ties", experts={"m": ExpertParams(weight=-0.5, density=0.3)}),
        GroupRule(layers=[0, 3, "embed"], kinds=["attention", "embedding"], method="della", experts={"m": ExpertParams(epsilon=0.1)}),
    ], normalize=False, lambda_=1.3, rescale="paper", draws="mergekit", pruning="approximate", lora_mode="adapter",
        seed=11, trial=42)
    text = recipe.to_json()
    assert '"lambda":1.3' in text
    assert MergeRecipe.from_json(text) == recipe


def test_last_matching_rule_wins_and_unmatched_keeps_base() -> None:
    recipe = MergeRecipe(rules=[
        GroupRule(kinds=["attention", "mlp"], method="ties", experts={"a": ExpertParams()}),
        GroupRule(layers=[2], method="linear", experts={"a": ExpertParams()}),
        GroupRule(layers=[2], kinds=["mlp"], method="dare_ties", experts={"a": ExpertParams()}),
    ])
    assert recipe.rule_for(0, "mlp").method == "ties"
    assert recipe.rule_for(2, "attention").method == "linear"
    assert recipe.rule_for(2, "mlp").method == "dare_ties"
    assert recipe.rule_for(2, "norm").method == "linear"
    assert recipe.rule_for("embed", "embedding") is None


def test_validation_errors_name_rule_and_expert() -> None:
    bad = {"rules": [{"method": "ties", "experts": {"a": {}}}, {"method": "ties", "experts": {"math": {"density": 1.5}}}]}
    with pytest.raises(MergeError, match=r"^recipe rules\[1\] expert 'math' density=1.5: Input should be less than or equal to 1$"):
        MergeRecipe.from_dict(bad)
    with pytest.raises(MergeError, match="recipe rules: Value error, a recipe needs at least one rule"):
        MergeRecipe.from_json('{"rules": []}')


@pytest.mark.parametrize("recipe, fragment", [
    ({"rules": [{"method": "linear", "experts": {"a": {"weight": 0.5}}}], "lambda": 0.5}, "method 'linear' ignores lambda=0.5"),
    ({"rules": [{"method": "slerp", "t": 0.3, "experts": {"a": {}}}], "lambda": 2.0}, "method 'slerp' ignores lambda=2.0"),
    ({"rules": [{"method": "task_arithmetic", "t": 0.3, "experts": {"a": {}}}]}, "method 'task_arithmetic' ignores t=0.3"),
    ({"rules": [{"method": "ties", "experts": {"a": {"gamma": 0.1}}}]}, "expert 'a' ignores gamma=0.1"),
    ({"rules": [{"method": "linear", "experts": {"a": {"density": 0.5}}}]}, "expert 'a' ignores density=0.5"),
    ({"rules": [{"method": "ties", "experts": {"a": {}}}], "rescale": "paper"}, "ignores rescale='paper'"),
])
def test_options_the_method_ignores_are_refused_in_one_line(recipe: dict, fragment: str) -> None:
    with pytest.raises(MergeError) as info:
        MergeRecipe.from_dict(recipe)
    message = str(info.value)
    assert fragment in message and "\n" not in message
