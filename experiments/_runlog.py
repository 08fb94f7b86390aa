"""What a run tells the people and programs watching it: progress bars on a terminal, one line per
finished trial in a log, and ``events.jsonl`` in the run folder.

An overnight run writes to a log file, where carriage-return progress bars make one endless line
and record nothing per trial; so a run on a terminal shows bars, and anywhere else (a log file, a
pipe, ``--quiet``) prints one plain line per finished trial instead (`Display`). Beside it,
``events.jsonl`` is the machine-readable record of the same story: the run's start (spec hash,
seed), each stage's start and end, every finished trial (values, timings, failure, memory) and the
stop with its reason, one JSON object per line, appended and flushed per event.

These are side effects of the command line, so they live here and reach the search only as the
callbacks `evomerge.search.run_search` takes; the library itself prints nothing per trial.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ._results import format_seconds, format_value

EVENTS_FILE = "events.jsonl"


@dataclass(frozen=True)
class Display:
    """How a command shows progress: ``bars`` (tqdm, on an interactive terminal unless ``--quiet``)
    or ``lines`` (one per finished trial on stdout: logs, pipes, ``--quiet``); never both."""

    bars: bool
    lines: bool

    @classmethod
    def for_terminal(cls, quiet: bool) -> "Display":
        """Bars only when both stdout and stderr are a terminal: a bar redrawn with carriage
        returns into a file (``run > log 2>&1``, `evomerge batch`) is one unreadable line."""
        bars = not quiet and sys.stdout.isatty() and sys.stderr.isatty()
        return cls(bars=bars, lines=not bars)

    def note(self, message: str) -> None:
        """One line about the run's progress outside any trial (loading, warm-up): on stderr beside
        the bars, on stdout among the trial lines of a log, nowhere when neither is shown."""
        if self.bars or self.lines:
            print(message, file=sys.stderr if self.bars else sys.stdout, flush=True)


# ------------------------------------------------------------------------------------------- events


class EventLog:
    """Appends events to ``events.jsonl``; a crash may cut the last line, which `read_events` skips.

    Each event is one line, written and flushed at once (a reader tailing the file sees it
    immediately). A line a crash cut short gets its newline before this process appends, so the
    next event never glues onto the fragment.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._warned = False
        if path.exists() and path.stat().st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                cut = f.read(1) != b"\n"
            if cut:
                with open(path, "a", encoding="utf-8") as f:
                    f.write("\n")

    def emit(self, event: str, **fields: Any) -> None:
        """Append one event. A failed write (disk full, a value JSON cannot hold) is reported once
        on stderr and never stops the search: the ledger, not this log, is the run's record."""
        try:
            line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str, allow_nan=False)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
        except (OSError, ValueError) as exc:
            if not self._warned:
                self._warned = True
                print(f"evomerge: {self.path}: event {event!r} not written ({exc}); the search goes on", file=sys.stderr)


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of ``events.jsonl`` (none when absent); lines a crash cut short are skipped."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events


def memory_snapshot() -> dict[str, float]:
    """This process's memory now, in MiB: resident set, its peak so far, and the CUDA allocator's
    peak since the previous snapshot when CUDA is in use (reset here, so each trial gets its own)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            out["rss_mib"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        pass
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    torch = sys.modules.get("torch")  # never imported for this: a run that has no torch has no CUDA
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    return {k: round(v, 1) for k, v in out.items()}


# ------------------------------------------------------------------------------------------- trials

TIMING_KEYS = ("merge", "swap", "inference", "total")
"""The per-trial timings a line shows (the scorer's phases, `evomerge.objectives.Scorer`)."""


def trial_line(stage: str, number: int, values: Mapping[str, float], timings: Mapping[str, float],
               failure: str | None, *, done: int, budget: int | None, elapsed: float) -> str:
    """One finished trial for a log: stage, number, progress, objective values or the failure,
    the scorer's timings and the stage's elapsed time."""
    count = f"{done}/{budget}" if budget else str(done)
    result = "FAILED " + (failure or "evaluation failed") if failure is not None else \
        " ".join(f"{name}={format_value(value)}" for name, value in values.items())
    times = " ".join(f"{k} {_seconds(timings[k])}" for k in TIMING_KEYS if k in timings)
    return f"[{stage}] trial {number} ({count}): {result} | {times} | elapsed {format_seconds(elapsed)}"


def _seconds(value: float) -> str:
    """``12ms`` below a second (a tiny model's merge), ``3.41s`` above."""
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def trial_reporter(
    stage: str, *, events: EventLog | None, echo: Callable[[str], None] | None, done_before: int,
    budget: int | None, elapsed: Callable[[], float],
) -> Callable[[Any], None]:
    """A `run_search` callback: each finished trial as an event (with memory) and, with ``echo``,
    as a line (`trial_line`). ``done_before``: trials the ledger counted when the stage (re)started."""
    done = done_before

    def report(trial: Any) -> None:
        nonlocal done
        done += 1
        failure = (trial.failure or "evaluation failed") if trial.state == "failed" else None
        if events is not None:
            events.emit("trial", stage=stage, trial=trial.number, state=trial.state, values=trial.values,
                        timings=trial.timings, failure=failure, feasible=trial.feasible, memory=memory_snapshot())
        if echo is not None:
            echo(trial_line(stage, trial.number, trial.values, trial.timings, failure,
                            done=done, budget=budget, elapsed=elapsed()))

    return report
