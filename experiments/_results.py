"""`RunView`: a read-only picture of a run folder for ``status``, ``front``, ``report`` and the demo.

Everything here is computed from what the run folder stores (the ledger's trials, the run state,
the held-out comparison), never from a live search, so the same view serves a finished run, a run
in progress in another process, and a run copied from a GPU box to a laptop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ._rundir import read_json_object
from ._spec import ExperimentSpec

if TYPE_CHECKING:
    from evomerge.search import TrialRecord


def format_value(value: float | None, digits: int = 4) -> str:
    """Compact number for tables (``-`` for missing, no trailing noise)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@dataclass(frozen=True)
class Reference:
    """A labelled point to compare against (an expert, the grid's best) in objective space."""

    name: str
    values: dict[str, float]


@dataclass
class RunView:
    name: str
    spec: ExperimentSpec
    run_dir: Path
    stage: str
    objectives: list[tuple[str, str]]
    """(name, direction) as the ledger records them (the spec's, plus ``l1`` when penalized)."""
    trials: list[TrialRecord]
    """The stage's trials (interrupted attempts left out: their re-run is the real trial)."""
    front: list[int]
    hv_history: list[tuple[int, float]]
    reference_point: list[float] | None
    state: dict[str, Any]
    references: list[Reference] = field(default_factory=list)
    comparison: dict[str, Any] | None = None

    # ------------------------------------------------------------------ basics
    @property
    def objective_names(self) -> list[str]:
        return [name for name, _ in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [direction for _, direction in self.objectives]

    @property
    def task_objectives(self) -> list[str]:
        """Objectives measured on data (the ones whose mean is "the average of the skills")."""
        from evomerge.objectives import COSTS

        return [o.name for o in self.spec.objectives if o.metric not in COSTS]

    @property
    def completed(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.state == "complete"]

    @property
    def failed(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.state == "failed"]

    def trial(self, number: int) -> TrialRecord | None:
        return next((t for t in self.trials if t.number == number), None)

    @property
    def hypervolume(self) -> float:
        return self.hv_history[-1][1] if self.hv_history else 0.0

    def mean_score(self, trial: TrialRecord) -> float:
        """Mean of the task objectives, each as "higher is better" (minimized ones negated)."""
        return self.mean_of(trial.values)

    def mean_of(self, values: Mapping[str, float]) -> float:
        """`mean_score` of objective values (a trial's, or its re-scored ones)."""
        signs = {n: (1.0 if d == "maximize" else -1.0) for n, d in zip(self.objective_names, self.directions)}
        vals = [signs[n] * values[n] for n in self.task_objectives if n in values]
        return float(np.mean(vals)) if vals else float("nan")

    def pick_pool(self) -> list[TrialRecord]:
        """Where the headline candidate is chosen: the completed front members (all completed
        trials when the front is empty); none without task objectives."""
        done = [t for t in self.completed if self.task_objectives]
        return [t for t in done if t.number in set(self.front)] or done

    def best_mean_trial(self) -> int | None:
        """The completed trial with the best mean task score (the headline candidate)."""
        pool = self.pick_pool()
        return max(pool, key=lambda t: (self.mean_score(t), -t.number)).number if pool else None

    def best_per_objective(self) -> dict[str, tuple[float, int]]:
        out: dict[str, tuple[float, int]] = {}
        for name, direction in zip(self.objective_names, self.directions):
            scored = [(t.values[name], t.number) for t in self.completed if name in t.values]
            if scored:
                sign = 1.0 if direction == "maximize" else -1.0
                out[name] = max(scored, key=lambda vn: (sign * vn[0], -vn[1]))
        return out

    # ------------------------------------------------------------------ progress
    @property
    def budget(self) -> dict[str, Any]:
        return dict(self.state.get("budgets", {}).get(self.stage, {}))

    @property
    def elapsed(self) -> float:
        """Search seconds spent in this stage, over all resumes."""
        return float(self.state.get("elapsed", {}).get(self.stage, 0.0))

    def eta_seconds(self) -> float | None:
        """Time left: the sooner of the evaluation budget (at the observed rate) and the wall clock."""
        budget = self.budget
        elapsed = self.elapsed
        n = len(self.completed) + len(self.failed)
        limits = []
        if budget.get("evaluations") and n:
            limits.append(max(budget["evaluations"] - n, 0) * elapsed / n)
        if budget.get("wall_clock"):
            limits.append(max(budget["wall_clock"] - elapsed, 0.0))
        if self.state.get("status") == "done" or self.stage in self.state.get("stages_done", []):
            return 0.0
        return min(limits) if limits else None

    def summary(self) -> dict[str, str]:
        """Key figures for ``status`` and the report header."""
        budget = self.budget
        n = len(self.completed) + len(self.failed)
        total = budget.get("evaluations")
        rows = {
            "status": f"{self.state.get('status', 'unknown')}" + (f" (stage {self.stage})" if len(self.spec.resolved_stages()) > 1 else ""),
            "trials": f"{n}" + (f" / {total}" if total else "") + f" ({len(self.failed)} failed)",
            "elapsed": format_seconds(self.elapsed),
            "ETA": format_seconds(self.eta_seconds()),
            "front size": str(len(self.front)),
            "hypervolume": format_value(self.hypervolume),
        }
        for name, (value, number) in self.best_per_objective().items():
            rows[f"best {name}"] = f"{format_value(value)} (trial {number})"
        best = self.best_mean_trial()
        if best is not None:
            rows["best mean task score"] = f"{format_value(self.mean_score(self.trial(best)))} (trial {best})"
        if self.state.get("updated"):
            rows["updated"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.state["updated"]))
        return rows

    def front_rows(self) -> tuple[list[str], list[list[str]]]:
        """The front as a table: trial, each objective, mean task score."""
        header = ["trial", *self.objective_names, "mean task"]
        rows = []
        for number in self.front:
            t = self.trial(number)
            if t is None:
                continue
            rows.append([str(number), *(format_value(t.values.get(n)) for n in self.objective_names), format_value(self.mean_score(t))])
        return header, rows

    def comparison_rows(self) -> tuple[list[str], list[list[str]], set[int]]:
        """Held-out table: model, task objectives, their mean; the best row highlighted.

        The mean is shown when all compared objectives point the same way (accuracies, or losses).
        """
        assert self.comparison is not None
        names = self.comparison["objectives"]
        directions = {self.directions[self.objective_names.index(n)] for n in names}
        with_mean = len(directions) == 1
        header = ["model", *names] + (["mean"] if with_mean else [])
        rows, means = [], []
        for label, values in self.comparison["scores"].items():
            complete = bool(values) and all(n in values for n in names)
            mean = float(np.mean([values[n] for n in names])) if complete else float("nan")
            means.append(mean)
            rows.append([label, *(format_value(values.get(n), 3) for n in names)] + ([format_value(mean, 3)] if with_mean else []))
        finite = [m for m in means if math.isfinite(m)]
        if not (with_mean and finite):
            return header, rows, set()
        target = max(finite) if directions == {"maximize"} else min(finite)
        return header, rows, {i for i, m in enumerate(means) if m == target}


def read_json(path: Path) -> dict[str, Any]:
    """A run folder's JSON output (empty when absent); a damaged one is a one-line error."""
    return read_json_object(path, fix="delete it and rerun `evomerge resume` to write it again") if path.exists() else {}
