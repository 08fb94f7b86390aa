"""Baselines every search should beat: uniform random search over the space, and the grid over
global task-arithmetic and TIES coefficients that users try by hand.

Both run behind the coordinator, so they checkpoint, resume and are recorded like any optimizer.
"""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from optuna.distributions import CategoricalDistribution, FloatDistribution

from evomerge.merge import ExpertParams, GroupRule, MergeRecipe

from ._base import genome_distributions, method_distributions
from ._coordinator import CheckpointStore, CoordinatedOptimizer, Proposal

if TYPE_CHECKING:
    from .._space import SearchSpace


class RandomSearch(CoordinatedOptimizer):
    """Genomes drawn uniformly in the space's box (numpy PCG64, seeded by the run seed); under a
    method choice, a method uniformly and then its parameters in its box."""

    name = "random"

    def _start(self, space: "SearchSpace", seed: int, budget: int | None, batch_size: int) -> Any:
        return np.random.default_rng(seed)

    def _propose(self, space: "SearchSpace") -> tuple[Any, Proposal]:
        if space.categorical:  # a method uniformly, then its parameters uniformly in its box
            method = space.methods[int(self._backend.integers(len(space.methods)))]
            sub = space.sub(method)
            x = self._backend.uniform(*sub.bounds)
            params = {"method": method, **sub.describe(x)}
            return None, Proposal(params=params, distributions=method_distributions(space, method))
        low, high = space.bounds
        x = self._backend.uniform(low, high)
        return None, Proposal(params=space.describe(x), distributions=genome_distributions(space), x=x)

    def _observe(self, token: Any, losses: np.ndarray | None) -> None:
        """Random search learns nothing."""


class GridSearch(CoordinatedOptimizer):
    """Every combination of method x shared weight (x density for TIES), one global rule each: the
    hand-tuning baseline (docs/search.md). ``normalize=False``, so the weight is the task-arithmetic
    scaling coefficient (normalized, equal weights would cancel out). The recipes lie outside most
    spaces: trials hold ``grid.method``, ``grid.weight``, ``grid.density`` (`recipe`). Finite."""

    name = "grid"

    def __init__(
        self,
        *,
        methods: Sequence[str] = ("task_arithmetic", "ties"),
        weights: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0),
        densities: Sequence[float] = (0.2, 0.5, 0.8),
        checkpoint: str | os.PathLike[str] | CheckpointStore | None = None,
    ) -> None:
        super().__init__(checkpoint=checkpoint)
        unknown = [m for m in methods if m not in ("task_arithmetic", "ties")]
        if unknown:
            raise ValueError(f"the grid baseline covers task_arithmetic and ties, not {unknown}")
        self.methods, self.weights, self.densities = tuple(methods), tuple(weights), tuple(densities)
        self._points: list[tuple[str, float, float]] = [
            (m, float(w), float(d) if m == "ties" else 1.0)
            for m in self.methods
            for w, d in itertools.product(self.weights, self.densities if m == "ties" else (1.0,))
        ]

    def __len__(self) -> int:
        return len(self._points)

    def _start(self, space: "SearchSpace", seed: int, budget: int | None, batch_size: int) -> Any:
        return {"next": 0}

    def _propose(self, space: "SearchSpace") -> tuple[Any, Proposal] | None:
        if self._backend["next"] >= len(self._points):
            return None
        method, weight, density = self._points[self._backend["next"]]
        self._backend["next"] += 1
        distributions = {
            "grid.method": CategoricalDistribution(self.methods),
            "grid.weight": FloatDistribution(min(self.weights), max(self.weights)),
            "grid.density": FloatDistribution(min(min(self.densities), 1.0), 1.0),
        }
        params = {"grid.method": method, "grid.weight": weight, "grid.density": density}
        return None, Proposal(params=params, distributions=distributions)

    def recipe(self, space: "SearchSpace", params: dict[str, Any], *, seed: int, trial: int) -> MergeRecipe:
        """One global rule: the grid point's method, shared weight and density for every expert."""
        tpl = space.template
        expert = ExpertParams(weight=float(params["grid.weight"]), density=float(params["grid.density"]))
        return MergeRecipe(
            rules=[GroupRule(method=params["grid.method"], experts={e: expert for e in space.experts})],
            normalize=False, lambda_=tpl.lambda_, rescale=tpl.rescale, lora_mode=tpl.lora_mode, seed=seed, trial=trial,
        )

    def _observe(self, token: Any, losses: np.ndarray | None) -> None:
        """A grid does not adapt."""
