"""``evomerge run`` / ``resume``: spec -> session -> stages of `run_search` -> comparison -> report.

Order matters for the promise "bad input writes nothing": the spec is validated, the zoo resolved,
and base, experts and calibration sets loaded *before* the run folder is created. Once running,
every trial is in the ledger before the optimizer learns it (the search loop's contract), so a
stop at any point resumes with ``evomerge resume RUN_DIR``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from ._build import build_engine, build_objectives, build_scorer, build_space
from ._errors import UserError, first_line
from ._fitness import PenalizedScorer, constraint_function, ledger_objectives, scalarization
from ._mergekit_in import check_mergekit_files, start_from_mergekit
from ._preflight import preflight, report_remote_code
from ._resolve import resolve
from ._rundir import RunDir
from ._signals import SignalLog
from ._spec import ExperimentSpec, OptimizerSpec, SpaceSpec, StageSpec
from ._spec_io import dump_spec, preset_path, read_yaml, validate_spec

if TYPE_CHECKING:
    from evomerge.merge import MergeEngine
    from evomerge.objectives import Scorer
    from evomerge.search import Ledger, SearchSpace

GRID_STAGE = "grid"
"""Study name of the built-in uniform grid baseline (``baseline: true``)."""


# ------------------------------------------------------------------------------------------- loading


def _set(data: dict[str, Any], dotted: str, raw: str) -> None:
    """Apply one ``--set a.b.c=value`` override (value parsed as YAML: numbers, lists, ...)."""
    keys = dotted.split(".")
    if not all(k.strip() for k in keys):
        raise UserError(f"--set {dotted}: empty key; expected a dotted field such as budget.evaluations")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: {key!r} is not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise UserError(f"--set {dotted}={raw!r}: the value is not valid YAML ({problem}); quote it, e.g. --set {dotted}='[0, 1]'") from None


def load_spec_with_overrides(spec: Path | None, preset: str | None, overrides: list[str]) -> tuple[ExperimentSpec, str]:
    """The validated spec of a file or preset with ``--set`` overrides applied, and its label."""
    path = preset_path(preset) if preset is not None else spec
    label = f"preset {preset}" if preset is not None else str(spec)
    data = read_yaml(path, label)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. budget.evaluations=20")
        _set(data, key.strip(), value)
    return validate_spec(data, root=path.resolve().parent, label=label), label


# ------------------------------------------------------------------------------------------- session


@dataclass
class Session:
    """Everything loaded once per process: the resolved spec, the engine and the scorer."""

    spec: ExperimentSpec
    engine: "MergeEngine"
    scorer: "Scorer"

    @classmethod
    def open(cls, spec: ExperimentSpec, *, progress: bool) -> "Session":
        engine = build_engine(spec, progress=progress)
        check_mergekit_files(spec, engine)
        scorer = build_scorer(spec, engine, build_objectives(spec))
        # One untimed candidate (the first stage's starting point): compiles and first calls are not the first trial's.
        scorer.warm_up((space := build_space(engine, spec.resolved_stages()[0].space)).decode(space.x0, seed=spec.seed))
        return cls(spec, engine, scorer)

    def close(self) -> None:
        self.scorer.close()


def _same_spec(a: ExperimentSpec, b: ExperimentSpec) -> bool:
    """Whether two specs describe the same search (prose and output options do not count)."""
    dump = lambda s: s.model_dump(mode="json", by_alias=True, exclude={"outputs", "description"})  # noqa: E731
    return dump(a) == dump(b)


def start(
    *, spec: Path | None, preset: str | None, run_dir: Path | None, overrides: list[str], progress: bool
) -> int:
    """``evomerge run``: validate, load, create the run folder, search. Returns the exit status."""
    parsed, label = load_spec_with_overrides(spec, preset, overrides)
    rd = RunDir((run_dir or parsed.run_dir()).resolve())
    with SignalLog() as signals:
        try:
            resolved = resolve(parsed, label=label, progress=progress)
            outputs = resolved.outputs.model_copy(update={"run_dir": str(rd.path)})
            resolved = resolved.model_copy(update={"outputs": outputs})
            if rd.exists() and not _same_spec(rd.load_spec(check_paths=False), resolved):
                raise UserError(f"{rd.path} holds a run of a different spec; pick another --run-dir, or `evomerge resume {rd.path}`")
            preflight(resolved, rd)
            session = Session.open(resolved, progress=progress)
            report_remote_code(resolved)
        except KeyboardInterrupt:
            return signals.exit_code()
        if not rd.exists():
            rd.path.mkdir(parents=True, exist_ok=True)
            dump_spec(resolved, rd.spec_file)
            rd.write_state(status="created", name=resolved.name, elapsed={})
            click.echo(f"run folder: {rd.path}")
        else:
            click.echo(f"resuming: {rd.path}")
        return _execute(rd, session, signals, progress=progress)


def resume(run_dir: Path, *, progress: bool) -> int:
    """``evomerge resume``: reopen the run's ledger and continue where it stopped."""
    rd = RunDir(run_dir.resolve())
    spec = rd.load_spec()
    with SignalLog() as signals:
        try:
            preflight(spec, rd)
            session = Session.open(spec, progress=progress)
            report_remote_code(spec)
        except KeyboardInterrupt:
            return signals.exit_code()
        click.echo(f"resuming: {rd.path}")
        return _execute(rd, session, signals, progress=progress)


# ------------------------------------------------------------------------------------------- stages


def open_ledger(rd: RunDir, spec: ExperimentSpec, stage: str, optimizer: OptimizerSpec, space: "SearchSpace | None") -> "Ledger":
    """The stage's study in the run's storage (the same arguments on every resume)."""
    from evomerge.search import Ledger

    objectives = ledger_objectives(spec, optimizer)
    return Ledger(
        rd.storage(spec, shared=False), objectives=objectives, study_name=stage, seed=spec.seed,
        scalarization=scalarization(objectives, optimizer), space=None if space is None else space.to_dict(),
    )


def _kind_of(param_name: str) -> str:
    """``L0-3.attention.density[expert]`` -> ``density``."""
    return param_name.split("[")[0].split(".")[-1]


def best_trial(ledger: "Ledger") -> Any:
    """The stage's best completed trial: lowest scalarized loss, else best mean objective loss."""
    from optuna.trial import TrialState

    from evomerge.search import to_losses

    done = [t for t in ledger.trials((TrialState.COMPLETE,)) if ledger.feasible(t)]
    if not done:
        return None
    if ledger.scalarization is not None:
        return min(done, key=lambda t: (t.values[0], t.number))
    return min(done, key=lambda t: (float(to_losses(ledger.objective_values(t), ledger.directions).mean()), t.number))


def _stage_space(session: Session, stage: StageSpec, held: dict[str, float]) -> "SearchSpace":
    space: SpaceSpec = stage.space  # type: ignore[assignment]
    if stage.inherit:
        kinds = list(space.searched_kinds)
        space = space.model_copy(update={"params": kinds + [k for k in stage.inherit if k not in kinds]})
    built = build_space(session.engine, space, held)
    if session.spec.init is not None and stage.name == session.spec.resolved_stages()[0].name:
        built = start_from_mergekit(built, session.spec, session.engine, echo=True)
    return built


def _budget_seconds(stage: StageSpec, elapsed: float) -> float | None:
    wall = stage.budget.wall_clock  # type: ignore[union-attr]
    return None if wall is None else max(wall - elapsed, 0.0)


def _run_stage(
    rd: RunDir, session: Session, stage: StageSpec, space: "SearchSpace", *, progress: bool
) -> tuple[str, "Ledger"]:
    """One `run_search` call; returns why it stopped and the stage's ledger."""
    from evomerge.search import make_optimizer, run_search

    spec, optimizer_spec = session.spec, stage.optimizer
    assert optimizer_spec is not None and stage.budget is not None
    ledger = open_ledger(rd, spec, stage.name, optimizer_spec, space)
    optimizer = make_optimizer(optimizer_spec.factory_name, **optimizer_spec.options)
    if optimizer_spec.library == "optuna" and not ledger.trials():
        # Optuna samplers start from random points; the template's starting point (e.g. plain
        # TIES at the method's defaults) is the sensible first trial, as it is for nevergrad.
        ledger.study.enqueue_trial(space.describe(space.x0))
    scorer = PenalizedScorer(session.scorer, space) if optimizer_spec.l1_penalty > 0 else session.scorer
    state = rd.read_state()
    elapsed = dict(state.get("elapsed", {}))
    before = float(elapsed.get(stage.name, 0.0))
    t0 = time.monotonic()
    budgets = {**state.get("budgets", {}), stage.name: stage.budget.model_dump()}
    rd.write_state(status="running", stage=stage.name, budgets=budgets)

    def checkpoint(_: Any) -> None:
        rd.write_state(elapsed={**elapsed, stage.name: before + time.monotonic() - t0})

    if progress and stage.name == GRID_STAGE:
        click.echo(f"stage {stage.name}: the built-in uniform grid baseline ({stage.budget.evaluations} recipes)")
    elif progress:
        click.echo(f"stage {stage.name}: {optimizer_spec.factory_name} over {space.dim} parameters")
    result = run_search(
        space, scorer, optimizer, ledger,
        budget_evals=stage.budget.evaluations, budget_seconds=_budget_seconds(stage, before),
        constraints=constraint_function(spec.constraints), callbacks=[checkpoint], progress=progress,
    )
    checkpoint(None)
    return result.stopped_by, ledger


def _grid_stage(session: Session, last: StageSpec) -> StageSpec:
    """The uniform grid baseline: one shared coefficient for all experts, every layer alike."""
    from evomerge.search import GridSearch

    grid = OptimizerSpec(library="baseline", name="grid")
    return StageSpec(name=GRID_STAGE, space=last.space, optimizer=grid,
                     budget=last.budget.model_copy(update={"evaluations": len(GridSearch()), "wall_clock": None}))


def _execute(rd: RunDir, session: Session, signals: SignalLog, *, progress: bool) -> int:
    """Run the stages not yet done, then the baseline, comparison and report."""
    spec = session.spec
    stages = spec.resolved_stages()
    if spec.baseline:
        stages.append(_grid_stage(session, stages[-1]))
    done: list[str] = list(rd.read_state().get("stages_done", []))
    held: dict[str, float] = {}
    try:
        for stage in stages:
            space = _stage_space(session, stage, held)
            if stage.name in done:
                ledger = open_ledger(rd, spec, stage.name, stage.optimizer, space)  # type: ignore[arg-type]
            else:
                stopped_by, ledger = _run_stage(rd, session, stage, space, progress=progress)
                if stopped_by == "interrupt":
                    raise KeyboardInterrupt
                done.append(stage.name)
                rd.write_state(stages_done=done)
                _export_stage(rd, stage.name, ledger)
            held = _inherited(ledger, stages, stage)
        from ._inspect import finish_run

        finish_run(rd, session)  # marks the run done once its last output is in place
    except KeyboardInterrupt:
        rd.write_state(status="interrupted")
        code = signals.exit_code()
        click.echo(f"\nstopped (exit {code}); continue with: evomerge resume {rd.path}", err=True)
        return code
    finally:
        session.close()
    return 0


def _export_stage(rd: RunDir, stage: str, ledger: "Ledger") -> None:
    """The stage's trials and front as CSV/JSON and its plots, for spreadsheets and notebooks."""
    from evomerge.search import export_results, plot_run

    out = rd.results_dir(stage)
    export_results(ledger, out)
    if ledger.trials():
        plot_run(ledger, out)


def _inherited(ledger: "Ledger", stages: list[StageSpec], stage: StageSpec) -> dict[str, float]:
    """Values the next stage holds fixed: its ``inherit`` kinds from this stage's best trial."""
    index = stages.index(stage)
    following = stages[index + 1] if index + 1 < len(stages) else None
    if following is None or not following.inherit:
        return {}
    best = best_trial(ledger)
    if best is None:
        raise UserError(f"stage {stage.name!r} has no completed trial for stage {following.name!r} to inherit from")
    return {name: float(v) for name, v in best.params.items() if _kind_of(name) in following.inherit}
