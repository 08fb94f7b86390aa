"""``evomerge zoo build`` (the toy zoo and its accuracy table) and ``evomerge zoo build-real`` (real-shaped fixtures)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .families import FAMILIES
from .sizes import ARCHS, ZOO_SIZES


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
    from ._cache import ZooBuildError
    from .build import build_zoo
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


@zoo.command(name="build-real")
@click.option("--family", type=click.Choice(list(FAMILIES)), default="qwen2.5", show_default=True,
              help="Published architecture: qwen2.5 (Qwen2.5-0.5B), llama3.2 (Llama-3.2-1B), "
                   "mistral0.3 (Mistral-7B-v0.3), gemma2 (Gemma-2-2B).")
@click.option("--layers", type=click.IntRange(min=1), default=None,
              help="Decoder layers kept (default: qwen2.5 4, the others 2).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Fixture directory (default: $EVOMERGE_CACHE/real-shapes/<family>-L<layers>-seed<N>).")
@click.option("--force", is_flag=True, help="Rebuild even if a complete fixture is cached.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def build_real(family: str, layers: int | None, seed: int, out: Path | None, force: bool, quiet: bool) -> None:
    """Build a real-shaped fixture (published config, random weights, few layers, bf16 shards,
    fine-tuned experts, one LoRA adapter) or find it cached; print its summary and path."""
    from .manifest import load_manifest
    from .real_shapes import RealShapeError, build_real_shape

    try:
        path = build_real_shape(family, layers=layers, seed=seed, out=out, force=force, progress=not quiet)
    except RealShapeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(format_real_shape(load_manifest(path)))
    click.echo(str(path))


def format_real_shape(manifest: dict) -> str:
    """A few lines: source, shape, folders (shards, size) and the experts' training losses."""
    m = manifest["model"]
    lines = [f"{manifest['family']}: {manifest['source']} config, {m['num_layers']} layers, "
             f"{m['n_params'] / 1e6:.0f}M parameters, vocabulary {m['vocab_size']:,} ({manifest['features']})"]
    for name, info in manifest["folders"].items():
        lines.append(f"  {name:14s} {info['shards']} shards, {info['bytes'] / 2**20:.0f} MiB (bf16)")
    for name, t in manifest["training"].items():
        lines.append(f"  {name:14s} {t['steps']} AdamW steps, loss {t['first_loss']:.2f} -> {t['final_loss']:.2f}")
    lines.append(f"built in {manifest['build_seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    zoo()
