"""A worker's batched claims, finishes and budget counts on real SQLite (`search._worker_store`)
and PostgreSQL (`search._pg_trial_store`, one statement per step; a worker's own claim in one
round trip, its genome and finish behind) databases: the rows it writes must read back exactly
as optuna's own API writes them, its one-query budget count must agree with the count over
loaded trials, and its claims must keep the budget exact."""

from __future__ import annotations

import threading
import time
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


# A worker's own claims on PostgreSQL (optuna samplers): one round trip that looks at the budget,
# pops or creates the trial and reads the second look; the genome and the finish written behind.


def test_own_claims_with_finishes_behind_write_the_rows_optuna_writes(storage: optuna.storages.RDBStorage) -> None:
    """The worker's path for optuna samplers (a budget on the claim, the finish behind; SQLite's
    store writes it at once) leaves the rows optuna's API leaves, the retry popped first."""
    batched, plain = _study(storage, "own"), _study(storage, "own-plain")
    attrs = {"objectives": {"a": 0.5, "b": 2.0}, "recipe": "{}", "worker": "w1"}
    for study in (batched, plain):
        study.enqueue_trial({"w0": 0.25, "kind": "dare"}, user_attrs={"candidate": 3})
    store = _store(batched, storage)
    for values in ([0.5, 2.0], [float("inf"), -1.0], None, [1.0, 1.0]):
        claim = store.claim(DISTRIBUTIONS, {"worker": "w0"}, pop=True, fresh=True, budget=10)
        assert claim is not None and claim.look.done() and claim.counts.running >= {claim.trial_id}
        store.finish(claim.trial, attrs, {"constraints:0": -1.0}, values, behind=True)
        trial = plain.ask(DISTRIBUTIONS)
        for key, value in {"worker": "w0", **attrs}.items():
            trial.set_user_attr(key, value)
        trial.set_constraint("0", -1.0)
        plain.tell(trial, values, state=None if values else TrialState.FAIL)
    store.close()
    got, want = batched.get_trials(), plain.get_trials()
    assert [_comparable(t) for t in got] == [_comparable(t) for t in want]
    assert got[0].params["w0"] == 0.25 and got[0].user_attrs["candidate"] == 3
    with storage.engine.connect() as conn:
        beats = conn.execute(sa.text("SELECT count(*) FROM trial_heartbeats JOIN trials USING (trial_id) WHERE study_id = :s"),
                             {"s": batched._study_id}).scalar_one()
    assert beats == 4


def _scenario(study: optuna.Study) -> None:
    """Every kind of trial the budget count tells apart."""
    for t in [study.ask(DISTRIBUTIONS) for _ in range(3)]:
        study.tell(t, [1.0, 1.0])
    study.tell(study.ask(DISTRIBUTIONS), state=TrialState.FAIL)  # failed by its evaluation: counts
    for state in (TrialState.FAIL, TrialState.COMPLETE):  # given back (or cut off): does not count
        stopped = study.ask(DISTRIBUTIONS)
        stopped.set_user_attr("interrupted", True)
        study.tell(stopped, [1.0, 1.0] if state == TrialState.COMPLETE else None, state=state)
    retry = optuna.storages.RetryFailedTrialCallback(max_retry=2)
    stale = study.ask(DISTRIBUTIONS)  # failed by heartbeat twice: neither attempt counts once retried
    study.tell(stale, state=TrialState.FAIL)
    retry(study, study.get_trials()[stale.number])
    again = study.ask(DISTRIBUTIONS)
    study.tell(again, state=TrialState.FAIL)
    retry(study, study.get_trials()[again.number])
    study.ask(DISTRIBUTIONS)  # the second retry, RUNNING
    unretried = study.ask(DISTRIBUTIONS)  # failed by heartbeat, no retry yet: counts
    study.tell(unretried, state=TrialState.FAIL)
    study.ask(DISTRIBUTIONS)  # RUNNING
    study.enqueue_trial({"w0": 0.1})  # WAITING


def test_the_claims_first_look_is_the_budget_count(postgres_url: str) -> None:
    """The claim's own first look (SQL) agrees with `tally` on every kind of trial: it claims
    nothing, and writes nothing, once ``counted + running`` reaches the budget; the pop too."""
    storage = _heartbeat_storage(postgres_url)
    study = _study(storage, "gate")
    _scenario(study)
    store = _store(study, storage)
    counts = store.counts()
    assert counts == TrialStore(study).counts() and (counts.counted, len(counts.running), counts.waiting) == (5, 2, 1)
    used = counts.counted + len(counts.running)
    n = len(study.get_trials())
    for pop in (True, False):
        assert store.claim(DISTRIBUTIONS, {"worker": "w"}, pop=pop, fresh=True, budget=used) is None
    assert len(study.get_trials()) == n and store.counts() == counts
    claim = store.claim(DISTRIBUTIONS, {"worker": "w"}, pop=True, fresh=True, budget=used + 1)
    assert claim is not None and claim.queued and claim.trial.params["w0"] == 0.1  # the queued trial first
    assert claim.counts.counted == 5 and claim.counts.running == counts.running | {claim.trial_id}
    assert store.claim(DISTRIBUTIONS, {"worker": "w"}, pop=True, fresh=True, budget=used + 1) is None
    fresh = store.claim(DISTRIBUTIONS, {"worker": "w"}, pop=True, fresh=True, budget=used + 2)
    assert fresh is not None and not fresh.queued and fresh.trial.number == n
    store.close()
    assert study.get_trials()[-1].params == fresh.trial.params and len(fresh.trial.params) == len(DISTRIBUTIONS)


def test_concurrent_own_claims_reach_the_budget_exactly(postgres_url: str) -> None:
    """Four claimants (own connections, as four workers) claim fresh trials with the budget on
    the claim and finish them behind, as `run_worker` does for optuna samplers: the study ends
    with exactly the budget counted, numbered 0..n-1 without a gap or a twin, every genome
    written, and no claim given back (claims are made one at a time under the study's lock, each
    after seeing all the claims before it)."""
    from evomerge.search._workers import _keep_claim

    budget = 24
    first = _study(_heartbeat_storage(postgres_url), "exact")
    given_back: list[int] = []
    errors: list[BaseException] = []
    deadline = time.monotonic() + 60

    def claimant(worker: str) -> None:
        storage = _heartbeat_storage(postgres_url)
        study = optuna.load_study(study_name=first.study_name, storage=storage, sampler=optuna.samplers.RandomSampler())
        store = _store(study, storage)
        try:
            while time.monotonic() < deadline:
                claim = store.claim(DISTRIBUTIONS, {"worker": worker}, pop=True, fresh=True, budget=budget)
                if claim is None:
                    counts = store.counts()
                    if counts.counted >= budget:
                        return
                    time.sleep(0.01)  # a finish behind is on its way
                    continue
                if _keep_claim(claim, budget, coordinated=False) is not None:
                    given_back.append(claim.trial.number)
                    claim.written.result()
                    claim.trial.set_user_attr("interrupted", True)  # as `Ledger.give_back`: not counted
                    study.tell(claim.trial, state=TrialState.FAIL)
                    continue
                store.finish(claim.trial, {"objectives": {}, "worker": worker}, {}, [1.0, 2.0], behind=True)
            raise AssertionError(f"{worker} still claiming after 60 s")
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=claimant, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    trials = first.get_trials()
    assert given_back == []
    assert sorted(t.number for t in trials) == list(range(len(trials))) and len(trials) == budget
    assert all(t.state == TrialState.COMPLETE and len(t.params) == len(DISTRIBUTIONS) for t in trials)


class _Watching(optuna.samplers.RandomSampler):
    """Notes the states of the study's trials whenever it samples."""

    def __init__(self) -> None:
        super().__init__(seed=3)
        self.seen: list[list[TrialState]] = []

    def sample_independent(self, study, trial, param_name, param_distribution):  # type: ignore[no-untyped-def]
        self.seen.append([t.state for t in study.get_trials(deepcopy=False) if t.number != trial.number])
        return super().sample_independent(study, trial, param_name, param_distribution)


def test_a_sampler_reads_the_study_after_the_last_finish_behind(postgres_url: str) -> None:
    """A sampler that reads the study proposes the next genome knowing the worker's last result,
    as when the finish was written before the claim: the read waits for the finish behind."""
    storage = _heartbeat_storage(postgres_url)
    study = _study(storage, "sees")
    study.sampler = sampler = _Watching()
    store = _store(study, storage)
    first = store.claim({"w0": DISTRIBUTIONS["w0"]}, {}, pop=True, fresh=True, budget=10)
    assert first is not None
    release = threading.Event()
    store._writes.submit(release.wait, 10)  # holds the writes behind back...
    store.finish(first.trial, {"objectives": {}}, {}, [1.0, 2.0], behind=True)
    threading.Timer(0.5, release.set).start()  # ...for a while after the next claim began
    second = store.claim({"w0": DISTRIBUTIONS["w0"]}, {}, pop=True, fresh=True, budget=10)
    assert second is not None and second.counts.running == {first.trial_id, second.trial_id}  # the look predates it
    assert sampler.seen[-1] == [TrialState.COMPLETE]
    store.close()


def test_a_failed_claim_leaves_no_trial_and_a_usable_store(postgres_url: str) -> None:
    """An error inside the claim's transaction rolls it back (no trial) and does not leave its
    connection inside the aborted transaction."""
    storage = _heartbeat_storage(postgres_url)
    study = _study(storage, "fails")
    store = _store(study, storage)
    for _ in range(3):  # more than the store's pool holds
        with pytest.raises(sa.exc.DBAPIError):
            store.claim(DISTRIBUTIONS, {"k" * 1000: 1}, pop=True, fresh=True, budget=10)  # longer than optuna's keys
    assert study.get_trials() == []
    claim = store.claim(DISTRIBUTIONS, {"worker": "w"}, pop=True, fresh=True, budget=10)
    assert claim is not None and claim.trial.number == 0
    store.close()


def test_a_trial_is_not_finished_without_its_genome(postgres_url: str) -> None:
    storage = _heartbeat_storage(postgres_url)
    study = _study(storage, "genome")
    store = _store(study, storage)
    store._genome_query = sa.select(sa.literal(1) / sa.literal(0))  # the genome's write fails
    claim = store.claim(DISTRIBUTIONS, {}, pop=True, fresh=True, budget=10)
    assert claim is not None
    # The failed genome write is raised once: by the finish when it has already failed by then
    # (the write runs on the store's thread, so that depends on timing), else by `close`.
    with pytest.raises(sa.exc.DBAPIError):
        try:
            store.finish(claim.trial, {"objectives": {}}, {}, [1.0, 2.0], behind=True)
        finally:
            store.close()
    assert study.get_trials()[0].state == TrialState.RUNNING  # failed by heartbeat and retried, like a killed worker's


def test_a_driver_that_cannot_send_the_claims_query_keeps_the_transaction(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one-round-trip claim is several statements in one query, which psycopg2 sends and a
    driver that prepares its statements (psycopg 3) cannot: such a store claims in a
    transaction and does not look in the claim, so the worker writes its finish at once."""
    storage = _heartbeat_storage(postgres_url)
    study = _study(storage, "driver")
    assert _store(study, storage).claims_look
    monkeypatch.setattr(storage.engine.dialect, "driver", "psycopg")
    store = _store(study, storage)
    assert not store.claims_look
    claim = store.claim(DISTRIBUTIONS, {"worker": "w"}, pop=True, fresh=True, budget=10)
    assert claim is not None and claim.written.done() and study.get_trials()[0].params == claim.trial.params
    assert store.finish(claim.trial, {"objectives": {}}, {}, [1.0, 2.0]) == store.counts()
    store.close()
