"""A coordinator re-queues a heartbeat failure whose retry never came (the process that failed it
died between the two writes), exactly once and only after its grace period, on a real SQLite
ledger with a real nevergrad optimizer; a failure whose retry did come is left alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState

from evomerge.search import Ledger, make_optimizer
from evomerge.search._worker_store import retried_numbers
from evomerge.search._workers import Coordinator, make_lease

from ._problem import build_problem

GRACE = 1.0


def _queued(ledger: Ledger) -> list[FrozenTrial]:
    return ledger.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


def _wait(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_coordinator_requeues_a_heartbeat_failure_whose_retry_never_came(tiny_zoo: Path, tmp_path: Path) -> None:
    _, scorer, space = build_problem(tiny_zoo)
    ledger = Ledger(tmp_path / "ledger.db", objectives=scorer.objectives, space=space.to_dict(), heartbeat=60)
    coordinator = Coordinator(
        space, make_optimizer("nevergrad:OnePlusOne"), ledger, make_lease(ledger, "c", ttl=30),  # type: ignore[arg-type]
        budget=6, queue=2, poll=0.05, renew_every=5, grace=GRACE,
    )
    stop = threading.Event()
    thread = threading.Thread(target=coordinator.run, args=(stop,), daemon=True)
    thread.start()
    try:
        _wait(lambda: len(_queued(ledger)) == 2)
        storage, study = ledger.storage, ledger.study
        orphan, retried = study.ask(), study.ask()  # two workers pop the queue
        callback = storage.get_heartbeat_stale_trial_callback()
        # both workers die; a heartbeat check fails their trials: one checker re-queues its
        # failure at once (the retry callback), the other dies before it could
        for trial in (orphan, retried):
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        failed_at = time.monotonic()
        callback(study, storage.get_trial(retried._trial_id))

        def retries() -> list[FrozenTrial]:
            return [t for t in study.get_trials(deepcopy=False) if t.system_attrs.get("failed_trial") is not None]

        requeued = _wait(lambda: [t for t in retries() if t.system_attrs["failed_trial"] == orphan.number])
        assert time.monotonic() - failed_at >= GRACE * 0.9  # not before its grace
        time.sleep(3 * GRACE)  # and once only
        by_origin = sorted(t.system_attrs["failed_trial"] for t in retries())
        assert by_origin == sorted([orphan.number, retried.number])
        (retry,) = requeued
        assert retry.state == TrialState.WAITING and retry.user_attrs["candidate"] == orphan.user_attrs["candidate"]
        assert retry.system_attrs["fixed_params"] == storage.get_trial(orphan._trial_id).system_attrs["fixed_params"]
        assert orphan.number in retried_numbers(study.get_trials(deepcopy=False))
    finally:
        stop.set()
        thread.join(timeout=30)
    assert coordinator.error is None
