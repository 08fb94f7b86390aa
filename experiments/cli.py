"""The ``evomerge`` command line: run, resume and inspect searches; batch queues; the toy zoo; the demo.

Commands stay thin: each parses its options and calls one function of an ``experiments/_*.py``
module, so everything the CLI does is also available from Python. Heavy imports (torch,
transformers) happen inside commands, which keeps ``evomerge --help`` instant.

Bad input (a spec error, a missing file, an incompatible checkpoint, a malformed calibration set)
is one line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from ._errors import UserError, user_error_types


class _Main(click.Group):
    """Root group that turns input errors into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except user_error_types() as exc:
            click.echo(f"evomerge: {UserError.message_of(exc)}", err=True)
            sys.exit(2)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="evomerge")
def main() -> None:
    """Evolutionary and multi-objective search over per-layer LLM merge recipes."""
    # No network at run time unless the user asks for it explicitly.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@main.command()
@click.option("--size", default="small", show_default=True, help="Zoo size to build and search.")
def demo(size: str) -> None:
    """Build the toy zoo (cached) and show what merging it can do."""
    from ._demo import run_demo

    run_demo(size=size)
