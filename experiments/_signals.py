"""Stopping on SIGINT / SIGTERM: exit 130 / 143 after a clean checkpoint.

Two situations:

* a run (`SignalLog`, installed by the CLI around ``run``, ``resume``, ``worker`` and ``demo``):
  SIGTERM is made to interrupt like SIGINT does, so the search loop (`evomerge.search.run_search`,
  which installs no handler) stops cleanly on either (the trial in flight goes back to the queue),
  and loading or reporting stops too. A wakeup fd records which signal it was, for the exit
  status (130 for Ctrl-C, 143 for a scheduler's SIGTERM).
* a batch queue (`graceful_stop`): the parent must not die while its child checkpoints; the
  first signal is forwarded to the child and raises a flag the queue checks between specs, a
  second one interrupts at once.
"""

from __future__ import annotations

import signal
import socket
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Callable, Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""Shell convention: 128 + signal number."""


class StopRequest:
    """Set by a signal handler, read by the run loop between trials."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        """True once a stop was requested (the run loop's ``should_stop`` callback)."""
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(signal.Signals(self.signum), 1) if self.signum is not None else 0


class StopNow(KeyboardInterrupt):
    """A second signal: stop immediately, even inside a trial."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def graceful_stop(on_first: Callable[[int], None] | None = None) -> Iterator[StopRequest]:
    """Install SIGINT/SIGTERM handlers for the duration of a run (main thread only)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.signum is not None:
            raise StopNow(signum)
        stop.signum = signum
        if on_first is not None:
            on_first(signum)

    previous = {s: signal.signal(s, handler) for s in EXIT_CODES}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class SignalLog:
    """Records which stop signal arrived during a run (see the module docstring)."""

    def __init__(self) -> None:
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        self._previous: dict[int, object] = {}
        self._old_fd = -1
        self._seen: list[int] = []

    def __enter__(self) -> "SignalLog":
        if threading.current_thread() is threading.main_thread():
            self._reader, self._writer = socket.socketpair()
            for sock in (self._reader, self._writer):
                sock.setblocking(False)
            self._old_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
            self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt)}
        return self

    def __exit__(self, *exc: object) -> None:
        if self._reader is None:
            return
        self.last()
        signal.set_wakeup_fd(self._old_fd)
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._reader.close()
        self._writer.close()  # type: ignore[union-attr]
        self._reader = None

    def last(self) -> int | None:
        """The last SIGINT/SIGTERM received so far (None when none)."""
        if self._reader is not None:
            try:
                while data := self._reader.recv(4096):
                    self._seen.extend(b for b in data if b in EXIT_CODES)
            except BlockingIOError:
                pass
        return self._seen[-1] if self._seen else None

    def exit_code(self) -> int:
        """130 / 143 for the signal that stopped the run (130 when it is unknown)."""
        last = self.last()
        return EXIT_CODES[signal.Signals(last)] if last is not None else EXIT_CODES[signal.SIGINT]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)
