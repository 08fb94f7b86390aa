"""``evomerge demo``: the toy zoo and what merging it achieves, for a newcomer, in minutes on a laptop."""

from __future__ import annotations

import click


def run_demo(size: str = "small") -> None:
    """Build (or reuse) the toy zoo and print each model's accuracy per skill."""
    from evomerge.experiments.zoo import build_zoo, format_accuracy_table, load_manifest

    zoo = build_zoo(size)
    click.echo(f"toy zoo ({size}): {zoo}")
    click.echo(format_accuracy_table(load_manifest(zoo)))
