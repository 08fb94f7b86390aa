"""`WriteBehind`: durability work (fsyncs, checkpoint files) done in order on a background thread.

An fsync costs 3-4 ms on an ordinary disk and a coordinated optimizer needs three per ask batch
(ledger, checkpoint file, its directory): about 3 ms per trial at batches of 4, most of the 2%
overhead budget. None of it has to finish before the evaluation starts, only before the first
result of the batch is written, so the run loop queues it here and it overlaps the evaluation
(the thread waits on the disk, not on the CPU). The order of the jobs is the order of
submission, and a failed job cancels the ones after it (a checkpoint is never made durable
ahead of a ledger fsync that failed); `wait` re-raises the failure in the caller.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class WriteBehind:
    """One background thread running submitted jobs in order; `wait` is the barrier."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-durability")
        self._last: Future[None] | None = None

    def submit(self, job: Callable[[], None]) -> None:
        previous = self._last

        def run() -> None:
            if previous is not None:
                previous.result()  # the one worker ran it already; its failure stops this job
            job()

        self._last = self._pool.submit(run)

    def wait(self) -> None:
        """Block until every submitted job is done; raise the first failure among them."""
        if self._last is not None:
            self._last.result()

    def close(self) -> None:
        """Finish the queued jobs and stop the thread; raises a failure among them (once: closing
        again is a no-op)."""
        try:
            self.wait()
        finally:
            self._last = None
            self._pool.shutdown(wait=True)
