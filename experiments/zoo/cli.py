"""``evomerge zoo build``: build (or find cached) the toy zoo and print its accuracy table."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .architecture import ARCHS
from .sizes import ZOO_SIZES


@click.group(name="zoo")
def zoo() -> None:
    """The toy model zoo (base LM, skill experts, LoRA adapters, data)."""


@zoo.command(name="build")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Zoo directory (default: $EVOMERGE_CACHE/zoo/<size>-<arch>-seed<N>).")
@click.option("--size", type=click.Choice(list(ZOO_SIZES)), default="small", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--arch", type=click.Choice(list(ARCHS)), default="llama", show_default=True)
@click.option("--tied", is_flag=True, help="Tie input and output embeddings.")
@click.option("--force", is_flag=True, help="Rebuild even if a complete zoo is cached.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build(out: Path | None, size: str, seed: int, arch: str, tied: bool, force: bool, quiet: bool) -> None:
    """Build the zoo (or find it cached), print the accuracy table and the path."""
    from .build import ZooBuildError, build_zoo
    from .manifest import format_accuracy_table, load_manifest

    try:
        path = build_zoo(size=size, seed=seed, arch=arch, out=out, force=force, progress=not quiet,
                         tie_word_embeddings=tied)
    except ZooBuildError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    manifest = load_manifest(path)
    click.echo(format_accuracy_table(manifest))
    click.echo(f"built in {manifest['build_seconds']:.1f} s (exact match on test splits)")
    click.echo(str(path))


if __name__ == "__main__":
    zoo()
