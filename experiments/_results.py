"""`RunView`: a read-only picture of a run folder for ``status``, ``front``, ``report`` and the demo.

Everything here is computed from what the run folder stores (the ledger's trials, the run state,
the held-out comparison), never from a live search, so the same view serves a finished run, a run
in progress in another process, and a run copied from a GPU box to a laptop.
"""

from __future__ import annotations

import math
import os
import socket
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
        """Objectives measured on data (costs such as ``kept_fraction`` are not skills)."""
        from evomerge.objectives import COSTS

        return [o.name for o in self.spec.objectives if o.metric not in COSTS]

    @property
    def task_groups(self) -> dict[str, list[str]]:
        """Task objectives by kind: ``score`` (maximized: accuracies, lm-eval metrics) and ``loss``
        (minimized). A mean is only taken within one kind: averaging an accuracy with a negated
        loss gives a number (``-2.125``) that means nothing."""
        direction = dict(self.objectives)
        groups: dict[str, list[str]] = {}
        for name in self.task_objectives:
            if name in direction:
                groups.setdefault("score" if direction[name] == "maximize" else "loss", []).append(name)
        return groups

    @property
    def headline_kind(self) -> str | None:
        """The kind whose mean ranks candidates: scores when there are any, else losses."""
        groups = self.task_groups
        return "score" if "score" in groups else ("loss" if "loss" in groups else None)

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

    def mean_of(self, trial: TrialRecord, kind: str) -> float:
        """Mean of the trial's task objectives of one kind (`task_groups`), in their own units."""
        vals = [trial.values[n] for n in self.task_groups.get(kind, []) if n in trial.values]
        return float(np.mean(vals)) if vals else float("nan")

    def headline(self, values: Mapping[str, float]) -> float:
        """The ranking score of objective values (a trial's, or its re-scored ones): the mean of
        the headline kind, higher is better (a mean loss negated)."""
        kind = self.headline_kind
        vals = [values[n] for n in self.task_groups.get(kind, []) if n in values] if kind else []
        return (1.0 if kind == "score" else -1.0) * float(np.mean(vals)) if vals else float("nan")

    def pick_pool(self) -> list[TrialRecord]:
        """Where the headline candidate is chosen: the completed front members (all completed
        trials when the front is empty); none without task objectives."""
        done = self.completed if self.headline_kind is not None else []
        return [t for t in done if t.number in set(self.front)] or done

    def best_mean_trial(self) -> int | None:
        """The completed trial with the best mean of the headline kind (the headline candidate):
        the highest mean score, or, for a run of losses only, the lowest mean loss."""
        kind = self.headline_kind
        done = self.completed
        if kind is None or not done:
            return None
        pool = [t for t in done if t.number in set(self.front)] or done
        sign = 1.0 if kind == "score" else -1.0
        return max(pool, key=lambda t: (sign * self.mean_of(t, kind), -t.number)).number

    @property
    def constant_objectives(self) -> dict[str, float]:
        """Objectives whose value never changed over the completed trials (name -> the value): a
        plot of them shows nothing, so the report gives each one line instead of a panel."""
        done = self.completed
        if len(done) < 2:
            return {}
        return {n: done[0].values[n] for n in self.objective_names
                if all(n in t.values and t.values[n] == done[0].values[n] for t in done)}

    @property
    def varying_objectives(self) -> list[tuple[str, str]]:
        """(name, direction) of the objectives worth a panel (not `constant_objectives`)."""
        constant = self.constant_objectives
        return [(n, d) for n, d in self.objectives if n not in constant]

    def best_per_objective(self) -> dict[str, tuple[float, int]]:
        """Best value of each objective over the completed trials at the top fidelity (a score on
        a low rung's few items is too noisy to name as a best)."""
        from evomerge.search import full_fidelity

        out: dict[str, tuple[float, int]] = {}
        done = [t for t in self.completed if full_fidelity(t.fidelity)]
        for name, direction in zip(self.objective_names, self.directions):
            scored = [(t.values[name], t.number) for t in done if name in t.values]
            if scored:
                sign = 1.0 if direction == "maximize" else -1.0
                out[name] = max(scored, key=lambda vn: (sign * vn[0], -vn[1]))
        return out

    # ------------------------------------------------------------------ progress
    @property
    def budget(self) -> dict[str, Any]:
        return dict(self.state.get("budgets", {}).get(self.stage, {}))

    def process_gone(self) -> bool:
        """Whether the state says "running" but its process is known to be dead (this host, no
        such pid): a SIGKILL or an out-of-memory kill leaves no other trace."""
        pid, host = self.state.get("pid"), self.state.get("host")
        if self.state.get("status") != "running" or not pid or host != socket.gethostname():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    @property
    def running(self) -> bool:
        """Whether this stage is being searched right now (as far as this machine can tell)."""
        return self.state.get("status") == "running" and self.state.get("stage") == self.stage and not self.process_gone()

    @property
    def elapsed(self) -> float:
        """Search seconds spent in this stage, over all resumes, up to now while it runs (a trial
        in flight counts: a slow first trial must not read as ``elapsed 0s``)."""
        stored = float(self.state.get("elapsed", {}).get(self.stage, 0.0))
        started = self.state.get("stage_started")
        if self.running and started is not None:
            live = float(self.state.get("stage_elapsed_before", 0.0)) + time.time() - float(started)
            return max(stored, live)
        return stored

    @property
    def n_finished(self) -> int:
        return len(self.completed) + len(self.failed)

    def eta_seconds(self) -> float | None:
        """Time left while the stage runs: the sooner of the evaluation budget (at the rate
        observed over the same elapsed time `summary` shows) and the wall clock; None when the
        stage is not running or nothing bounds it yet."""
        if not self.running:
            return None
        budget, elapsed, n = self.budget, self.elapsed, self.n_finished
        limits = []
        if budget.get("evaluations") and n:
            limits.append(max(budget["evaluations"] - n, 0) * elapsed / n)
        if budget.get("wall_clock"):
            limits.append(max(budget["wall_clock"] - elapsed, 0.0))
        return min(limits) if limits else None

    @property
    def stop_reason(self) -> tuple[str, str | None] | None:
        """(reason, detail) of what stopped this stage, or the run while in it; None while running.
        Reasons: ``evaluations`` / ``wall_clock`` (a budget spent), ``exhausted`` (the optimizer
        had no candidate left), ``signal`` (SIGINT/SIGTERM), ``error``, ``killed`` (the process
        vanished)."""
        stop = self.state.get("stop") or {}
        if self.process_gone():
            return "killed", f"process {self.state.get('pid')} is gone without a trace (SIGKILL, out of memory?)"
        if stop.get("reason") in ("signal", "error") and stop.get("stage") in (self.stage, None):
            return stop["reason"], stop.get("detail")
        reason = self.state.get("stopped_by", {}).get(self.stage)
        return (reason, None) if reason else None

    def stop_text(self) -> str | None:
        """`stop_reason` in words, with the figures that show it (budget, time, trials)."""
        stop = self.stop_reason
        if stop is None:
            return None
        reason, detail = stop
        total = self.budget.get("evaluations")
        trials = f"{self.n_finished}" + (f" of {total}" if total else "") + " evaluations"
        resume = f"; `evomerge resume {self.run_dir}` continues"
        words = {
            "evaluations": f"evaluations budget: {trials} done",
            "wall_clock": f"wall clock: {format_seconds(self.budget.get('wall_clock'))} spent, after {trials}",
            "exhausted": f"exhausted: the optimizer had no candidate left after {trials}",
            "signal": f"signal{f' {detail}' if detail else ''}: stopped after {trials}{resume}",
            "error": f"error: {detail}{resume}",
            "killed": f"killed: {detail}{resume}",
        }
        return words.get(reason, reason)

    def hypervolume_text(self) -> str:
        """The hypervolume with the reference point it is measured from (recorded in the ledger at
        the first feasible trial): the number only compares with runs of the same point."""
        if self.reference_point is None:
            return format_value(self.hypervolume)
        point = ", ".join(f"{n}={format_value(v)}" for n, v in zip(self.objective_names, self.reference_point))
        return f"{format_value(self.hypervolume)} (reference point {point})"

    def summary(self) -> dict[str, str]:
        """Key figures for ``status`` and the report header."""
        budget = self.budget
        total = budget.get("evaluations")
        status = str(self.state.get("status", "unknown"))
        if self.process_gone():
            status = "stopped (the process is gone)"
        rows = {
            "status": status + (f" (stage {self.stage})" if len(self.spec.resolved_stages()) > 1 else ""),
            "trials": f"{self.n_finished}" + (f" / {total}" if total else "") + f" ({len(self.failed)} failed)",
            "elapsed": format_seconds(self.elapsed) + (f" of {format_seconds(budget['wall_clock'])} wall clock"
                                                       if budget.get("wall_clock") else ""),
        }
        if self.running:
            rows["ETA"] = format_seconds(self.eta_seconds())
        stop = self.stop_text()
        if stop is not None:
            rows["stopped by"] = stop
        rows["front size"] = str(len(self.front))
        if self.spec.fidelity is not None:
            rows["fidelity"] = self.fidelity_text()
        rows["hypervolume"] = self.hypervolume_text()
        for name, (value, number) in self.best_per_objective().items():
            rows[f"best {name}"] = f"{format_value(value)} (trial {number})"
        best = self.best_mean_trial()
        if best is not None:
            trial, headline = self.trial(best), self.headline_kind
            for kind, names in self.task_groups.items():
                if len(names) > 1:
                    label = f"best mean task {kind}" if kind == headline else f"mean task {kind} of trial {best}"
                    rows[label] = f"{format_value(self.mean_of(trial, kind))} (trial {best}; mean of {', '.join(names)})"
        if self.state.get("updated"):
            rows["updated"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.state["updated"]))
        return rows

    def fidelity_text(self) -> str:
        """How far the completed trials went through the rungs, and the items they cost."""
        rungs = self.spec.fidelity.rungs  # type: ignore[union-attr]
        graded = [t.fidelity for t in self.completed if t.fidelity is not None]
        reached = [sum(1 for g in graded if g["rung"] >= r) for r in range(len(rungs))]
        items = sum(int(g["scored"]) for g in graded)
        return (", ".join(f"{n} on {k} items" for n, k in zip(reached, rungs))
                + f" (eta {self.spec.fidelity.eta}); {items} calibration items scored")  # type: ignore[union-attr]

    def mean_columns(self) -> list[str]:
        """Front-table columns for the means of each kind with more than one objective."""
        return [kind for kind, names in self.task_groups.items() if len(names) > 1]

    def front_rows(self) -> tuple[list[str], list[list[str]]]:
        """The front as a table: trial, each objective, the mean task score / loss (each kind apart)."""
        kinds = self.mean_columns()
        header = ["trial", *self.objective_names, *(f"mean {kind}" for kind in kinds)]
        rows = []
        for number in self.front:
            t = self.trial(number)
            if t is None:
                continue
            rows.append([str(number), *(format_value(t.values.get(n)) for n in self.objective_names),
                         *(format_value(self.mean_of(t, kind)) for kind in kinds)])
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
