"""The optimizer interface the run loop talks to.

An optimizer proposes `Candidate`s (``ask``) and learns their results (``tell``). Results are raw
objective values in the ledger's objective order; each adapter turns them into what its backend
wants (losses, a scalarized loss, nothing for optuna, which reads the study). ``bind`` attaches the
optimizer to a space and a ledger and restores its state when the ledger already holds trials.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution

from evomerge.merge import MergeRecipe

if TYPE_CHECKING:
    from .._durable import WriteBehind
    from .._ledger import Ledger
    from .._space import SearchSpace


@dataclass(frozen=True)
class Failure:
    """A candidate whose evaluation failed; optimizers learn it as a bad result, not a crash."""

    reason: str


Result = Union[Sequence[float], Failure]


@dataclass
class Candidate:
    """One point to evaluate.

    ``key`` is stable across a resume (coordinator id, or optuna trial number) and becomes the
    recipe's ``trial``, so random masks of a re-evaluated candidate are the same.
    """

    key: int
    params: dict[str, Any]
    distributions: dict[str, BaseDistribution]
    x: np.ndarray | None = None
    """Genome in the space; None for candidates that carry their own recipe (grid baseline)."""
    recipe: MergeRecipe | None = None
    trial: optuna.trial.Trial | None = field(default=None, repr=False)
    """Live optuna trial (native samplers); None for coordinated optimizers, whose trials are
    written to the ledger in one transaction when finished."""
    coordinated: bool = False


def genome_distributions(space: "SearchSpace") -> dict[str, BaseDistribution]:
    """One float distribution per genome coordinate, named like the space's parameters."""
    low, high = space.bounds
    return {n: FloatDistribution(float(lo), float(hi)) for n, lo, hi in zip(space.names, low, high)}


class Optimizer(ABC):
    """ask / tell over a `SearchSpace`, with its state kept next to the ledger."""

    name: str = "optimizer"

    @abstractmethod
    def bind(self, space: "SearchSpace", ledger: "Ledger", *, budget: int | None = None, batch_size: int = 1) -> None:
        """Attach to a space and ledger; on a ledger with trials, restore state and reconcile."""

    @abstractmethod
    def ask(self, n: int) -> list[Candidate]:
        """Up to ``n`` candidates; fewer (or none) when a finite generator is exhausted."""

    @abstractmethod
    def tell(self, candidate: Candidate, result: Result) -> None:
        """Learn a result; called after the ledger recorded the trial."""

    def save(self) -> None:
        """Persist the optimizer's state now (no-op where the ledger is the state); the run loop
        calls it when it stops."""

    def write_behind(self, queue: "WriteBehind | None") -> None:
        """Let ``ask`` queue its checkpoint write on ``queue`` (the run loop's background writer,
        which it waits for before writing a result); None: write at once. No-op without a
        checkpoint."""
