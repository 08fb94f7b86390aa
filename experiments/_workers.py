"""``evomerge worker`` and ``evomerge run --workers N``: one search shared by several processes.

A worker loads its own engine and scorer (one per GPU) and runs `evomerge.search.run_search` (the
same loop as a single-process run, here as one worker of several) on the spec's (single) stage in
a shared storage: PostgreSQL across machines, or the run folder's
SQLite file on one machine (both are optuna RDB storages, so trials heartbeat and a dead worker's
trial is retried once). ``run --workers N`` starts N local workers, one per visible GPU
(``CUDA_VISIBLE_DEVICES``) or N CPU workers, and exports the results when they are done.
See docs/scale-out.md.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ._errors import UserError
from ._fitness import PenalizedScorer, constraint_function, ledger_objectives, scalarization
from ._preflight import check_optimizers, check_ledger_location, preflight
from ._resolve import resolve
from ._rundir import RunDir
from ._spec import ExperimentSpec, StageSpec
from ._spec_io import dump_spec

if TYPE_CHECKING:
    from evomerge.search import Ledger, SearchSpace

    from ._runlog import Display
    from ._signals import SignalLog

HEARTBEAT_SECONDS = 10
"""Trial heartbeat: a worker silent for two intervals is presumed dead and its trial retried."""


def _single_stage(spec: ExperimentSpec) -> StageSpec:
    stages = spec.resolved_stages()
    if len(stages) != 1 or stages[0].budget is None or stages[0].budget.evaluations is None:
        raise UserError("workers share single-stage specs with budget.evaluations (an exact, shared count)")
    return stages[0]


def _is_database(storage: str) -> bool:
    return "://" in storage or Path(storage).suffix in (".db", ".sqlite", ".sqlite3")


def open_shared_ledger(spec: ExperimentSpec, stage: StageSpec, storage: str, space: "SearchSpace", *, heartbeat: int) -> "Ledger":
    """The stage's study in ``storage``, with trial heartbeats on databases."""
    from evomerge.search import Ledger

    import sqlalchemy

    from ._run import label_study

    assert stage.optimizer is not None
    objectives = ledger_objectives(spec, stage.optimizer)
    for attempt in range(5):
        try:
            return label_study(Ledger(
                storage, objectives=objectives, study_name=stage.name, seed=spec.seed,
                scalarization=scalarization(objectives, stage.optimizer), space=space.to_dict(),
                heartbeat=heartbeat,
            ), spec)
        except sqlalchemy.exc.SQLAlchemyError:
            # workers starting together race to create optuna's tables and the study; the
            # loser's CREATE fails once the winner's is committed, and a retry then loads them
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def work(
    spec: ExperimentSpec, *, storage: str, worker_id: str | None, heartbeat: int, lease_ttl: float, queue: int,
    display: "Display", signals: "SignalLog",
) -> int:
    """``evomerge worker``: evaluate the shared study's trials until its budget is spent."""
    from evomerge.search import make_optimizer, run_search

    from ._build import build_space
    from ._run import Session, search_fidelity
    from ._runlog import trial_reporter

    stage = _single_stage(spec)
    assert stage.optimizer is not None and stage.budget is not None and stage.space is not None
    worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
    try:
        session = Session.open(spec, display=display)
    except KeyboardInterrupt:
        return signals.exit_code()
    t0 = time.monotonic()
    try:
        space = build_space(session.engine, stage.space)
        ledger = open_shared_ledger(spec, stage, storage, space, heartbeat=heartbeat)
        optimizer = make_optimizer(stage.optimizer.factory_name, **stage.optimizer.options)
        scorer = PenalizedScorer(session.scorer, space) if stage.optimizer.l1_penalty > 0 else session.scorer
        # this worker's own trials; the shared count is the ledger's (`evomerge status`)
        lines = [trial_reporter(f"{stage.name} {worker_id}", events=None, echo=click.echo, done_before=0, budget=None,
                                elapsed=lambda: time.monotonic() - t0)] if display.lines else []
        result = run_search(
            space, scorer, optimizer, ledger, budget_evals=stage.budget.evaluations, worker_id=worker_id,
            constraints=constraint_function(spec.constraints), queue=queue, lease_ttl=lease_ttl, progress=False,
            callbacks=lines, fidelity=search_fidelity(spec, stage.optimizer),
        )
    finally:
        session.close()
    ratio = result.overhead_seconds / result.evaluation_seconds if result.evaluation_seconds else float("nan")
    click.echo(
        f"worker {worker_id}: {result.n_new} trials, {result.gave_back} claims given back, "
        f"evaluation {result.evaluation_seconds:.3f} s, coordination {result.overhead_seconds:.3f} s "
        f"({100 * ratio:.1f}%), stopped by {result.stopped_by}"
    )
    return signals.exit_code() if result.stopped_by == "interrupt" else 0


def worker_command(
    spec_path: Path, *, overrides: list[str], storage: str | None, worker_id: str | None, heartbeat: int,
    lease_ttl: float, queue: int, display: "Display", signals: "SignalLog",
) -> int:
    """Parse and resolve the spec, then `work` (the CLI's ``worker`` command)."""
    from ._run import load_spec_with_overrides

    parsed, label = load_spec_with_overrides(spec_path, None, overrides)
    storage = storage or parsed.storage
    if storage is None:
        raise UserError("give --storage URL (or set `storage:` in the spec): the study the workers share")
    if not _is_database(storage):
        raise UserError(f"--storage {storage}: workers share a database (postgresql+psycopg2://... or a .db SQLite file)")
    check_ledger_location(storage)
    check_optimizers(parsed)
    spec = resolve(parsed, label=label, progress=display.bars)
    return work(spec, storage=storage, worker_id=worker_id, heartbeat=heartbeat, lease_ttl=lease_ttl, queue=queue,
                display=display, signals=signals)


def run_workers(spec_path: Path, *, run_dir: Path | None, workers: int, overrides: list[str], display: "Display",
                signals: "SignalLog") -> int:
    """``evomerge run SPEC --workers N`` (see `launch`)."""
    from ._run import load_spec_with_overrides

    parsed, _ = load_spec_with_overrides(spec_path, None, overrides)
    return launch(parsed, spec_path, run_dir=run_dir, workers=workers, display=display, signals=signals)


def launch(spec: ExperimentSpec, spec_path: Path, *, run_dir: Path | None, workers: int, display: "Display",
           signals: "SignalLog") -> int:
    """``evomerge run --workers N``: N local worker processes search the run's stage, then this
    process ends the run as a single-process run does (`_run.run_stages`: the uniform grid
    baseline when the spec asks for it, the re-scored pick, the held-out comparison, the report,
    status ``done``). Interrupted or failed workers leave the run resumable by the same command."""
    from ._build import build_objectives
    from ._run import same_spec

    stage = _single_stage(spec)
    rd = RunDir((run_dir or spec.run_dir()).resolve())
    resolved = resolve(spec, label=str(spec_path), progress=False)
    resolved = resolved.model_copy(update={"outputs": resolved.outputs.model_copy(update={"run_dir": str(rd.path)})})
    if rd.exists() and not same_spec(rd.load_spec(check_paths=False), resolved):
        raise UserError(f"{rd.path} holds a run of a different spec; pick another --run-dir")
    storage = rd.storage(resolved)
    preflight(resolved, rd)  # before the folder exists
    build_objectives(resolved)  # the calibration sets (and lm-eval tasks) load, or fail in one line, before it too
    if not rd.exists():
        rd.path.mkdir(parents=True, exist_ok=True)
        dump_spec(resolved, rd.spec_file)
        rd.write_state(status="created", name=resolved.name, elapsed={})
        click.echo(f"run folder: {rd.path}")
    elapsed, before = rd.start_stage(stage.name, stage.budget.model_dump(), stop=None, workers=workers)  # type: ignore[union-attr]
    t0 = time.monotonic()
    codes = _run_worker_processes(rd, storage, workers, signals)
    rd.write_state(elapsed={**elapsed, stage.name: before + time.monotonic() - t0})
    click.echo(f"workers exited with {codes}")
    failed = next((c for c in codes if c != 0), 0)
    if failed or signals.last() is not None:
        rd.write_state(status="interrupted", stop={"reason": "workers", "stage": stage.name, "detail": f"exit codes {codes}"})
        click.echo(f"continue with: evomerge run {spec_path} --workers {workers}" + (f" --run-dir {rd.path}" if run_dir else ""), err=True)
        return signals.exit_code() if signals.last() is not None else failed
    return _finish(rd, resolved, stage, storage, display, signals)


def _finish(rd: RunDir, spec: ExperimentSpec, stage: StageSpec, storage: str, display: "Display",
            signals: "SignalLog") -> int:
    """After the workers spent the budget: the stage's exports, then what follows the search in a
    single-process run (`_run.run_stages`, which sees the stage done), in this process."""
    from ._build import build_space
    from ._run import Session, export_stage, run_stages

    try:
        session = Session.open(spec, display=display)
    except KeyboardInterrupt:
        return signals.exit_code()
    try:
        ledger = open_shared_ledger(spec, stage, storage, build_space(session.engine, stage.space),  # type: ignore[arg-type]
                                    heartbeat=HEARTBEAT_SECONDS)
        export_stage(rd, stage.name, ledger)
        click.echo(f"{len(ledger.finished())} trials in {storage}; results in {rd.results_dir(stage.name)}")
        rd.write_state(stages_done=[stage.name], stopped_by={stage.name: "evaluations"})
    except BaseException:
        session.close()
        raise
    return run_stages(rd, session, signals, display=display)


def _run_worker_processes(rd: RunDir, storage: str, workers: int, signals: "SignalLog") -> list[int]:
    """Start the workers (one per visible GPU, else on the CPU) and wait for all of them. A stop
    of this process (SIGINT reaches the workers from the terminal; SIGTERM is passed on) lets
    each worker give its trial back before this returns."""
    gpus = _visible_gpus()
    procs = []
    for i in range(workers):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        cmd = [sys.executable, "-m", "evomerge.experiments.cli", "worker", str(rd.spec_file), "--storage", storage,
               "--worker-id", f"{socket.gethostname()}-w{i}", "--queue", str(workers), "--quiet"]
        procs.append(subprocess.Popen(cmd, env=env))
    while True:
        try:
            return [p.wait() for p in procs]
        except KeyboardInterrupt:
            for p in procs:
                if p.poll() is None:
                    p.terminate()


def _visible_gpus() -> list[str]:
    """GPU ids a worker may be pinned to: those of CUDA_VISIBLE_DEVICES, else all torch sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]
