"""The overnight queue: run specs in order, each resumable; a failing spec is recorded and skipped.

Each spec runs in its own ``evomerge run`` subprocess, so a crash (out of memory, a segfault in
a CUDA kernel) takes down one entry, not the queue. The queue's state lives in
``<batch_dir>/batch.json`` and is rewritten atomically after every change, so rerunning the same
command after a reboot or a Ctrl-C continues where it stopped: finished specs are skipped, the
interrupted one resumes from its ledger, failed ones stay failed unless ``--retry-failed``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from evomerge.merge import write_atomic

from ._errors import UserError, first_line
from ._signals import EXIT_CODES, graceful_stop

STATE_FILE = "batch.json"

Status = str  # pending | running | done | failed | interrupted


@dataclass
class Entry:
    """One spec of the queue and what became of it."""

    spec: str
    run_dir: str
    status: Status = "pending"
    exit_code: int | None = None
    reason: str | None = None
    seconds: float = 0.0
    log: str = ""


@dataclass
class BatchState:
    entries: list[Entry] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> "BatchState":
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls([Entry(**e) for e in data["entries"]])
        except (ValueError, TypeError, KeyError) as exc:  # not JSON, not this file's shape
            raise UserError(f"{path}: not a batch state file ({type(exc).__name__}: {first_line(str(exc))}); "
                            "delete it to queue the specs again (their run folders resume)") from None

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps({"entries": [asdict(e) for e in self.entries]}, indent=2) + "\n")

    def merge(self, specs: list[Path], batch_dir: Path) -> None:
        """Add specs not yet queued (in order); a spec keeps its state across reruns."""
        known = {e.spec for e in self.entries}
        for spec in specs:
            key = str(spec.resolve())
            if key in known:
                continue
            name = f"{len(self.entries) + 1:02d}-{spec.stem}"
            self.entries.append(Entry(spec=key, run_dir=str(batch_dir / name), log=str(batch_dir / "logs" / f"{name}.log")))
            known.add(key)


def _last_line(log: Path) -> str:
    """The error line of a failed run: the last ``evomerge:`` line, else the last line of its log."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    tagged = [ln for ln in lines if ln.startswith("evomerge:")]
    return (tagged or lines or ["no output"])[-1]


def run_batch(
    specs: list[Path], batch_dir: Path, *, retry_failed: bool = False, echo: Callable[[str], None] = print
) -> int:
    """Run the queue; returns 0 when every spec is done, 1 when some failed, 130/143 when stopped."""
    batch_dir = batch_dir.resolve()
    state_path = batch_dir / STATE_FILE
    state = BatchState.load(state_path)  # a broken state file is one line before anything is written
    batch_dir.mkdir(parents=True, exist_ok=True)
    (batch_dir / "logs").mkdir(exist_ok=True)
    state.merge(specs, batch_dir)
    wanted = {str(s.resolve()) for s in specs}
    state.save(state_path)
    queue = [e for e in state.entries if e.spec in wanted]
    child: list[subprocess.Popen] = []

    def forward(signum: int) -> None:
        for proc in child:
            proc.send_signal(signum)

    with graceful_stop(on_first=forward) as stop:
        for n, entry in enumerate(queue, start=1):
            head = f"[{n}/{len(queue)}] {Path(entry.spec).name}"
            if entry.status == "done" or (entry.status == "failed" and not retry_failed):
                echo(f"{head}: {entry.status} earlier, skipped")
                continue
            if stop():
                break
            echo(f"{head}: running -> {entry.run_dir} (log {entry.log})")
            entry.status = "running"
            state.save(state_path)
            t0 = time.monotonic()
            with open(entry.log, "a", encoding="utf-8") as log:
                # --quiet: progress bars would fill the log with carriage returns.
                cmd = [sys.executable, "-m", "evomerge.experiments.cli", "run", entry.spec, "--run-dir", entry.run_dir, "--quiet"]
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
                child[:] = [proc]
                code = proc.wait()
                child.clear()
            entry.seconds += time.monotonic() - t0
            entry.exit_code = code
            if code == 0:
                entry.status, entry.reason = "done", None
            elif code in EXIT_CODES.values() or stop():
                entry.status, entry.reason = "interrupted", signal.Signals(code - 128).name if code > 128 else "stopped"
            else:
                entry.status, entry.reason = "failed", _last_line(Path(entry.log))
            state.save(state_path)
            echo(f"{head}: {entry.status}" + (f" ({entry.reason})" if entry.reason else "") + f" in {entry.seconds:.0f}s")
            if entry.status == "interrupted":
                break
    echo(format_summary(queue))
    if stop():
        return stop.exit_code
    return 0 if all(e.status == "done" for e in queue) else 1


def format_summary(entries: list[Entry]) -> str:
    """The end-of-queue table: spec, status, time, run folder or reason."""
    rows = [("spec", "status", "time", "run folder / reason")]
    for e in entries:
        rows.append((Path(e.spec).name, e.status, f"{e.seconds:.0f}s", e.reason if e.status != "done" else e.run_dir))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["batch summary:"] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], width)) + "  " + r[3] for r in rows]
    return "\n".join(lines)
