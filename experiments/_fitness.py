"""What the optimizer is told: the objective list, its scalarization, the L1 penalty, constraints.

Evo-Merging and LoraHub add ``lambda x mean |x|`` over the genome to the fitness. The penalty is
recorded as an objective of its own (``l1``, minimized) and weighted into the scalarization, so
the ledger shows the raw task losses and the penalty separately while the optimizer sees their
weighted sum, exactly as the papers define it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from ._spec import ConstraintSpec, ExperimentSpec, OptimizerSpec

if TYPE_CHECKING:
    from evomerge.merge import MergeRecipe
    from evomerge.objectives import Evaluation, Scorer
    from evomerge.search import Scalarization, SearchSpace

L1_OBJECTIVE = "l1"
"""Name of the genome-penalty objective (mean |x| over the searched coefficients)."""


@dataclass(frozen=True)
class LedgerObjective:
    """Name and direction, what `evomerge.search.Ledger` needs of an objective, and whether it is
    a cost (read from the merge statistics or the genome, not scored on a task)."""

    name: str
    direction: str
    cost: bool = False


def ledger_objectives(spec: ExperimentSpec, optimizer: OptimizerSpec) -> list[LedgerObjective]:
    """The spec's objectives (directions resolved) plus ``l1`` when the optimizer is penalized."""
    from evomerge.objectives import COSTS, METRICS, LmEvalTask, lm_eval_direction

    out = []
    for o in spec.objectives:
        if o.direction is not None:
            direction = o.direction
        elif o.lm_eval is not None:
            direction = lm_eval_direction(LmEvalTask(**o.lm_eval.model_dump()))
        else:
            direction = "minimize" if o.metric in COSTS else METRICS[o.metric][1]
        out.append(LedgerObjective(o.name, direction, cost=o.metric in COSTS))
    if optimizer.l1_penalty > 0:
        out.append(LedgerObjective(L1_OBJECTIVE, "minimize", cost=True))
    return out


def _weights(objectives: Sequence[LedgerObjective], optimizer: OptimizerSpec) -> list[float]:
    """One weight per objective: the spec's, else the mean over the task objectives (issue 16: a
    cost such as the kept fraction, folded in with an equal weight, pulled single-objective
    searches towards sparse merges that nobody asked for); costs count only when weighted."""
    if optimizer.weights is not None:
        weights = [optimizer.weights.get(o.name, 0.0) for o in objectives]
    else:
        tasks = [not o.cost for o in objectives]
        if not any(tasks):  # nothing but costs: their mean is the only sensible fitness
            tasks = [o.name != L1_OBJECTIVE for o in objectives]
        weights = [1.0 / sum(tasks) if t else 0.0 for t in tasks]
    if optimizer.l1_penalty > 0:
        weights[-1] = optimizer.l1_penalty
    return weights


def scalarization(objectives: Sequence[LedgerObjective], optimizer: OptimizerSpec) -> "Scalarization | None":
    """The weighted sum the optimizer sees, or None when it sees the objective vector."""
    from evomerge.search import Scalarization

    if not optimizer.scalarized:
        return None
    return Scalarization(weights=tuple(_weights(objectives, optimizer)))


def describe_scalar(objectives: Sequence[LedgerObjective], optimizer: OptimizerSpec) -> str | None:
    """The one line the CLI prints at a stage's start, e.g. ``optimizing: mean(arith, rev)
    (maximize); costs not weighted: kept``; None for optimizers that see the objective vector."""
    if not optimizer.scalarized:
        return None
    weights = _weights(objectives, optimizer)
    used = [(o, w) for o, w in zip(objectives, weights) if w != 0]
    unweighted = [o.name for o, w in zip(objectives, weights) if w == 0 and o.cost]
    ignored = [o.name for o, w in zip(objectives, weights) if w == 0 and not o.cost]
    equal = len({w for _, w in used}) == 1
    directions = {o.direction for o, _ in used}
    if equal and len(directions) == 1:
        names = ", ".join(o.name for o, _ in used)
        text = f"{names if len(used) == 1 else f'mean({names})'} ({directions.pop()})"
    else:  # a weighted sum of losses: maximized objectives enter negated
        terms = [f"{w:g}*{'-' if o.direction == 'maximize' else ''}{o.name}" for o, w in used]
        text = f"{' + '.join(terms)} (minimize)"
    notes = [f"costs not weighted: {', '.join(unweighted)}"] if unweighted else []
    notes += [f"not weighted: {', '.join(ignored)}"] if ignored else []
    return "; ".join([f"optimizing: {text}", *notes])


def promotion_score(objectives: Sequence[LedgerObjective], optimizer: OptimizerSpec) -> "Callable[[Mapping[str, float]], float]":
    """What ranks a candidate at a rung of multi-fidelity search (higher is better): minus the
    optimizer's scalar loss (`_weights`: the spec's weights, else the mean of the task
    objectives), whether or not the optimizer itself sees a scalar."""
    from evomerge.search import Scalarization

    scalar = Scalarization(weights=tuple(_weights(objectives, optimizer)))
    names, directions = [o.name for o in objectives], [o.direction for o in objectives]

    def score(values: Mapping[str, float]) -> float:
        return -scalar([values.get(n, 0.0) for n in names], directions)  # type: ignore[arg-type]

    return score


class PenalizedScorer:
    """A scorer that adds ``l1`` = mean |genome| to every successful evaluation."""

    def __init__(self, scorer: "Scorer", space: "SearchSpace") -> None:
        self.scorer = scorer
        self.space = space

    def evaluate(self, recipe: "MergeRecipe", *, items: int | None = None) -> "Evaluation":
        evaluation = self.scorer.evaluate(recipe, items=items)
        if not evaluation.failed:
            evaluation.values[L1_OBJECTIVE] = float(np.mean(np.abs(self.space.encode(recipe)))) if self.space.dim else 0.0
        return evaluation

    def extend(self, evaluation: "Evaluation", items: int) -> "Evaluation":
        """The wrapped scorer's `extend`: the penalty (of the same genome) carries over with the
        values that are not scored on items."""
        return self.scorer.extend(evaluation, items)

    def items(self, items: int | None = None) -> int:
        return self.scorer.items(items)


def constraint_function(constraints: Sequence[ConstraintSpec]) -> "Callable[[Evaluation], list[float]] | None":
    """optuna's convention: one value per bound, feasible iff all <= 0."""
    if not constraints:
        return None

    def values(evaluation: "Evaluation") -> list[float]:
        out = []
        for c in constraints:
            v = evaluation.values[c.objective]
            if c.min is not None:
                out.append(c.min - v)
            if c.max is not None:
                out.append(v - c.max)
        return out

    return values
