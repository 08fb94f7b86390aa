"""Exports of a run: every trial and the Pareto front as CSV and JSON, and a chosen trial's model.

The ledger is the source, so exports can be redone at any time, also for a run still going or
killed; each file is renamed into place, so a reader never sees half of one. CSV is flat (a
column per objective, genome coordinate and timing; the recipe a JSON string), JSON structured.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Protocol

from optuna.trial import FrozenTrial, TrialState

from evomerge.merge import MergeRecipe, atomic_file, write_atomic

from ._ledger import Ledger, counted, rerun_numbers


class Exporter(Protocol):
    """What a trial's model export needs: `evomerge.merge.MergeEngine.export`."""

    def export(self, recipe: MergeRecipe, out_dir: str | Path) -> Path: ...


def trial_record(ledger: Ledger, trial: FrozenTrial, *, on_front: bool, rerun: set[int]) -> dict[str, Any]:
    """One trial as a JSON-safe dict: genome, recipe, objectives, details, timings, failure.
    ``interrupted`` is the ledger's rule (`counted`; ``rerun``: `rerun_numbers`), so a trial whose
    process was killed reads as interrupted here as in ``status``, not only one given back."""
    recipe = trial.user_attrs.get("recipe")
    return {
        "number": trial.number,
        "state": trial.state.name,
        "interrupted": trial.state == TrialState.FAIL and not counted(trial, rerun),
        "candidate": trial.user_attrs.get("candidate"),
        "on_front": on_front,
        "feasible": ledger.feasible(trial),
        "objectives": trial.user_attrs.get("objectives", {}),
        "constraints": trial.user_attrs.get("constraints"),
        "fidelity": trial.user_attrs.get("fidelity"),
        "failure": trial.user_attrs.get("failure"),
        "genome": dict(trial.params),
        "recipe": None if recipe is None else json.loads(recipe),
        "timings": trial.user_attrs.get("timings", {}),
        "details": trial.user_attrs.get("details", {}),
    }


def _flat(record: dict[str, Any], objective_names: list[str]) -> dict[str, Any]:
    row = {k: record[k] for k in ("number", "state", "interrupted", "candidate", "on_front", "feasible", "failure")}
    row.update({name: record["objectives"].get(name) for name in objective_names})
    row.update({f"param:{k}": v for k, v in record["genome"].items()})
    row.update({f"time:{k}": v for k, v in record["timings"].items()})
    row["recipe"] = None if record["recipe"] is None else json.dumps(record["recipe"], separators=(",", ":"))
    return row


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with atomic_file(path, newline="", durable=False) as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def export_results(ledger: Ledger, out_dir: str | Path) -> dict[str, Path]:
    """Write ``trials.csv``, ``trials.json``, ``front.csv`` and ``front.json``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    front = {p.number for p in ledger.archive().front}
    trials = ledger.trials()
    rerun = rerun_numbers(trials)
    records = [trial_record(ledger, t, on_front=t.number in front, rerun=rerun) for t in trials]
    names = ledger.objective_names
    meta = {
        "objectives": [{"name": o.name, "direction": o.direction} for o in ledger.objectives],
        "reference_point": ledger.reference_point,
        "seed": ledger.seed,
    }
    paths = {}
    for stem, subset in (("trials", records), ("front", [r for r in records if r["on_front"]])):
        paths[f"{stem}.json"] = out / f"{stem}.json"
        write_atomic(paths[f"{stem}.json"], json.dumps({**meta, "trials": subset}, indent=1), durable=False)
        paths[f"{stem}.csv"] = out / f"{stem}.csv"
        _write_csv(paths[f"{stem}.csv"], [_flat(r, names) for r in subset])
    return paths


def trial_recipe(ledger: Ledger, number: int) -> MergeRecipe:
    """The recipe a trial evaluated, rebuilt bit for bit from the ledger."""
    trials = ledger.trials()
    trial = trials[number] if 0 <= number < len(trials) else None
    if trial is None or "recipe" not in trial.user_attrs:
        raise ValueError(f"trial {number} has no recipe in the ledger")
    return MergeRecipe.from_json(trial.user_attrs["recipe"])


def export_trial_model(ledger: Ledger, engine: Exporter, number: int, out_dir: str | Path) -> Path:
    """Write trial ``number``'s merged model (HF folder, recipe, mergekit YAML, card) via the engine."""
    trial = ledger.trials()[number]
    if trial.state != TrialState.COMPLETE:
        raise ValueError(f"trial {number} is {trial.state.name}, not a completed trial")
    return engine.export(trial_recipe(ledger, number), out_dir)
