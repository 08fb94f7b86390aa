"""The optimizer interface the run loop talks to (docs/search.md, "Optimizers").

Every trial is claimed with ``study.ask``: an optuna sampler (the study's, set by ``bind``) fills
the genome itself; a coordinated optimizer proposes `Candidate`s that `search._queue` enqueues,
and is told raw objective values in the ledger's objective order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from evomerge.merge import MergeRecipe

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial, Trial

    from .._ledger import Ledger
    from .._space import SearchSpace


@dataclass(frozen=True)
class Failure:
    """A candidate whose evaluation failed; optimizers learn it as a bad result, not a crash."""

    reason: str


Result = Union[Sequence[float], Failure]


def trial_result(ledger: "Ledger", trial: "FrozenTrial") -> Result:
    """What a counted trial tells its optimizer: the raw objective values, or its `Failure`."""
    values = ledger.objective_values(trial)
    return values if values is not None else Failure(trial.user_attrs.get("failure") or "failed")


@dataclass
class Candidate:
    """One point a coordinated optimizer asked for; ``key`` (its id) is stable across a resume and
    becomes the recipe's ``trial``, so random masks of a re-evaluated candidate are the same."""

    key: int
    params: dict[str, Any]
    distributions: dict[str, BaseDistribution]
    x: np.ndarray | None = None
    """Genome in the space; None for the grid baseline's params (`GridSearch.recipe`) and a method
    choice's (`SearchSpace.decode_params`)."""


def genome_distributions(space: "SearchSpace") -> dict[str, BaseDistribution]:
    """One float distribution per genome coordinate, named like the space's parameters (a space
    with a method choice has no flat genome and raises ValueError)."""
    low, high = space.bounds
    return {n: FloatDistribution(float(lo), float(hi)) for n, lo, hi in zip(space.names, low, high)}


def method_distributions(space: "SearchSpace", method: str) -> dict[str, BaseDistribution]:
    """Under a method choice: ``method`` (categorical) and the float distributions of ``method``'s
    parameters, the params of one of its trials (`SearchSpace.decode_params`)."""
    return {"method": CategoricalDistribution(space.methods), **genome_distributions(space.sub(method))}


class Optimizer(ABC):
    """Proposes the trials of a ledger's study, and learns their results (see `search._loop`)."""

    name: str = "optimizer"

    @abstractmethod
    def bind(self, space: "SearchSpace", ledger: "Ledger", *, budget: int | None = None, batch_size: int = 1) -> None:
        """Attach to a space and ledger; on a ledger with trials, restore state and reconcile."""

    def ask_distributions(self, space: "SearchSpace") -> dict[str, BaseDistribution]:
        """What the run loop's ``study.ask`` passes: the genome, which the study's sampler fills
        (optuna samplers); a coordinated optimizer's queued trials carry their params (none)."""
        return genome_distributions(space)

    def suggest(self, space: "SearchSpace", trial: "Trial") -> None:
        """Draw what ``study.ask(ask_distributions)`` left to define-by-run (nothing here: the
        distributions, or a queued trial's params, are the whole trial)."""

    def recipe(self, space: "SearchSpace", params: dict[str, Any], *, seed: int, trial: int) -> MergeRecipe:
        """The recipe a trial with these params evaluates (``trial``: the key of its random masks)."""
        return space.decode_params(params, seed=seed, trial=trial)
