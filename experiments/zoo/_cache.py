"""The fixture cache shared by the toy zoo and the real-shaped models.

A fixture is a folder under ``$EVOMERGE_CACHE`` whose manifest carries its cache key. A build
writes into a temporary sibling folder and renames it into place only when complete, so a killed
build never leaves a folder that looks finished, and two concurrent builds of one key keep
whichever finished first. The torch thread count is fixed during a build because CPU matmul
reductions depend on it: a fixture must not depend on the machine's core count.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .manifest import load_manifest


class ZooBuildError(RuntimeError):
    """A fixture cannot be built with the given arguments (bad size/arch, unwritable directory)."""


def cache_root() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge"))


def is_complete(folder: Path, key: dict) -> bool:
    """Whether ``folder`` holds a finished fixture built with exactly ``key``."""
    try:
        manifest = load_manifest(folder)
    except (OSError, ValueError):
        return False
    return all(manifest.get(k) == v for k, v in key.items())


def build_cached(
    out_dir: Path, key: dict, build: Callable[[Path], None], *, force: bool, threads: int,
    error: type[Exception], what: str,
) -> Path:
    """``out_dir`` holding a complete fixture of ``key``: found as is (unless ``force``), or made
    by ``build(tmp)`` (which must write the manifest with ``key`` last) and moved into place.

    Raises ``error`` (one line naming ``out_dir``) when the location cannot take it.
    """
    if not force and is_complete(out_dir, key):
        return out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise error(f"output path {out_dir} exists and is not a directory")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    except OSError as e:
        raise error(f"cannot write {what} to {out_dir}: {e.strerror or e}") from e
    try:
        with _fixed_threads(threads):
            build(tmp)
        _publish(tmp, out_dir, key, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@contextmanager
def _fixed_threads(n: int) -> Iterator[None]:
    import torch  # here: the cache is looked up by commands that never build (the CLI's error types)

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _publish(tmp: Path, out_dir: Path, key: dict, force: bool) -> None:
    """Move a finished build into place; an old or concurrent fixture is replaced/kept atomically."""
    if out_dir.exists():
        if not force and is_complete(out_dir, key):  # a concurrent build finished first
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, out_dir)
