"""The candidate queue's re-queue rule (`search._queue`) on a real SQLite ledger with heartbeats and
a real nevergrad optimizer: a heartbeat failure whose retry never came (the process that failed it
died before optuna's retry callback ran) is re-queued once, only after its grace period; one whose
retry did come is left alone; a candidate whose retry died too is told as a failure."""

from __future__ import annotations

import time
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState

from evomerge.search import Ledger, make_optimizer
from evomerge.search._queue import CandidateQueue

from ._problem import build_problem

GRACE = 1.0


def _retries(ledger: Ledger) -> list[FrozenTrial]:
    return [t for t in ledger.trials() if t.system_attrs.get("failed_trial") is not None]


def test_queue_requeues_a_heartbeat_failure_whose_retry_never_came(tiny_zoo: Path, tmp_path: Path) -> None:
    _, scorer, space = build_problem(tiny_zoo)
    ledger = Ledger(tmp_path / "ledger.db", objectives=scorer.objectives, space=space.to_dict(), heartbeat=60)
    optimizer = make_optimizer("nevergrad:OnePlusOne")
    queue = CandidateQueue(space, optimizer, ledger, budget=6, depth=2, grace=GRACE)  # type: ignore[arg-type]
    queue.start()
    assert queue.step()
    study, storage = ledger.study, ledger.storage
    assert len(ledger.trials((TrialState.WAITING,))) == 2
    orphan, retried = study.ask(), study.ask()  # two workers pop the queue
    # both workers die; a heartbeat check fails their trials: one checker re-queues its failure
    # at once (optuna's retry callback), the other dies before it could
    for trial in (orphan, retried):
        study.tell(trial.number, state=TrialState.FAIL)
    failed_at = time.monotonic()
    storage.get_heartbeat_stale_trial_callback()(study, ledger.trials()[retried.number])  # type: ignore[union-attr]
    while not [t for t in _retries(ledger) if t.system_attrs["failed_trial"] == orphan.number]:
        assert queue.step()
        assert time.monotonic() - failed_at < 20, "the orphan was never re-queued"
        time.sleep(0.05)
    assert time.monotonic() - failed_at >= GRACE * 0.9  # not before its grace
    for _ in range(3):  # and once only
        time.sleep(GRACE)
        queue.step()
    assert sorted(t.system_attrs["failed_trial"] for t in _retries(ledger)) == sorted([orphan.number, retried.number])
    (copy,) = [t for t in _retries(ledger) if t.system_attrs["failed_trial"] == orphan.number]
    assert copy.state == TrialState.WAITING and copy.params == ledger.trials()[orphan.number].params
    assert copy.user_attrs["candidate"] == orphan.user_attrs["candidate"]
    assert ledger.finished() == [] and len(optimizer.pending_keys) == 2

    # the copy dies too: no retry is left (MAX_RETRY = 1), the candidate is told as a failure
    study.ask()  # pops the older WAITING trial: the callback's retry
    again = study.ask()
    assert again.number == copy.number
    study.tell(again.number, state=TrialState.FAIL)
    queue.step()
    assert int(orphan.user_attrs["candidate"]) not in optimizer.pending_keys
