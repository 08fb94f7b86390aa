"""How much memory this process can still take, read from the OS (no torch here).

Why: the engine's one-time sorts (exact pruning's permutations, DELLA's row ranks) hold 2-4 bytes
per entry and expert for the whole run: 84 GB for exact TIES on a 7B model with 3 experts. Checking
that against the memory left before sorting turns an out-of-memory kill after many minutes of
sorting into one line that names the fix.
"""

from __future__ import annotations

from pathlib import Path


def _meminfo_available() -> int | None:
    """Linux's estimate of the memory available without swapping (`MemAvailable`), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """What a cgroup v2 memory limit leaves (`memory.max - memory.current`); None without a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping: the smaller of the machine's
    available memory and its cgroup's headroom; None where neither can be read (not Linux)."""
    known = [b for b in (_meminfo_available(), _cgroup_available()) if b is not None]
    return min(known) if known else None


class ByteBudget:
    """Lets threads hold at most `limit` bytes of temporaries at once (one holder may exceed it
    alone, so a job larger than the budget still runs, by itself)."""

    def __init__(self, limit: int) -> None:
        import threading

        self._limit = limit
        self._held = 0
        self._changed = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self._changed:
            while self._held and self._held + nbytes > self._limit:
                self._changed.wait()
            self._held += nbytes

    def release(self, nbytes: int) -> None:
        with self._changed:
            self._held -= nbytes
            self._changed.notify_all()
