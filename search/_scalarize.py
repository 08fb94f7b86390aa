"""One loss from several objectives, for single-objective optimizers.

Every optimizer here minimizes, so each objective is first turned into a loss: ``v`` for
``minimize``, ``-v`` for ``maximize``. Two scalarizations, both with user weights:

* ``weighted_sum``: ``sum_i w_i * loss_i``. Simple and smooth, but only finds points on the convex
  part of the front.
* ``chebyshev``: ``max_i w_i * (loss_i - ideal_loss_i) + rho * sum_i w_i * (loss_i - ideal_loss_i)``
  (augmented, ``rho`` small). Reaches non-convex parts of the front too; ``ideal`` is given in
  objective units (e.g. 1.0 for an accuracy) and should be at least as good as any reachable value.

Objectives on very different scales should be weighted accordingly (e.g. 1/typical range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from ._pareto import Direction


def to_losses(values: Sequence[float], directions: Sequence[Direction]) -> np.ndarray:
    """Objective values as losses (maximized objectives negated)."""
    return np.array([v if d == "minimize" else -v for v, d in zip(values, directions)], dtype=float)


@dataclass(frozen=True)
class Scalarization:
    """A documented way to fold several objectives into one loss (lower is better)."""

    kind: Literal["weighted_sum", "chebyshev"] = "weighted_sum"
    weights: tuple[float, ...] | None = None
    """One per objective; None = equal weights."""
    ideal: tuple[float, ...] | None = None
    """Chebyshev only: ideal objective values (objective units); None = zeros."""
    rho: float = 1e-3
    """Chebyshev only: augmentation that breaks ties towards Pareto-optimal points."""

    def __post_init__(self) -> None:
        if self.kind not in ("weighted_sum", "chebyshev"):
            raise ValueError(f"scalarization must be 'weighted_sum' or 'chebyshev', got {self.kind!r}")
        if self.weights is not None and any(w < 0 for w in self.weights):
            raise ValueError("scalarization weights must be non-negative")

    def __call__(self, values: Sequence[float], directions: Sequence[Direction]) -> float:
        losses = to_losses(values, directions)
        weights = np.ones(len(losses)) if self.weights is None else np.asarray(self.weights, dtype=float)
        if len(weights) != len(losses):
            raise ValueError(f"{len(weights)} scalarization weights for {len(losses)} objectives")
        if self.kind == "weighted_sum":
            return float(weights @ losses)
        ideal = np.zeros(len(losses)) if self.ideal is None else to_losses(self.ideal, directions)
        gap = weights * (losses - ideal)
        return float(gap.max() + self.rho * gap.sum())

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "weights": self.weights, "ideal": self.ideal, "rho": self.rho}
