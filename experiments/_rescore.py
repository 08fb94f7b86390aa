"""Re-scoring the pick: the search's best few trials scored again on more calibration items.

A search scores each candidate on a small subset of the calibration items (``size``), so its best
score is partly luck: the maximum of many noisy scores overestimates, and the trial it names is
often not the best merge (the winner's curse). Before a run reports its pick, the ``top`` trials
by mean task score are re-scored on ``size`` items of the same calibration sets (every item when
unset) and the pick is the best by that higher-fidelity score. It costs ``top`` evaluations on the
larger subset, a few percent of a search of a hundred or more trials; with no objective scored on
a subset there is nothing more to score, and nothing is re-scored.

The search's own ranking and ledger are untouched: the re-scored values are a separate record
(``comparison.json`` under ``rescored``, and the study's ``rescored`` user attribute).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from ._build import build_objectives
from ._spec import ExperimentSpec

if TYPE_CHECKING:
    from evomerge.merge import MergeRecipe
    from evomerge.objectives import Objective, Scorer


@dataclass(frozen=True)
class Rescored:
    """The re-scored trials (number -> objective values on the larger subsets) and the pick."""

    pick: int
    values: dict[int, dict[str, float]]
    items: int
    """Calibration items per re-scored candidate (all objectives together)."""

    def to_json(self) -> dict:
        return {"pick": self.pick, "items": self.items, "trials": {str(n): v for n, v in self.values.items()}}


def top_trials(scores: Mapping[int, float], top: int) -> list[int]:
    """The ``top`` trial numbers by score (higher is better; ties to the earlier trial)."""
    return sorted(scores, key=lambda n: (-scores[n], n))[:top]


def rescore(
    scorer: "Scorer", recipes: Mapping[int, "MergeRecipe"], score: Callable[[Mapping[str, float]], float], items: int,
) -> Rescored | None:
    """Each recipe scored by ``scorer``; the pick is the best by ``score`` (ties to the earlier
    trial). None when every evaluation failed."""
    values: dict[int, dict[str, float]] = {}
    for number, recipe in recipes.items():
        evaluation = scorer.evaluate(recipe)
        if not evaluation.failed:
            values[number] = dict(evaluation.values)
    if not values:
        return None
    pick = max(values, key=lambda n: (score(values[n]), -n))
    return Rescored(pick=pick, values=values, items=items)


def rescore_objectives(spec: ExperimentSpec) -> list["Objective"] | None:
    """The spec's objectives with every calibration subset widened to ``rescore.size`` items
    (all when unset); None when re-scoring is off or no objective is scored on a subset."""
    options = spec.rescore
    subsetted = [o for o in spec.objectives if o.data is not None and o.size is not None]
    if options.top == 0 or not subsetted:
        return None
    if options.size is not None and all(o.size >= options.size for o in subsetted):  # type: ignore[operator]
        return None
    wider = [o.model_copy(update={"size": options.size}) if o.size is not None else o for o in spec.objectives]
    return build_objectives(spec.model_copy(update={"objectives": wider}))  # the search's own seeding of subsets


def rescore_run(
    spec: ExperimentSpec, scorer: "Scorer", recipes: Mapping[int, "MergeRecipe"],
    score: Callable[[Mapping[str, float]], float],
) -> Rescored | None:
    """`rescore` of a run's top trials by the run's scorer over `rescore_objectives` (None: nothing to do)."""
    objectives = rescore_objectives(spec)
    if objectives is None or not recipes:
        return None
    with scorer.scoring(objectives):
        return rescore(scorer, recipes, score, items=calibration_items(objectives))


def calibration_items(objectives: Sequence["Objective"]) -> int:
    """Items one evaluation scores (the cost unit of the scoring budget)."""
    return sum(len(o.calibration) for o in objectives if o.calibration is not None)
