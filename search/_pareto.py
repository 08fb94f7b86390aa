"""Pareto front and hypervolume under mixed directions and constraints, through moocore.

moocore is exact and fast, and assumes minimization unless told which objectives to maximise;
we pass its ``maximise`` mask instead of flipping signs, so stored values keep their meaning.
Infeasible points (any constraint value > 0, optuna's convention) never reach the front and never
add hypervolume. The reference point is fixed for a run: hypervolumes of different moments (and of
a resumed run) are comparable only against the same point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import moocore
import numpy as np

Direction = Literal["maximize", "minimize"]


def _maximise(directions: Sequence[Direction]) -> list[bool]:
    bad = [d for d in directions if d not in ("maximize", "minimize")]
    if bad:
        raise ValueError(f"directions must be 'maximize' or 'minimize', got {bad}")
    return [d == "maximize" for d in directions]


def pareto_mask(points: np.ndarray, directions: Sequence[Direction]) -> np.ndarray:
    """Boolean mask of the non-dominated rows; of identical rows only the first is kept."""
    points = np.asarray(points, dtype=float)
    if points.size == 0:
        return np.zeros(len(points), dtype=bool)
    return np.asarray(moocore.is_nondominated(points, maximise=_maximise(directions), keep_weakly=False))


def hypervolume(points: np.ndarray, reference_point: Sequence[float], directions: Sequence[Direction]) -> float:
    """Volume dominated by ``points`` and bounded by ``reference_point``; points that do not
    strictly beat the reference in every objective add nothing."""
    points = np.asarray(points, dtype=float).reshape(-1, len(directions))
    if len(points) == 0:
        return 0.0
    return float(moocore.hypervolume(points, ref=np.asarray(reference_point, dtype=float), maximise=_maximise(directions)))


def default_reference_point(values: Sequence[float], directions: Sequence[Direction]) -> list[float]:
    """A reference point derived from the first feasible result: worse than it by max(|v|, 1) per
    objective. Used only when the user gives none; it is recorded in the ledger at once, so a
    resumed run keeps it. Give an explicit one to compare hypervolumes across runs."""
    return [
        float(v - max(abs(v), 1.0)) if d == "maximize" else float(v + max(abs(v), 1.0))
        for v, d in zip(values, directions)
    ]


@dataclass(frozen=True)
class ParetoPoint:
    """One member of the front: the ledger trial number and its objective values."""

    number: int
    values: tuple[float, ...]


class ParetoArchive:
    """Non-dominated feasible results of a run, and the hypervolume after every evaluation.

    >>> archive = ParetoArchive(["maximize", "minimize"], reference_point=[0.0, 10.0])
    >>> hv = archive.add(0, [0.5, 4.0]); hv = archive.add(1, [0.4, 5.0])  # 1 is dominated
    >>> [p.number for p in archive.front]
    [0]
    """

    def __init__(self, directions: Sequence[Direction], reference_point: Sequence[float] | None = None) -> None:
        self.directions: tuple[Direction, ...] = tuple(directions)
        # values times this sign are losses: lower is better in every objective
        self._sign = np.where(_maximise(self.directions), -1.0, 1.0)
        self._numbers: list[int] = []
        self._rows: list[np.ndarray] = []
        self._front_idx: list[int] = []
        self._front_losses = np.empty((0, len(self.directions)))
        self.history: list[tuple[int, float]] = []
        """(trial number, hypervolume after it) for every evaluation added, failures included."""
        self._hv = 0.0  # cached: the hypervolume changes only when the front does
        self.reference_point: list[float] | None = None
        if reference_point is not None:
            self.set_reference_point(reference_point)

    def set_reference_point(self, reference_point: Sequence[float]) -> None:
        if len(reference_point) != len(self.directions):
            raise ValueError(f"reference point has {len(reference_point)} values for {len(self.directions)} objectives")
        self.reference_point = [float(v) for v in reference_point]
        self._hv = self._compute_hypervolume()

    def add(self, number: int, values: Sequence[float] | None, *, feasible: bool = True) -> float:
        """Record one evaluation (``values`` None for a failed trial); returns the hypervolume after it."""
        if values is not None and feasible:
            row = np.asarray(values, dtype=float).reshape(-1)
            if len(row) != len(self.directions):
                raise ValueError(f"{len(row)} values for {len(self.directions)} objectives")
            if np.all(np.isfinite(row)):
                if self.reference_point is None:
                    self.set_reference_point(default_reference_point(row.tolist(), self.directions))
                self._numbers.append(number)
                self._rows.append(row)
                if self._update_front(len(self._rows) - 1, row * self._sign):
                    self._hv = self._compute_hypervolume()
        self.history.append((number, self._hv))
        return self._hv

    def _update_front(self, index: int, loss: np.ndarray) -> bool:
        """Put row ``index`` on the front unless a member weakly dominates it (of identical points
        the first stays), dropping the members it dominates; returns whether the front changed.
        Incremental: the new front is among the old one plus the new point."""
        front = self._front_losses
        if np.any(np.all(front <= loss, axis=1)):
            return False
        keep = ~np.all(loss <= front, axis=1)  # not equal to any member (checked above): dominated
        self._front_idx = [i for i, k in zip(self._front_idx, keep) if k] + [index]
        self._front_losses = np.vstack([front[keep], loss])
        return True

    @property
    def front(self) -> list[ParetoPoint]:
        """Front members, by trial number."""
        members = [ParetoPoint(self._numbers[i], tuple(self._rows[i].tolist())) for i in self._front_idx]
        return sorted(members, key=lambda p: p.number)

    @property
    def points(self) -> np.ndarray:
        """All feasible values added so far (rows), in order of addition."""
        return np.array(self._rows).reshape(-1, len(self.directions))

    def hypervolume(self) -> float:
        """Hypervolume of the current front (0 before any feasible point or without a reference)."""
        return self._hv

    def _compute_hypervolume(self) -> float:
        if self.reference_point is None or not self._front_idx:
            return 0.0
        return hypervolume(self._front_losses * self._sign, self.reference_point, self.directions)
