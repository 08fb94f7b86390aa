"""The ``evomerge`` command line: run, resume and inspect searches; batch queues; the toy zoo; the demo.

Commands stay thin: each parses its options and calls one function of an ``experiments/_*.py``
module, so everything the CLI does is also available from Python. Heavy imports (torch,
transformers) happen inside commands, which keeps ``evomerge --help`` instant.

Bad input (a spec error, a missing file, an incompatible checkpoint, a malformed calibration set)
is one line on stderr and exit status 2, before anything is written. SIGINT / SIGTERM stop a run:
the trial in flight goes back to the queue, and the exit status is 130 / 143; ``evomerge resume``
continues.

This module is the edge where process-wide settings belong: the signal handlers (`_signals`,
installed around the commands that search) and the allocator setting of the merge engine
(`evomerge.merge.fixed_mmap_threshold`, before anything loads a model). The library installs
neither.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from ._errors import UserError, user_error_types
from ._import_cli import import_group
from .zoo.cli import zoo as zoo_group


class _Main(click.Group):
    """Root group that turns input errors into one line on stderr and exit status 2, and file
    system failures (a full disk, a folder without write permission) into one line and status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except user_error_types() as exc:
            for line in UserError.message_of(exc).splitlines():
                click.echo(f"evomerge: {line}", err=True)
            sys.exit(2)
        except OSError as exc:
            click.echo(f"evomerge: {exc}; fix it and rerun (outputs are written atomically, a run resumes)", err=True)
            sys.exit(1)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="evomerge")
def main() -> None:
    """Evolutionary and multi-objective search over per-layer LLM merge recipes.

    \b
    Start with `evomerge demo`, then `evomerge presets` and `evomerge run --preset NAME`.
    Specs are documented in docs/experiments.md, commands in docs/cli.md.
    """
    # No network at run time unless the user asks for it explicitly.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Library deprecation notices (optuna, transformers) are for developers, not for run logs.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".* is experimental")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and `status` report trials


def _searching(command: Any) -> int:
    """Run ``command(signals)`` as a search does: the merge engine's allocator setting first, and
    SIGTERM turned into ``KeyboardInterrupt`` (as SIGINT is), recorded for the exit status."""
    from evomerge.merge import fixed_mmap_threshold

    from ._signals import SignalLog

    fixed_mmap_threshold()
    with SignalLog() as signals:
        return command(signals)


main.add_command(zoo_group)
main.add_command(import_group)

_run_dir_arg = click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))


@main.command()
@click.argument("spec", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--preset", help="Run a shipped preset instead of a spec file (see `evomerge presets`).")
@click.option("--run-dir", type=click.Path(path_type=Path, file_okay=False), help="Run folder (default: runs/<name>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a spec field, e.g. --set budget.evaluations=20 --set models.zoo.size=tiny.")
@click.option("--quiet", is_flag=True, help="No progress bars: one line per finished trial instead (as in a log).")
@click.option("--workers", type=click.IntRange(min=1), help="Start N local worker processes (one per visible GPU); see docs/scale-out.md.")
def run(spec: Path | None, preset: str | None, run_dir: Path | None, overrides: tuple[str, ...], quiet: bool, workers: int | None) -> None:
    """Run the search described by SPEC (or --preset NAME); resumes if RUN_DIR holds the same spec."""
    from ._run import start
    from ._runlog import Display

    if (spec is None) == (preset is None):
        raise UserError("give a SPEC file or --preset NAME (one of them)")
    display = Display.for_terminal(quiet)
    if workers is not None:
        from ._workers import run_workers

        if spec is None:
            raise UserError("--workers needs a SPEC file")
        sys.exit(_searching(lambda signals: run_workers(spec, run_dir=run_dir, workers=workers, overrides=list(overrides),
                                                        display=display, signals=signals)))
    sys.exit(_searching(lambda signals: start(spec=spec, preset=preset, run_dir=run_dir, overrides=list(overrides),
                                              display=display, signals=signals)))


@main.command()
@click.argument("spec", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--storage", help="Shared study storage, e.g. postgresql+psycopg2://user@host/db (default: the spec's).")
@click.option("--worker-id", help="Name of this worker in the ledger (default: host-pid).")
@click.option("--queue", type=click.IntRange(min=1), default=4, show_default=True, help="Candidates a nevergrad coordinator keeps in flight (about the number of workers).")
@click.option("--heartbeat", type=click.IntRange(min=1), default=10, show_default=True, help="Trial heartbeat seconds (dead after 2).")
@click.option("--lease-ttl", type=float, default=30.0, show_default=True, help="Seconds before a silent coordinator is replaced (and a stale trial whose retry never came is re-queued).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec field.")
@click.option("--quiet", is_flag=True, help="No progress bars: one line per finished trial instead (as in a log).")
def worker(spec: Path, storage: str | None, worker_id: str | None, queue: int, heartbeat: int, lease_ttl: float,
           overrides: tuple[str, ...], quiet: bool) -> None:
    """Join the search of SPEC in a shared storage and evaluate its candidates (docs/scale-out.md)."""
    from ._runlog import Display
    from ._workers import worker_command

    display = Display.for_terminal(quiet)
    sys.exit(_searching(lambda signals: worker_command(
        spec, overrides=list(overrides), storage=storage, worker_id=worker_id, heartbeat=heartbeat, lease_ttl=lease_ttl,
        queue=queue, display=display, signals=signals,
    )))


@main.command()
@_run_dir_arg
@click.option("--quiet", is_flag=True, help="No progress bars: one line per finished trial instead (as in a log).")
def resume(run_dir: Path, quiet: bool) -> None:
    """Continue an interrupted run where its ledger stopped."""
    from ._run import resume as resume_run
    from ._runlog import Display

    display = Display.for_terminal(quiet)
    sys.exit(_searching(lambda signals: resume_run(run_dir, display=display, signals=signals)))


@main.command()
@_run_dir_arg
def status(run_dir: Path) -> None:
    """Progress, best so far per objective, front size, hypervolume and ETA of a run."""
    from ._inspect import status_text

    click.echo(status_text(run_dir))


@main.command()
@_run_dir_arg
@click.option("--stage", help="Stage of a multi-stage run (default: the last one started).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def front(run_dir: Path, stage: str | None, fmt: str) -> None:
    """The Pareto front of a run (trial numbers for `evomerge export`)."""
    from ._inspect import front_text

    click.echo(front_text(run_dir, stage=stage, fmt=fmt))


@main.command()
@_run_dir_arg
@click.option("--trial", required=True, type=int, help="Trial number (see `evomerge front`).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), help="Output folder (default: <run>/exports/trial-N).")
@click.option("--stage", help="Stage of a multi-stage run (default: the last one started).")
def export(run_dir: Path, trial: int, out: Path | None, stage: str | None) -> None:
    """Write one trial's merged model as a Hugging Face folder (+ recipe.json, mergekit.yaml)."""
    from evomerge.merge import fixed_mmap_threshold

    from ._inspect import export_trial

    fixed_mmap_threshold()
    path = export_trial(run_dir, trial, out=out, stage=stage)
    click.echo(f"exported trial {trial} to {path}")


@main.command()
@_run_dir_arg
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Output file (default: <run>/report.html).")
def report(run_dir: Path, out: Path | None) -> None:
    """Write the run's self-contained HTML report (plots embedded, tables, spec)."""
    from ._inspect import write_run_report

    click.echo(f"report: {write_run_report(run_dir, out=out)}")


@main.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--batch-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("runs/batch"),
              show_default=True, help="Folder for the queue's state, logs and run folders.")
@click.option("--retry-failed", is_flag=True, help="Run specs that failed in an earlier pass again.")
def batch(specs: tuple[Path, ...], batch_dir: Path, retry_failed: bool) -> None:
    """Run SPECS in order, overnight: each resumable, failures recorded and skipped; rerun to continue."""
    from ._batch import run_batch

    missing = [s for s in specs if not s.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: no such spec file")
    sys.exit(run_batch(list(specs), batch_dir, retry_failed=retry_failed, echo=click.echo))


@main.command()
def presets() -> None:
    """List the shipped presets (run one with `evomerge run --preset NAME`)."""
    from ._spec_io import load_spec, preset_names, preset_path

    for name in preset_names():
        click.echo(f"{name:18s} {load_spec(preset_path(name)).description}")


@main.command()
@click.option("--size", default="small", show_default=True, type=click.Choice(["tiny", "small"]), help="Zoo size.")
@click.option("--run-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("runs/demo"), show_default=True)
@click.option("--minutes", type=float, default=4.0, show_default=True, help="Wall-clock budget of the search.")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Cap on the search's evaluations (default: the preset's 200).")
@click.option("--quick", is_flag=True, help="The first-run check: tiny zoo, 12 trials, at most 2 min of search (overrides --size/--minutes/--trials).")
def demo(size: str, run_dir: Path, minutes: float, trials: int | None, quick: bool) -> None:
    """Build the toy zoo, search Pareto-optimal merges, compare them with the experts and the grid."""
    from ._demo import QUICK, run_demo
    from ._runlog import Display

    if quick:
        size, minutes, trials = QUICK["size"], QUICK["minutes"], QUICK["trials"]
    display = Display.for_terminal(quiet=False)
    sys.exit(_searching(lambda signals: run_demo(size, run_dir, minutes, trials, display=display, signals=signals)))


if __name__ == "__main__":
    main()
