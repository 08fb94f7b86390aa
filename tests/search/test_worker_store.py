"""A worker's batched claims, finishes and budget counts on real SQLite (`search._worker_store`)
and PostgreSQL (`search._pg_trial_store`, one statement per step) databases: the rows it writes
must read back exactly as optuna's own API writes them, and its one-query budget count must
agree with the count over loaded trials."""

from __future__ import annotations

import threading
import uuid
import warnings
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from evomerge.search._pg_trial_store import PostgresTrialStore, trial_store
from evomerge.search._worker_store import RDBTrialStore, TrialStore

DISTRIBUTIONS = {
    **{f"w{i}": FloatDistribution(0.0, 1.0) for i in range(12)},
    "log": FloatDistribution(1e-3, 1.0, log=True),
    "kind": CategoricalDistribution(["ties", "dare"]),
}


STORES = {"sqlite": RDBTrialStore, "postgresql": PostgresTrialStore}


@pytest.fixture(params=sorted(STORES))
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> optuna.storages.RDBStorage:
    """A heartbeat storage on a SQLite file, or on the session's PostgreSQL database (each test
    names its studies apart)."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    return _heartbeat_storage(url)


def _heartbeat_storage(url: str) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=60, grace_period=120,
            failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1),
        )


def _study(storage: optuna.storages.RDBStorage, name: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=storage, study_name=f"{name}-{uuid.uuid4().hex[:8]}", directions=["maximize", "minimize"],
                               sampler=optuna.samplers.RandomSampler(seed=7))


def _store(study: optuna.Study, storage: optuna.storages.RDBStorage) -> RDBTrialStore:
    store = trial_store(study, storage)
    assert type(store) is STORES[storage.engine.dialect.name]
    return store


def _comparable(t: optuna.trial.FrozenTrial) -> tuple:
    return (t.number, t.state, t.params, t.distributions, t.user_attrs, t.system_attrs, t.values)


def test_batched_store_writes_the_rows_optuna_writes(storage: optuna.storages.RDBStorage) -> None:
    batched, plain = _study(storage, "batched"), _study(storage, "plain")
    attrs = {"objectives": {"a": 0.5, "b": 2.0}, "recipe": "{}", "timings": {"evaluate": 1.5}, "worker": "w1"}
    for study, store in ((batched, _store(batched, storage)), (plain, None)):
        study.enqueue_trial({"w0": 0.25, "kind": "dare"}, user_attrs={"candidate": 3})
        for values in ([0.5, 2.0], [float("inf"), -1.0], None):  # the last one failed
            if store is not None:
                claim = store.claim(DISTRIBUTIONS, {"worker": "w0"}, pop=True, fresh=True)
                assert claim is not None
                assert claim.counts == store.counts() and claim.counts.running == {claim.trial_id}
                assert store.finish(claim.trial, attrs, {"constraints:0": -1.0}, values) == store.counts()
            else:  # what the workers did before: optuna's API, one call per row
                trial = study.ask(DISTRIBUTIONS)
                trial.set_user_attr("worker", "w0")
                for key, value in attrs.items():
                    trial.set_user_attr(key, value)
                trial.set_constraint("0", -1.0)
                study.tell(trial, values, state=None if values else TrialState.FAIL)
    got, want = batched.get_trials(), plain.get_trials()
    assert [_comparable(t) for t in got] == [_comparable(t) for t in want]
    assert got[0].params["w0"] == 0.25 and got[0].user_attrs["candidate"] == 3  # the queued trial went first
    for a, b in zip(got, want):  # optuna keeps naive UTC in the database and returns local time
        assert abs((a.datetime_start - b.datetime_start).total_seconds()) < 60
        assert abs((a.datetime_complete - b.datetime_complete).total_seconds()) < 60
    with storage.engine.connect() as conn:  # the claim wrote each trial's first heartbeat
        beats = conn.execute(sa.text("SELECT count(*) FROM trial_heartbeats JOIN trials USING (trial_id) WHERE study_id = :s"),
                             {"s": batched._study_id}).scalar_one()
    assert beats == 3


def test_claims_pop_the_queue_and_refuse_finished_trials(storage: optuna.storages.RDBStorage) -> None:
    study = _study(storage, "queue")
    store = _store(study, storage)
    assert store.claim(DISTRIBUTIONS, {}, pop=True, fresh=False) is None  # nothing queued, no fresh trial
    assert study.get_trials() == []
    study.enqueue_trial({"w1": 0.5})
    claim = store.claim(DISTRIBUTIONS, {}, pop=True, fresh=False)
    assert claim is not None and claim.queued and claim.candidate is None and claim.trial.params["w1"] == 0.5
    stored = storage.get_trial(claim.trial_id)  # the pop's own read of the trial is optuna's
    assert (claim.trial.number, claim.trial.user_attrs) == (stored.number, stored.user_attrs)
    fresh = store.claim(DISTRIBUTIONS, {}, pop=True, fresh=True)
    assert fresh is not None and not fresh.queued
    study.tell(fresh.trial, state=TrialState.FAIL)
    with pytest.raises(UpdateFinishedTrialError):  # e.g. failed meanwhile by a heartbeat check
        store.finish(fresh.trial, {"objectives": {}}, {}, [1.0, 1.0])


def test_budget_counts_agree_with_the_loaded_trials(storage: optuna.storages.RDBStorage) -> None:
    study = _study(storage, "counts")
    complete = [study.ask(DISTRIBUTIONS) for _ in range(3)]
    for t in complete:
        study.tell(t, [1.0, 1.0])
    study.tell(study.ask(DISTRIBUTIONS), state=TrialState.FAIL)  # failed by its evaluation: counts
    interrupted = study.ask(DISTRIBUTIONS)  # given back: does not count
    interrupted.set_user_attr("interrupted", True)
    study.tell(interrupted, state=TrialState.FAIL)
    stale = study.ask(DISTRIBUTIONS)  # failed by a heartbeat check: counts until its retry exists
    study.tell(stale, state=TrialState.FAIL)
    plain, batched = TrialStore(study), _store(study, storage)
    assert plain.counts() == batched.counts() and batched.counts().counted == 5
    optuna.storages.RetryFailedTrialCallback(max_retry=1)(study, study.get_trials()[stale.number])
    running = study.ask(DISTRIBUTIONS)  # pops the retry
    assert running.number == stale.number + 1
    study.enqueue_trial({"w0": 0.1})
    counts = batched.counts()
    assert counts == plain.counts()
    assert counts.counted == 4 and counts.running == {running._trial_id} and counts.waiting == 1


def test_concurrent_pops_take_every_queued_trial_exactly_once(postgres_url: str) -> None:
    """Four claimants (each with its own connections, as four workers) race for one queue: the
    one-statement pop (``FOR UPDATE SKIP LOCKED``) gives every queued trial to exactly one."""
    first = _study(_heartbeat_storage(postgres_url), "race")
    for cid in range(24):
        first.enqueue_trial({"w0": cid / 24}, user_attrs={"candidate": cid})
    popped: list[list[int]] = [[] for _ in range(4)]

    def claimant(mine: list[int]) -> None:
        storage = _heartbeat_storage(postgres_url)
        study = optuna.load_study(study_name=first.study_name, storage=storage)
        store = _store(study, storage)
        while (claim := store.claim(DISTRIBUTIONS, {"worker": "w"}, pop=True, fresh=False)) is not None or store.counts().waiting:
            if claim is not None:
                assert claim.counts.running >= {claim.trial_id}
                mine.append(int(claim.trial.user_attrs["candidate"]))

    threads = [threading.Thread(target=claimant, args=(mine,)) for mine in popped]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(c for mine in popped for c in mine) == list(range(24))
    trials = first.get_trials()
    assert [t.state for t in trials] == [TrialState.RUNNING] * 24
    assert all(t.params["w0"] == t.user_attrs["candidate"] / 24 and len(t.params) == len(DISTRIBUTIONS) for t in trials)


def test_a_finish_written_behind_lands_and_its_refusal_is_raised(postgres_url: str) -> None:
    storage = _heartbeat_storage(postgres_url)
    study = _study(storage, "behind")
    store = _store(study, storage)
    for cid in range(2):
        study.enqueue_trial({"w0": 0.5}, user_attrs={"candidate": cid})
    kept, failed = (store.claim(DISTRIBUTIONS, {}, pop=True, fresh=False) for _ in range(2))
    assert kept is not None and failed is not None
    assert store.finish(kept.trial, {"objectives": {}}, {}, [1.0, 2.0], behind=True) is None
    study.tell(failed.trial, state=TrialState.FAIL)  # e.g. failed by a heartbeat check meanwhile
    assert store.finish(failed.trial, {"objectives": {}}, {}, [1.0, 2.0], behind=True) is None
    with pytest.raises(UpdateFinishedTrialError):
        store.close()
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL] and trials[0].values == [1.0, 2.0]
