"""Atomic outputs: a file or a folder appears complete, or not at all.

Every output a user may open after a kill (an exported model, the report, the CSV/JSON exports,
state files, optimizer state) is written beside its final name and renamed into place, so a
SIGKILL at any moment leaves the old version or the complete new one, never a half. This module
is the one home of that rule; `merge` is the lowest package, so `search` and `experiments` reuse
it from here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def _umask() -> int:
    """The process's umask, read without setting it (`os.umask` would change it for every thread
    for a moment): Linux reports it in /proc/self/status; elsewhere the common 0o022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable across a machine restart."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "w", *, encoding: str | None = "utf-8",
                newline: str | None = None, durable: bool = True) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``.

    ``durable``: fsync the file and the folder (state a resume reads); exports that can be
    redone skip the fsyncs but keep the all-or-nothing rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # name the output asked for, not the random sibling nobody asked for
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    binary = "b" in mode
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make the output private to its writer
        with os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else newline) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) all at once (see `atomic_file`)."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w", durable=durable) as f:
        f.write(data)


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder in a temporary sibling and rename it to ``path`` when the block succeeds.

    An existing ``path`` is replaced only after the new folder is complete (it is moved aside,
    the new one renamed in, then the old one removed), so a kill leaves the old folder, the new
    one, or a hidden ``.<name>.*`` leftover that no reader takes for an export.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would make an exported model private to its writer
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
