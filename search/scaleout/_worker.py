"""`Crew`: what the run loop adds when its ledger is shared by several workers.

* a heartbeat for the claimed trial from one thread (``RDBStorage.record_heartbeat``), so a long
  evaluation is not taken for a dead one;
* optuna's ``fail_stale_trials`` once per heartbeat interval (a trial is stale only after two
  silent ones), whose retry callback re-queues the trials of dead workers; a trial whose worker
  died before marking it (no heartbeat: never stale to optuna) is re-queued here after two;
* for a coordinated optimizer, the `Coordinator` thread, whichever worker holds the lease.
"""

from __future__ import annotations

import datetime
import threading
import time
import warnings

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from .._ledger import Ledger
from .._queue import CandidateQueue
from ._coordinator import Coordinator
from ._lease import DatabaseLease


class Crew:
    """Heartbeats, stale checks and the coordinator of one worker (module docstring)."""

    def __init__(self, ledger: Ledger, worker_id: str, queue: CandidateQueue | None, *, lease_ttl: float, poll: float) -> None:
        storage = ledger.storage
        if not isinstance(storage, optuna.storages.RDBStorage) or ledger.heartbeat is None:
            raise ValueError("workers share a database ledger opened with a heartbeat (docs/scale-out.md)")
        self.ledger, self.worker_id, self.storage = ledger, worker_id, storage
        self.interval = float(ledger.heartbeat)
        self._study_id = storage.get_study_id_from_name(ledger.study_name)
        self._trial_id: int | None = None
        self._due = 0.0
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beats, name="heartbeat", daemon=True)
        self._beat.start()
        self.coordinator = None
        if queue is not None:
            lease = DatabaseLease(storage.engine, ledger.study_name, worker_id, ttl=lease_ttl)
            self.coordinator = Coordinator(queue, lease, poll=poll, renew_every=lease_ttl / 4)
            self.coordinator.start()

    def check(self) -> None:
        """Before a claim: raise the coordinator's failure; fail stale trials when due."""
        if self.coordinator is not None and self.coordinator.error is not None:
            raise self.coordinator.error
        if time.monotonic() < self._due:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.ledger.study)
        cutoff = datetime.datetime.now() - datetime.timedelta(seconds=2 * self.interval)
        for t in self.ledger.trials((TrialState.RUNNING,)):
            if "worker" not in t.user_attrs and t.datetime_start is not None and t.datetime_start < cutoff:
                try:
                    self.ledger.study.tell(t.number, state=TrialState.FAIL)
                except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                    continue  # another worker failed it first, and re-queues it
                self.ledger.requeue(t)
        self._due = time.monotonic() + self.interval

    def claim(self, study: optuna.Study, distributions: dict[str, BaseDistribution]) -> optuna.Trial:
        """``study.ask``, marked as this worker's, with its heartbeat from now on. optuna's warning
        that heartbeats are meant for ``study.optimize`` does not apply: this worker records them
        itself (ask/tell, to look at the budget between claim and evaluation)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
            trial = study.ask(distributions)
        self._trial_id = self.storage.get_trial_id_from_study_id_trial_number(self._study_id, trial.number)
        self.storage.record_heartbeat(self._trial_id)
        trial.set_user_attr("worker", self.worker_id)
        return trial

    def released(self) -> None:
        """The claimed trial is finished or given back: no more beats for it."""
        self._trial_id = None

    def _beats(self) -> None:
        while not self._stop.wait(self.interval):
            trial_id = self._trial_id
            if trial_id is not None:
                self.storage.record_heartbeat(trial_id)

    def close(self) -> None:
        self._stop.set()
        self._beat.join()
        if self.coordinator is not None:
            self.coordinator.close()
