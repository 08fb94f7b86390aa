"""Reading a run folder: ``status``, ``front``, ``export``, ``report`` (and the views the end-of-run summary prints).

The ledger is read through Optuna directly (read-only, no `Ledger` object), following the layout
`evomerge.search.Ledger` documents: raw objective values in ``user_attrs["objectives"]``, the
recipe JSON in ``user_attrs["recipe"]``, run metadata in the study's ``user_attrs``. That keeps
``status`` cheap enough to poll while the run is writing.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import UserError, first_line
from ._preflight import writable_parent
from ._results import Reference, RunView, read_json
from ._rundir import RunDir

if TYPE_CHECKING:
    import optuna

GRID_STAGE = "grid"
"""Study name of the built-in uniform grid baseline (``baseline: true``)."""


def _study(rd: RunDir, stage: str) -> "optuna.Study":
    import optuna

    from evomerge.search import storage_for

    spec = rd.load_spec(check_paths=False)
    if not rd.has_ledger(spec):
        raise UserError(f"{rd.path}: stage {stage!r} has no trials yet")
    where = rd.storage(spec, shared=False)
    try:
        storage, _ = storage_for(where, read_only=True)
        return optuna.load_study(study_name=stage, storage=storage)
    except KeyError:
        raise UserError(f"{rd.path}: stage {stage!r} has no trials yet") from None
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"{rd.path}: the ledger {where} cannot be read ({first_line(exc)}); restore it from a copy") from None


def _stage_names(rd: RunDir) -> list[str]:
    spec = rd.load_spec(check_paths=False)
    return [s.name for s in spec.resolved_stages()] + ([GRID_STAGE] if spec.baseline else [])


def main_stage(rd: RunDir) -> str:
    """The stage a user means by default: the current one while running, else the last search stage."""
    state = rd.read_state()
    names = [n for n in _stage_names(rd) if n in state.get("stages_done", []) or n == state.get("stage")]
    searches = [n for n in names if n != GRID_STAGE]
    if state.get("status") in ("running", "interrupted") and state.get("stage") in searches:
        return state["stage"]
    return (searches or names or _stage_names(rd))[-1]


def load_view(run_dir: Path, stage: str | None = None) -> RunView:
    """A `RunView` of one stage of a run folder (default: `main_stage`)."""
    from evomerge.search import ParetoArchive, full_fidelity, read_records

    rd = RunDir(run_dir.resolve())
    spec = rd.load_spec(check_paths=False)
    if stage is not None and stage not in _stage_names(rd):
        raise UserError(f"--stage: {stage!r} is not one of {', '.join(_stage_names(rd))}")
    stage = stage or main_stage(rd)
    study = _study(rd, stage)
    meta = study.user_attrs
    objectives = [(o["name"], o["direction"]) for o in meta["objectives"]]
    # interrupted attempts are left out: cut off by a stop and re-run, their re-run is the real trial
    trials = [t for t in read_records(study) if t.state != "interrupted"]
    archive = ParetoArchive([d for _, d in objectives], meta.get("reference_point"))
    for t in trials:
        if t.state in ("complete", "failed"):
            values = [t.values[n] for n, _ in objectives] if t.state == "complete" else None
            archive.add(t.number, values, feasible=t.feasible and full_fidelity(t.fidelity))  # a low rung never enters the front
    comparison = read_json(rd.comparison_file) or None
    references = [Reference(name, values) for name, values in (comparison or {}).get("references", {}).items()]
    return RunView(
        name=spec.name, spec=spec, run_dir=rd.path, stage=stage, objectives=objectives, trials=trials,
        front=[p.number for p in archive.front], hv_history=archive.history, reference_point=archive.reference_point,
        state=rd.read_state(), references=references, comparison=comparison,
    )


# ------------------------------------------------------------------------------------------ commands


def status_text(run_dir: Path) -> str:
    view = load_view(run_dir)
    width = max(len(k) for k in view.summary())
    lines = [f"{view.name}  ({view.run_dir})"]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in view.summary().items()]
    return "\n".join(lines)


def front_text(run_dir: Path, *, stage: str | None = None, fmt: str = "table") -> str:
    view = load_view(run_dir, stage)
    header, rows = view.front_rows()
    if fmt == "json":
        members = []
        for number in view.front:
            t = view.trial(number)
            members.append({"trial": number, "values": t.values,
                            "means": {kind: view.mean_of(t, kind) for kind in view.mean_columns()}})
        return json.dumps(members, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(header)
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    return format_table(header, rows) + f"\n{len(rows)} trials on the front of stage {view.stage!r}; export one with " \
        f"`evomerge export {view.run_dir} --trial N --out DIR`"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def recipe_of(view: RunView, number: int) -> Any:
    from evomerge.merge import MergeRecipe

    trial = view.trial(number)
    if trial is None:
        raise UserError(f"--trial: {number} is not a trial of stage {view.stage!r}; front: {view.front}")
    if trial.state != "complete" or trial.recipe is None:
        raise UserError(f"--trial: trial {number} did not complete ({trial.failure or trial.state})")
    return MergeRecipe.model_validate(trial.recipe)


def export_trial(run_dir: Path, trial: int, *, out: Path | None = None, stage: str | None = None) -> Path:
    """Write a trial's merged model (HF folder + recipe.json + mergekit.yaml + card)."""
    from evomerge.merge import check_export_target

    from ._build import build_engine

    view = load_view(run_dir, stage)
    recipe = recipe_of(view, trial)
    target = (out or RunDir(view.run_dir).export_dir(trial)).resolve()
    _check_output(target, folder=True)
    check_export_target(target)  # before the models load
    engine = build_engine(view.spec, progress=False)
    return engine.export(recipe, target)


def _check_output(path: Path, *, folder: bool) -> None:
    """``--out`` can take the output: a folder (replaced whole) or a file, under a writable folder."""
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"--out {path}: is {'a file' if folder else 'a folder'}; give a {'folder' if folder else 'file'} path")
    writable_parent(path, "--out")


def write_run_report(run_dir: Path, *, out: Path | None = None) -> Path:
    view = load_view(run_dir)  # first: a wrong folder is reported before matplotlib loads

    from ._report import write_report

    if out is not None:
        out = out.resolve()
        _check_output(out, folder=False)
    return write_report(view, out)
