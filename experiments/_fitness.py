"""What the optimizer is told: the objective list, its scalarization, the L1 penalty, constraints.

Evo-Merging and LoraHub add ``lambda x mean |x|`` over the genome to the fitness. The penalty is
recorded as an objective of its own (``l1``, minimized) and weighted into the scalarization, so
the ledger shows the raw task losses and the penalty separately while the optimizer sees their
weighted sum, exactly as the papers define it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

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
    """Name and direction, what `evomerge.search.Ledger` needs of an objective."""

    name: str
    direction: str


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
        out.append(LedgerObjective(o.name, direction))
    if optimizer.l1_penalty > 0:
        out.append(LedgerObjective(L1_OBJECTIVE, "minimize"))
    return out


def scalarization(objectives: Sequence[LedgerObjective], optimizer: OptimizerSpec) -> "Scalarization | None":
    """The weighted sum the optimizer sees, or None when it sees the objective vector."""
    from evomerge.search import Scalarization

    if not optimizer.scalarized:
        return None
    if optimizer.weights is None:
        n_scored = len(objectives) - (optimizer.l1_penalty > 0)
        weights = [1.0 / n_scored] * len(objectives)
    else:
        weights = [optimizer.weights.get(o.name, 0.0) for o in objectives]
    if optimizer.l1_penalty > 0:
        weights[-1] = optimizer.l1_penalty
    return Scalarization(weights=tuple(weights))


class PenalizedScorer:
    """A scorer that adds ``l1`` = mean |genome| to every successful evaluation."""

    def __init__(self, scorer: "Scorer", space: "SearchSpace") -> None:
        self.scorer = scorer
        self.space = space

    def evaluate(self, recipe: "MergeRecipe") -> "Evaluation":
        evaluation = self.scorer.evaluate(recipe)
        if not evaluation.failed:
            evaluation.values[L1_OBJECTIVE] = float(np.mean(np.abs(self.space.encode(recipe)))) if self.space.dim else 0.0
        return evaluation


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
