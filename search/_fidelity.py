"""Multi-fidelity evaluation: asynchronous successive halving over calibration items.

Calibration scores are noisy, and the top of many noisy scores overestimates (the winner's curse):
a candidate is scored on a few items first and continued in the live model (`Scorer.extend`) to
more while it ranks in the top ``1/eta`` of its rung (ASHA's rule, decided at once; docs/search.md,
"Multi-fidelity search"). The optimizer is told the values at the highest rung reached (unbiased,
noisier: no pruning API needed, which optuna lacks for several objectives); only the top rung
(``full``) enters the Pareto front. Rung statistics are read from the ledger at every decision, so
a resumed run, or another worker, continues them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from optuna.trial import FrozenTrial, TrialState

FIDELITY_ATTR = "fidelity"
"""The trial user attribute that holds a trial's rung record."""


@dataclass(frozen=True)
class Fidelity:
    """Successive-halving settings: ``rungs`` (items per calibration set, increasing), ``eta``
    (the fraction ``1/eta`` that goes on) and ``score`` (objective values -> the ranking scalar,
    higher is better)."""

    rungs: tuple[int, ...]
    eta: int
    score: Callable[[Mapping[str, float]], float]

    def __post_init__(self) -> None:
        if len(self.rungs) < 2 or any(r < 1 for r in self.rungs) or list(self.rungs) != sorted(set(self.rungs)):
            raise ValueError(f"fidelity rungs must be at least two increasing positive item counts, got {list(self.rungs)}")
        if self.eta < 2:
            raise ValueError(f"fidelity eta must be at least 2, got {self.eta}")

    def promote(self, scalar: float, peers: Sequence[float]) -> bool:
        """Whether a candidate with ``scalar`` at a rung goes on, given the scalars of every
        candidate that completed that rung, its own included: its rank (ties go to the earlier
        candidates) is within the top ``max(1, len(peers) // eta)``."""
        better = sum(1 for p in peers if p >= scalar) - 1  # the others at least as good; it is among the peers
        return better < max(1, len(peers) // self.eta)


def rung_scalars(trials: Sequence[FrozenTrial], rung: int) -> list[float]:
    """The scalars at ``rung`` of every completed trial of the study that reached it."""
    grades = [t.user_attrs.get(FIDELITY_ATTR) for t in trials if t.state == TrialState.COMPLETE]
    return [float(g["scalars"][rung]) for g in grades if g and len(g["scalars"]) > rung]


def items_spent(trials: Sequence[FrozenTrial]) -> int:
    """Calibration items the graded (complete) trials of a study cost."""
    grades = [t.user_attrs.get(FIDELITY_ATTR) for t in trials if t.state == TrialState.COMPLETE]
    return sum(int(g["scored"]) for g in grades if g)


def full_fidelity(grade: Mapping[str, Any] | None) -> bool:
    """Whether values graded ``grade`` (a trial's ``fidelity`` attribute, None without rungs) are at
    the top fidelity, so the trial may enter the Pareto front."""
    return bool((grade or {}).get("full", True))


def grade_record(fidelity: Fidelity, rung: int, scalars: list[float], peers: list[int], scored: int) -> dict[str, Any]:
    """The ``fidelity`` user attribute of a trial that stopped at ``rung``."""
    return {"rung": rung, "items": fidelity.rungs[rung], "full": rung == len(fidelity.rungs) - 1, "scored": scored,
            "scalars": scalars, "peers": peers}
