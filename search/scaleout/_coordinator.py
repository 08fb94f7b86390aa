"""`Coordinator`: the thread that drives a coordinated optimizer for all workers, while its
process holds the study's lease (`search.scaleout._lease`); the others wait and take over from
the checkpoint once the holder stops renewing it."""

from __future__ import annotations

import threading
import time

from .._queue import CandidateQueue
from ._lease import DatabaseLease, LeaseLost


class Coordinator:
    """Waits for the lease, then runs `CandidateQueue.step` every ``poll`` seconds."""

    def __init__(self, queue: CandidateQueue, lease: DatabaseLease, *, poll: float, renew_every: float) -> None:
        """``renew_every``: seconds between lease renewals, and between a waiting coordinator's
        attempts to take the lease (a quarter of the lease's ttl: every renewal is a committed
        write, and a lease renewed more often than it can expire is no safer)."""
        self.queue, self.lease, self.poll, self.renew_every = queue, lease, poll, renew_every
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coordinator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop (after one last step: the last results must reach the optimizer and its checkpoint)."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self.lease.acquire():
                if self._stop.wait(self.renew_every):
                    return
            try:
                self._coordinate()
            finally:
                self.lease.release()
        except LeaseLost:
            return  # a successor took over: it owns the optimizer from here
        except BaseException as exc:  # surfaced by the worker's loop, which stops
            self.error = exc

    def _coordinate(self) -> None:
        self.queue.optimizer.use_checkpoint(self.lease)
        self.queue.start()
        renewed = time.monotonic()
        while True:
            # no one can take a lease renewed less than a ttl ago: renewing when due (a
            # coordinator stalled past the ttl renews first thing, and learns it lost the lease)
            if time.monotonic() - renewed >= self.renew_every:
                if not self.lease.renew():
                    raise LeaseLost(f"coordinator {self.lease.owner} lost its lease")
                renewed = time.monotonic()
            if not self.queue.step() or self._stop.is_set():
                return
            self._stop.wait(self.poll)
