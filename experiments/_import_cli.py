"""``evomerge import``: specs from other tools' configs (the migration path, docs/experiments.md)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group(name="import")
def import_group() -> None:
    """Turn another tool's config into an evomerge spec."""


@import_group.command(name="mergekit-evolve")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Spec file to write (default: <config stem>.evomerge.yaml).")
@click.option("--name", help="Experiment name (default: the config's file stem).")
@click.option("--max-fevals", "evaluations", type=click.IntRange(min=1), default=100, show_default=True,
              help="mergekit-evolve's --max-fevals: the evaluation budget.")
@click.option("--task-search-path", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="mergekit-evolve's --task-search-path: the folder of your own lm-eval task YAML files.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="mergekit-evolve's --timeout (seconds): the wall-clock budget.")
def mergekit_evolve(config: Path, out: Path | None, name: str | None, evaluations: int, task_search_path: Path | None,
                    timeout: float | None) -> None:
    """Convert a mergekit-evolve CONFIG (genome + lm-eval tasks) into an evomerge spec."""
    from ._mergekit_import import write_imported_spec

    out = out or config.with_name(f"{config.stem}.evomerge.yaml")
    notes = write_imported_spec(config, out, name=name, evaluations=evaluations, wall_clock=timeout,
                                include_path=None if task_search_path is None else task_search_path.resolve())
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"spec: {out}\nrun it with: evomerge run {out}")
