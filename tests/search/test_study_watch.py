"""A coordinator's cheap reads of the study (`search._study_watch`) on a real SQLite database:
its records must give `study_state` and the budget count exactly what optuna's full trials give,
at every step of a candidate's lineage, and it must report a change whenever one matters."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from evomerge.search._study_watch import RDBStudyWatch, study_watch
from evomerge.search._worker_store import counted_and_running
from evomerge.search._workers import study_state


def _study(path: Path) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{path}", heartbeat_interval=60, grace_period=120,
            failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1),
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=storage, study_name="s", directions=["maximize"]), storage


def _agree(watch: RDBStudyWatch, study: optuna.Study) -> None:
    """The watch's records and optuna's trials give the same state, count and told values."""
    trials = study.get_trials(deepcopy=False)
    records = watch.trials()
    final, owned = study_state(trials, 1)
    final_r, owned_r = study_state(records, 1)
    assert owned_r == owned
    assert [(t.number, t.user_attrs) for t in final_r] == [(t.number, t.user_attrs) for t in final]
    assert counted_and_running(records)[0] == counted_and_running(trials)[0]
    assert [r.number for r in records] == [t.number for t in trials]


def test_watch_reads_what_the_study_holds_and_sees_every_change(tmp_path: Path) -> None:
    study, storage = _study(tmp_path / "ledger.db")
    other = optuna.create_study(storage=storage, study_name="other")  # not read
    other.enqueue_trial({"x": 0.5})
    watch = study_watch(study, storage)
    assert isinstance(watch, RDBStudyWatch)
    dist = {"x": FloatDistribution(0, 1)}
    assert watch.changed() == []
    assert watch.changed() is None  # nothing happened

    for cid in range(4):
        study.enqueue_trial({"x": cid / 4}, user_attrs={"candidate": cid})
    assert watch.changed() is not None
    _agree(watch, study)
    a, b, c = study.ask(dist), study.ask(dist), study.ask(dist)  # popped: no decision changes
    assert watch.changed() is None
    a.set_user_attr("objectives", {"y": 1.0})
    study.tell(a, [1.0])
    assert watch.changed() is not None
    _agree(watch, study)
    # b's worker died: a heartbeat check fails it and the retry callback re-queues it
    storage.set_trial_state_values(b._trial_id, TrialState.FAIL)
    assert watch.changed() is not None
    _agree(watch, study)  # owned (retry on the way), not final
    optuna.storages.RetryFailedTrialCallback(max_retry=1)(study, storage.get_trial(b._trial_id))
    assert watch.changed() is not None
    _agree(watch, study)
    # c was given back (interrupted) and re-queued
    c.set_user_attr("interrupted", True)
    c.set_user_attr("failure", "given back")
    storage.set_trial_state_values(c._trial_id, TrialState.FAIL)
    assert watch.changed() is not None
    _agree(watch, study)
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params={"x": 0.5}, distributions=dist,
        user_attrs={"candidate": 2, "requeued_from": c.number},
    ))
    assert watch.changed() is not None
    _agree(watch, study)
    while (trial := study.ask(dist)).user_attrs.get("candidate") is not None:
        trial.set_user_attr("objectives", {"y": 0.5})
        study.tell(trial, [0.5])
        assert watch.changed() is not None
        _agree(watch, study)
    study.tell(trial, state=TrialState.FAIL)
    assert watch.changed() is not None
    _agree(watch, study)
    assert watch.changed() is None
