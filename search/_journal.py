"""`JournalFile`: optuna's journal format in one append-only file, on optuna's public backend ABC.

optuna's own `JournalFileBackend` fsyncs every append (a native sampler appends a line per
parameter) and locks with a lock *file* that a SIGKILLed holder leaves behind (a 30 s wait). This
backend (a file optuna-dashboard and `JournalFileBackend` read) appends under ``flock``, which the
kernel releases when its holder dies, and fsyncs only in `sync` (`Ledger.sync`); lines reach the OS
at once, so a killed process loses nothing. A torn last line (power loss) is cut when a writer
opens the file; a reader (``read_only``: `evomerge status`, `front`, `export`) leaves the file as it
is and reads up to that line.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from optuna.storages.journal import BaseJournalBackend


class LedgerError(ValueError):
    """A ledger that cannot serve this run: a damaged journal line, or a study recorded for
    another search (one-line message; a user error, not a bug)."""


class JournalFile(BaseJournalBackend):
    """An optuna journal file shared by the processes of one machine (module docstring)."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._offsets = [0]  # byte offset of log line i (known prefix of the file)
        self._synced = -1
        if read_only:
            self._out = open(self.path, "rb", buffering=0)  # a missing file is the reader's error
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.path, "ab", buffering=0)  # O_APPEND: every write lands at the end
        with _flock(self._out.fileno()):
            size = os.fstat(self._out.fileno()).st_size
            if size:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.seek(0)
                        os.truncate(self.path, f.read().rfind(b"\n") + 1)

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        known = len(self._offsets) - 1
        start = min(log_number_from, known)
        if start == known and os.fstat(self._out.fileno()).st_size == self._offsets[-1]:
            return  # nothing appended since the last read (optuna reads before every call)
        with open(self.path, "rb") as f:
            f.seek(self._offsets[start])
            for number, line in enumerate(f, start=start):
                if not line.endswith(b"\n"):
                    return  # being appended right now; read it next time
                if number == len(self._offsets) - 1:
                    self._offsets.append(self._offsets[-1] + len(line))
                if number >= log_number_from:
                    yield _record(line, self.path, number)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        if self.read_only:
            raise PermissionError(f"{self.path}: opened read-only (an inspection command writes no trial)")
        data = memoryview(("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode())
        with _flock(self._out.fileno()):
            while data:
                data = data[self._out.write(data):]

    def sync(self) -> None:
        """fsync the file, unless nothing was appended since the last one."""
        size = os.fstat(self._out.fileno()).st_size
        if size != self._synced:
            os.fsync(self._out.fileno())
            self._synced = size


def _record(line: bytes, path: Path, number: int) -> dict[str, Any]:
    """One journal line as optuna's record, or a `LedgerError` naming the file and line (optuna
    replays every record in order, so a damaged one cannot be skipped)."""
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise LedgerError(f"{path}: line {number + 1} is not a journal record ({type(exc).__name__}); "
                          "the ledger is damaged: restore it from a copy") from None
    if not isinstance(record, dict):
        raise LedgerError(f"{path}: line {number + 1} is a JSON {type(record).__name__}, not a journal record; "
                          "the ledger is damaged: restore it from a copy")
    return record


@contextmanager
def _flock(fd: int) -> Iterator[None]:
    """An exclusive ``flock`` for a ``with`` block."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
