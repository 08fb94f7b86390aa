"""``evomerge run`` / ``resume``: spec -> session -> stages of `run_search` -> comparison -> report.

Order matters for the promise "bad input writes nothing": the spec is validated, the zoo resolved,
and base, experts and calibration sets loaded *before* the run folder is created. Once running,
every trial is in the ledger before the optimizer learns it (the search loop's contract), so a
stop at any point resumes with ``evomerge resume RUN_DIR``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from evomerge.merge import write_atomic

from ._build import build_engine, build_objectives, build_scorer, build_space, start_at
from ._compare import holdout_scores, single_model_recipes
from ._errors import UserError, first_line
from ._fitness import (
    PenalizedScorer,
    constraint_function,
    describe_scalar,
    ledger_objectives,
    promotion_score,
    scalarization,
)
from ._inspect import GRID_STAGE, format_table, load_view, main_stage, recipe_of, status_text
from ._mergekit_in import baseline_recipes, check_mergekit_files, start_from_mergekit
from ._preflight import preflight, report_remote_code
from ._resolve import resolve
from ._rundir import RunDir
from ._runlog import Display, EventLog, trial_reporter
from ._spec import ExperimentSpec, OptimizerSpec, SpaceSpec, StageSpec
from ._spec_io import dump_spec, preset_path, read_yaml, validate_spec

if TYPE_CHECKING:
    from evomerge.merge import MergeEngine, MergeRecipe

    from ._rescore import Rescored
    from ._signals import SignalLog
    from evomerge.objectives import Scorer
    from evomerge.search import Fidelity, Ledger, SearchSpace

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
    def open(cls, spec: ExperimentSpec, *, display: Display) -> "Session":
        """Load engine and scorer and warm them up, saying so (`Display.note`): on real checkpoints
        this takes minutes before the first trial, which a log must not pass over in silence. The
        calibration files are read first: a broken one is reported before the loading, not after."""
        objectives = build_objectives(spec)
        start = time.perf_counter()
        if not display.bars:  # the bars show the loading themselves
            display.note(f"loading the base model and {len(spec.models.experts) or 'the'} expert(s)")
        engine = build_engine(spec, progress=display.bars)
        check_mergekit_files(spec, engine)
        check_spaces(spec, engine)  # before the scorer: a vLLM engine takes minutes to start
        scorer = build_scorer(spec, engine, objectives)
        recipes = _warm_up_recipes(spec, engine)
        sorting = _sorting_recipes(spec, engine)
        display.note(f"loaded in {time.perf_counter() - start:.0f} s ({len(engine.expert_paths)} expert(s)); warm-up: "
                     f"one-time sorts and a first evaluation of {len(recipes)} recipe(s) ...")
        start = time.perf_counter()
        sorts = scorer.build_sorts(sorting + recipes)
        sorts += sum(scorer.warm_up(recipe).timings["sorts"] for recipe in recipes)
        display.note(f"warm-up: one-time sorts {sorts:.0f} s, first evaluation of {len(recipes)} recipe(s) "
                     f"{time.perf_counter() - start - sorts:.0f} s (kernel compiles, tables); once per process, "
                     "in no trial's time")
        return cls(spec, engine, scorer)

    def close(self) -> None:
        self.scorer.close()


def check_spaces(spec: ExperimentSpec, engine: "MergeEngine") -> None:
    """Each stage's space merges what the models allow (a method's expert count, ``lora_mode:
    adapter`` over LoRA experts only): a problem is one line naming the spec's field, before the run
    folder exists, not a failure of every trial (a run that then ended with status 0). One recipe
    per method suffices: the values a search varies do not change what `MergeEngine.check` checks."""
    from evomerge.merge import RuleError

    for i, stage in enumerate(spec.resolved_stages()):
        where = f"stages[{i}].space" if spec.stages is not None and spec.stages[i].space is not None else "space"
        try:
            space = build_space(engine, stage.space)
        except ValueError as exc:  # names the layout does not have (a `fixed` parameter such as L99.weight[a])
            raise UserError(f"{where}: {exc}") from None
        if space.dim == 0:
            raise UserError(f"{where}.params: the space has no parameter to search (every kind held or none listed); "
                            "list at least one kind the method reads")
        for sub in map(space.sub, space.methods):
            try:
                engine.check(sub.decode(sub.x0, seed=spec.seed))
            except RuleError as exc:
                raise UserError(f"{where}.{exc.field}: {exc.problem}") from None


def _warm_up_recipes(spec: ExperimentSpec, engine: "MergeEngine") -> list[Any]:
    """One untimed candidate per distinct merge method a run will use (each stage's starting point,
    and one grid recipe per method of the uniform grid baseline): kernel compiles, table builds and
    the first inference calls then fall before the first timed trial of every stage, not into its
    timeout (issue 13: a first trial timed out while the fused kernels compiled)."""
    from evomerge.search import GridSearch

    recipes: dict[tuple[str, ...], Any] = {}
    stages = spec.resolved_stages()
    for stage in stages:
        space = build_space(engine, stage.space)
        for sub in map(space.sub, space.methods):  # every method of a method choice
            recipe = sub.decode(sub.x0, seed=spec.seed)
            recipes.setdefault(tuple(sorted({rule.method for rule in recipe.rules})), recipe)
    if spec.baseline:
        grid, space = GridSearch(), build_space(engine, stages[-1].space)
        for method in grid.methods:
            density = min(grid.densities) if method == "ties" else 1.0  # the grid's own points: density is TIES'
            params = {"grid.method": method, "grid.weight": grid.weights[0], "grid.density": density}
            recipes.setdefault((method,), grid.recipe(space, params, seed=spec.seed, trial=0))
    return list(recipes.values())


def _sorting_recipes(spec: ExperimentSpec, engine: "MergeEngine") -> list[Any]:
    """Per stage and method, the recipe at the middle of the space's bounds: wherever a density
    can be below 1 it is, so the engine's one-time sorts (`MergeEngine.build_sorts`) cover every
    tensor a candidate may prune, even when the starting point keeps everything (density 1) and
    would otherwise leave them to the first timed trial that prunes."""
    recipes = []
    for stage in spec.resolved_stages():
        space = build_space(engine, stage.space)
        for sub in map(space.sub, space.methods):
            low, high = sub.bounds
            recipes.append(sub.decode((low + high) / 2, seed=spec.seed))
    return recipes


def same_spec(a: ExperimentSpec, b: ExperimentSpec) -> bool:
    """Whether two specs describe the same search (prose and output options do not count)."""
    dump = lambda s: s.model_dump(mode="json", by_alias=True, exclude={"outputs", "description"})  # noqa: E731
    return dump(a) == dump(b)


def start(
    *, spec: Path | None, preset: str | None, run_dir: Path | None, overrides: list[str], display: Display,
    signals: "SignalLog",
) -> int:
    """``evomerge run``: validate, load, create the run folder, search. Returns the exit status.
    ``signals``: the CLI's record of SIGINT/SIGTERM (both arrive here as ``KeyboardInterrupt``)."""
    progress = display.bars
    parsed, label = load_spec_with_overrides(spec, preset, overrides)
    rd = RunDir((run_dir or parsed.run_dir()).resolve())
    try:
        resolved = resolve(parsed, label=label, progress=progress)
        outputs = resolved.outputs.model_copy(update={"run_dir": str(rd.path)})
        resolved = resolved.model_copy(update={"outputs": outputs})
        if rd.exists() and not same_spec(rd.load_spec(check_paths=False), resolved):
            raise UserError(f"{rd.path} holds a run of a different spec; pick another --run-dir, or `evomerge resume {rd.path}`")
        preflight(resolved, rd)
        session = Session.open(resolved, display=display)
        report_remote_code(resolved)
    except KeyboardInterrupt:
        return _stopped_in_start_up(signals, rd, resumable=rd.exists())
    if not rd.exists():
        rd.path.mkdir(parents=True, exist_ok=True)
        dump_spec(resolved, rd.spec_file)
        rd.write_state(status="created", name=resolved.name, elapsed={})
        click.echo(f"run folder: {rd.path}")
    else:
        click.echo(f"resuming: {rd.path}")
    return run_stages(rd, session, signals, display=display)


def _stopped_in_start_up(signals: "SignalLog", rd: RunDir, *, resumable: bool) -> int:
    """A stop while the models load or warm up: nothing of the run was written; say so (a
    scheduler's log otherwise shows a run that ended without a word) and return 130 / 143."""
    code = signals.exit_code()
    again = f"continue with: evomerge resume {rd.path}" if resumable else "start it again with the same command"
    click.echo(f"stopped during start-up (exit {code}), before any trial; nothing was written; {again}", err=True)
    return code


def resume(run_dir: Path, *, display: Display, signals: "SignalLog") -> int:
    """``evomerge resume``: reopen the run's ledger and continue where it stopped."""
    rd = RunDir(run_dir.resolve())
    spec = rd.load_spec()
    try:
        preflight(spec, rd)
        session = Session.open(spec, display=display)
        report_remote_code(spec)
    except KeyboardInterrupt:
        return _stopped_in_start_up(signals, rd, resumable=True)
    click.echo(f"resuming: {rd.path}")
    return run_stages(rd, session, signals, display=display)


# ------------------------------------------------------------------------------------------- stages


def open_ledger(rd: RunDir, spec: ExperimentSpec, stage: str, optimizer: OptimizerSpec, space: "SearchSpace | None") -> "Ledger":
    """The stage's study in the run's storage (the same arguments on every resume)."""
    from evomerge.search import Ledger

    objectives = ledger_objectives(spec, optimizer)
    return label_study(Ledger(
        rd.storage(spec, shared=False), objectives=objectives, study_name=stage, seed=spec.seed,
        scalarization=scalarization(objectives, optimizer), space=None if space is None else space.to_dict(),
    ), spec)


def label_study(ledger: "Ledger", spec: ExperimentSpec) -> "Ledger":
    """Name the run on its stage's study (user attribute ``run``, in optuna-dashboard's table of
    the study's user attributes). The study keeps the stage as its name: runs and workers of every earlier version
    open their studies by that name (and a coordinator's history file is named after it)."""
    if ledger.study.user_attrs.get("run") != spec.name:
        ledger.study.set_user_attr("run", spec.name)
    return ledger


def best_trial(ledger: "Ledger") -> Any:
    """The stage's best completed trial: lowest scalarized loss, else best mean objective loss."""
    from optuna.trial import TrialState

    from evomerge.search import to_losses

    done = [t for t in ledger.trials((TrialState.COMPLETE,)) if ledger.eligible(t)]
    if not done:
        return None
    if ledger.scalarization is not None:
        return min(done, key=lambda t: (t.values[0], t.number))
    return min(done, key=lambda t: (float(to_losses(ledger.objective_values(t), ledger.directions).mean()), t.number))


def _stage_space(session: Session, stage: StageSpec, handover: "Handover") -> "SearchSpace":
    """The stage's space: its ``inherit`` kinds held at the previous stage's best values, and its
    starting point that best trial's recipe fitted to the space (a later stage continues from where
    the previous one got to; Evo-Merging's stage 2 starts at stage 1's best merge); the first stage
    starts at the spec's mergekit ``init``, if any, else at the template's ``init``."""
    space: SpaceSpec = stage.space  # type: ignore[assignment]
    if stage.inherit:
        kinds = list(space.searched_kinds)
        space = space.model_copy(update={"params": kinds + [k for k in stage.inherit if k not in kinds]})
    built = build_space(session.engine, space, handover.held)
    if session.spec.init is not None and stage.name == session.spec.resolved_stages()[0].name:
        built = start_from_mergekit(built, session.spec, session.engine, echo=True)
    elif handover.best is not None and stage.name != GRID_STAGE:
        built, _ = start_at(built, handover.best)
    return built


def _budget_seconds(stage: StageSpec, elapsed: float) -> float | None:
    wall = stage.budget.wall_clock  # type: ignore[union-attr]
    return None if wall is None else max(wall - elapsed, 0.0)


STOP_REASONS = {"budget": "evaluations", "time": "wall_clock", "exhausted": "exhausted", "interrupt": "signal"}
"""`SearchResult.stopped_by` -> the stop reason state.json, events.jsonl, ``status`` and the report use."""


def _run_stage(
    rd: RunDir, session: Session, stage: StageSpec, space: "SearchSpace", ledger: "Ledger", *, display: Display,
    events: EventLog,
) -> str:
    """One `run_search` call into the stage's ``ledger``; returns why it stopped (a `STOP_REASONS` value)."""
    from evomerge.search import make_optimizer, run_search

    spec, optimizer_spec = session.spec, stage.optimizer
    assert optimizer_spec is not None and stage.budget is not None
    optimizer = make_optimizer(optimizer_spec.factory_name, **optimizer_spec.options)
    if optimizer_spec.library == "optuna" and not ledger.trials():
        # Optuna samplers start from random points; the template's starting point (e.g. plain
        # TIES at the method's defaults) is the sensible first trial, as it is for nevergrad.
        ledger.study.enqueue_trial(space.start_params())
    scorer = PenalizedScorer(session.scorer, space) if optimizer_spec.l1_penalty > 0 else session.scorer
    elapsed, before = rd.start_stage(stage.name, stage.budget.model_dump())
    t0 = time.monotonic()
    stage_seconds = lambda: before + time.monotonic() - t0  # noqa: E731

    def checkpoint(_: Any) -> None:
        rd.write_state(elapsed={**elapsed, stage.name: stage_seconds()})

    if stage.name == GRID_STAGE:
        click.echo(f"stage {stage.name}: the built-in uniform grid baseline ({stage.budget.evaluations} recipes)")
    else:
        click.echo(f"stage {stage.name}: {optimizer_spec.factory_name} over {space.dim} parameters")
        scalar = describe_scalar(ledger_objectives(spec, optimizer_spec), optimizer_spec)
        if scalar is not None:
            click.echo(scalar)
    done_before = len(ledger.finished())
    events.emit("stage_start", stage=stage.name, optimizer=optimizer_spec.factory_name, parameters=space.dim,
                budget=stage.budget.model_dump(), finished_before=done_before, elapsed_before=round(before, 3))
    reporter = trial_reporter(stage.name, events=events, echo=click.echo if display.lines else None,
                              done_before=done_before, budget=stage.budget.evaluations, elapsed=stage_seconds)
    result = run_search(
        space, scorer, optimizer, ledger,
        budget_evals=stage.budget.evaluations, budget_seconds=_budget_seconds(stage, before),
        constraints=constraint_function(spec.constraints), callbacks=[checkpoint, reporter], progress=display.bars,
        fidelity=None if stage.name == GRID_STAGE else search_fidelity(spec, optimizer_spec),
    )
    checkpoint(None)
    reason = STOP_REASONS[result.stopped_by]
    events.emit("stage_end", stage=stage.name, stopped_by=reason, new_trials=result.n_new, finished=result.n_finished,
                seconds=round(result.wall_seconds, 3), elapsed=round(stage_seconds(), 3))
    if reason != "signal":
        rd.write_state(stopped_by={**rd.read_state().get("stopped_by", {}), stage.name: reason})
        click.echo(f"stage {stage.name}: stopped by {reason} after {result.n_finished} trials "
                   f"({result.n_new} new, {result.wall_seconds:.1f}s)")
    return reason


def search_fidelity(spec: ExperimentSpec, optimizer: OptimizerSpec) -> "Fidelity | None":
    """The spec's successive halving for a stage's `run_search` (None when off); the uniform grid
    baseline scores its 20 recipes in full."""
    from evomerge.search import Fidelity

    if spec.fidelity is None:
        return None
    return Fidelity(tuple(spec.fidelity.rungs), spec.fidelity.eta, promotion_score(ledger_objectives(spec, optimizer), optimizer))


def _grid_stage(session: Session, last: StageSpec) -> StageSpec:
    """The uniform grid baseline: one shared coefficient for all experts, every layer alike."""
    from evomerge.search import GridSearch

    grid = OptimizerSpec(library="baseline", name="grid")
    return StageSpec(name=GRID_STAGE, space=last.space, optimizer=grid,
                     budget=last.budget.model_copy(update={"evaluations": len(GridSearch()), "wall_clock": None}))


def spec_hash(rd: RunDir) -> str:
    """SHA-256 of the run's spec.yaml: which search an events log belongs to."""
    return hashlib.sha256(rd.spec_file.read_bytes()).hexdigest()


def _stop(rd: RunDir, events: EventLog, status: str, reason: str, stage: str | None, detail: str | None = None) -> None:
    """Record what ended this process's run: state.json (for `status`, the report) and the event."""
    stop = {"reason": reason, "stage": stage, "detail": detail}
    rd.write_state(status=status, stop=stop)
    events.emit("stop", status=status, **stop)


def run_stages(rd: RunDir, session: Session, signals: SignalLog, *, display: Display) -> int:
    """Run the stages not yet done, then the baseline, comparison and report; closes the session."""
    spec = session.spec
    stages = spec.resolved_stages()
    if spec.baseline:
        stages.append(_grid_stage(session, stages[-1]))
    state = rd.read_state()
    done: list[str] = list(state.get("stages_done", []))
    try:
        handover, opened = _reopen(rd, session, stages, done)
    except BaseException:
        session.close()
        raise
    events = EventLog(rd.events_file)
    events.emit("run_start", run=spec.name, spec_hash=spec_hash(rd), seed=spec.seed, resumed=bool(done or state.get("stage")),
                stages=[s.name for s in stages], stages_done=done, pid=os.getpid(), host=socket.gethostname())
    rd.write_state(status="running", stop=None, pid=os.getpid(), host=socket.gethostname())
    current: str | None = None
    try:
        for i, stage in enumerate(stages):
            if i < len(opened) and stage.name in done:
                continue  # reopened by `_reopen`, its handover included
            current = stage.name
            if i < len(opened):
                space, ledger = opened[i]
            else:
                space = _stage_space(session, stage, handover)
                ledger = open_ledger(rd, spec, stage.name, stage.optimizer, space)  # type: ignore[arg-type]
            if stage.name not in done:
                stopped_by = _run_stage(rd, session, stage, space, ledger, display=display, events=events)
                if stopped_by == "signal":
                    raise KeyboardInterrupt
                done.append(stage.name)
                rd.write_state(stages_done=done)
                export_stage(rd, stage.name, ledger)
            handover = _handover(ledger, stages, stage)
        current = None
        main = main_stage(rd)
        rd.write_state(stop={"reason": rd.read_state().get("stopped_by", {}).get(main), "stage": main, "detail": None})
        finish_run(rd, session)  # marks the run done once its last output is in place
        events.emit("stop", status="done", **rd.read_state()["stop"])
    except KeyboardInterrupt:
        code = signals.exit_code()
        last = signals.last()
        _stop(rd, events, "interrupted", "signal", current, None if last is None else signal.Signals(last).name)
        click.echo(f"\nstopped (exit {code}); continue with: evomerge resume {rd.path}", err=True)
        return code
    except Exception as exc:
        _stop(rd, events, "failed", "error", current, f"{type(exc).__name__}: {first_line(exc)}")
        raise
    finally:
        session.close()
    return 0


def _reopen(rd: RunDir, session: Session, stages: list[StageSpec], done: list[str]
            ) -> tuple[Handover, list[tuple["SearchSpace", "Ledger"]]]:
    """The finished stages' spaces and ledgers, then the next stage's, opened before the run
    writes anything: a ledger that no longer matches the spec (an edited spec.yaml) or has a
    damaged line is then one line with the run folder as it was, not a run marked failed.
    Returns the handover to the stage after the opened ones and the (space, ledger) per stage."""
    handover, opened = Handover(), []
    for stage in stages:
        space = _stage_space(session, stage, handover)
        ledger = open_ledger(rd, session.spec, stage.name, stage.optimizer, space)  # type: ignore[arg-type]
        opened.append((space, ledger))
        if stage.name not in done:
            break
        handover = _handover(ledger, stages, stage)
    return handover, opened


def export_stage(rd: RunDir, stage: str, ledger: "Ledger") -> None:
    """The stage's trials and front as CSV/JSON and its plots, for spreadsheets and notebooks."""
    from evomerge.search import export_results

    from ._plots import write_plots

    out = rd.results_dir(stage)
    export_results(ledger, out)
    if ledger.trials():
        write_plots(load_view(rd.path, stage), out)


@dataclass(frozen=True)
class Handover:
    """What a stage passes to the next: its best trial's recipe (the next stage's starting point)
    and the values of the kinds the next stage inherits (held fixed there)."""

    best: "MergeRecipe | None" = None
    held: dict[str, float] = dataclasses.field(default_factory=dict)


def _handover(ledger: "Ledger", stages: list[StageSpec], stage: StageSpec) -> Handover:
    """The next stage's `Handover` from this stage's best trial (by the same rule on every resume)."""
    from evomerge.search import kind_of, trial_recipe

    index = stages.index(stage)
    following = stages[index + 1] if index + 1 < len(stages) else None
    if following is None:
        return Handover()
    best = best_trial(ledger)
    if best is None:
        if following.inherit:
            raise UserError(f"stage {stage.name!r} has no completed trial for stage {following.name!r} to inherit from")
        return Handover()
    held = {name: float(v) for name, v in best.params.items() if kind_of(name) in following.inherit}
    return Handover(best=trial_recipe(ledger, best.number), held=held)


# ------------------------------------------------------------------------------------------ end of run


def _rescore_pick(rd: RunDir, session: Session, view: Any) -> "Rescored | None":
    """The stage's top trials re-scored on more calibration items (`experiments._rescore`); the
    result is also kept in the stage's study (user attribute ``rescored``)."""
    from ._rescore import rescore_run, top_trials

    spec = session.spec
    scores = {t.number: view.headline(t.values) for t in view.pick_pool()}
    recipes = {n: recipe_of(view, n) for n in top_trials(scores, spec.rescore.top)}
    rescored = rescore_run(spec, session.scorer, recipes, view.headline)
    if rescored is not None:
        import optuna

        from evomerge.search import storage_for

        storage, _ = storage_for(rd.storage(spec, shared=False))
        optuna.load_study(study_name=view.stage, storage=storage).set_user_attr("rescored", rescored.to_json())
    return rescored


def _comparison_note(grid: bool, mergekit: bool) -> str:
    """What the held-out table's rows are (only those it has)."""
    parts = ["Scores on the held-out sets (never seen by the search). Experts are the fine-tuned models themselves"]
    if mergekit:
        parts.append("mergekit rows are the spec's baselines")
    if grid:
        parts.append("the uniform grid is the best single shared coefficient chosen on the calibration sets")
    parts.append("the searched row is the front member with the best mean calibration score, and the re-scored "
                 "pick (when it differs) the best of the top front members scored again on more calibration items.")
    return "; ".join(parts)


def finish_run(rd: RunDir, session: Session) -> None:
    """After the last stage: reference points, the held-out comparison, the report, a summary."""
    spec = session.spec
    view = load_view(rd.path, main_stage(rd))
    experts = {**single_model_recipes(session.engine.expert_names), **baseline_recipes(spec, session.engine)}
    references = {label: session.scorer.evaluate(r).values for label, r in experts.items()}
    candidates = dict(experts)
    best = view.best_mean_trial()
    grid_best = None
    if spec.baseline:
        grid = load_view(rd.path, GRID_STAGE)
        grid_best = grid.best_mean_trial()
        if grid_best is not None:
            references[f"grid best (trial {grid_best})"] = grid.trial(grid_best).values
            candidates[f"uniform grid best (trial {grid_best})"] = recipe_of(grid, grid_best)
    pick = None
    if best is not None:
        pick = f"searched best mean (trial {best})"
        candidates[pick] = recipe_of(view, best)
    comparison: dict[str, Any] = {"references": references}
    rescored = _rescore_pick(rd, session, view)
    if rescored is not None:
        comparison["rescored"] = rescored.to_json()
        if rescored.pick != best:
            pick = f"searched pick re-scored on {rescored.items} items (trial {rescored.pick})"
            candidates[pick] = recipe_of(view, rescored.pick)
    if pick is not None:
        comparison["pick"] = pick  # the row the run reports as its merge
    holdout = [o.name for o in spec.objectives if o.holdout]
    if holdout:
        comparison.update(
            objectives=holdout,
            scores=holdout_scores(spec, session.scorer, candidates),
            note=_comparison_note(grid_best is not None, bool(spec.baselines)),
        )
    write_atomic(rd.comparison_file, json.dumps(comparison, indent=2) + "\n")
    if rescored is not None:
        click.echo(f"pick: trial {rescored.pick}, the best of the top {len(rescored.values)} re-scored on "
                   f"{rescored.items} calibration items (the search's own best: trial {best})")
    # the outputs describe the finished run; state.json says "done" only once they are all in place
    view = load_view(rd.path, view.stage)
    view = dataclasses.replace(view, state={**view.state, "status": "done"})
    report = None
    if spec.outputs.report:
        from ._report import write_report

        report = write_report(view)
    rd.write_state(status="done")
    click.echo(status_text(rd.path))
    if holdout:
        header, rows, _ = view.comparison_rows()
        click.echo("\nheld-out scores (mean over " + ", ".join(holdout) + "):")
        click.echo(format_table(header, rows))
    if report is not None:
        click.echo(f"\nreport: {report}")
