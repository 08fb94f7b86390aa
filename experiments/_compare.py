"""Held-out comparison: the best merges against the base, every single expert and the uniform grid.

A front chosen on calibration items can flatter itself, so the claim "the merge beats every
expert" is checked on the objectives' ``holdout`` sets, which the search never saw. Experts are
scored as recipes (task arithmetic with only that expert at weight 1, i.e. exactly the expert's
weights) through the same scorer, so every row of the table is measured the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from evomerge.merge import ExpertParams, GroupRule, MergeRecipe

from ._build import build_objectives
from ._spec import ExperimentSpec

if TYPE_CHECKING:
    from evomerge.objectives import Scorer


def single_model_recipes(experts: list[str]) -> dict[str, MergeRecipe]:
    """Recipes that reproduce the base (weight 0) and each expert alone (weight 1)."""
    def only(name: str, weight: float) -> MergeRecipe:
        rule = GroupRule(method="task_arithmetic", experts={name: ExpertParams(weight=weight)})
        return MergeRecipe(rules=[rule], normalize=False)

    return {"base": only(experts[0], 0.0), **{f"expert:{e}": only(e, 1.0) for e in experts}}


def holdout_scores(
    spec: ExperimentSpec, scorer: "Scorer", candidates: Mapping[str, MergeRecipe]
) -> dict[str, dict[str, float]]:
    """Objective values of each candidate on the held-out sets (metric objectives with a holdout),
    scored by the run's own scorer (`Scorer.scoring`)."""
    out: dict[str, dict[str, float]] = {}
    with scorer.scoring(build_objectives(spec, holdout=True)):
        for label, recipe in candidates.items():
            evaluation = scorer.evaluate(recipe)
            out[label] = {} if evaluation.failed else dict(evaluation.values)
    return out

