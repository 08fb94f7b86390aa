"""How a worker claims, checks and finishes trials in the shared study, in few storage round trips.

optuna's storage API makes one round trip (and, on a database, one transaction) per call: a
claim of a 32-parameter genome writes 32 parameter rows one by one, a finished trial one row per
attribute, and a budget check through the study reloads every unfinished trial with all its
rows. With several workers on one database those round trips were most of a worker's
coordination time (docs/scale-out.md, Overhead). `TrialStore` keeps optuna's semantics (the
study's sampler proposes, queued trials are popped first, `study.tell` finishes) and batches
only the writes; `RDBTrialStore` does the writes and the budget check in a few statements on
optuna's own tables, writing exactly the rows optuna writes, so optuna, optuna-dashboard and the
ledger's readers see no difference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Mapping, Sequence

import optuna
import sqlalchemy as sa
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages._rdb import models
from optuna.study._tell import _tell_with_warning
from optuna.trial import FrozenTrial, TrialState


def counts_toward_budget(state: TrialState, number: int, interrupted: bool, retried: Collection[int]) -> bool:
    """Whether a trial counts against the budget, as `Ledger.finished` counts: completed, or
    failed by its evaluation (not cut off by an interruption, nor a stale attempt that was retried)."""
    return (state == TrialState.COMPLETE or (state == TrialState.FAIL and number not in retried)) and not interrupted


def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of trials that optuna's `RetryFailedTrialCallback` re-queued (their retries list them)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


@dataclass(frozen=True)
class Counts:
    """What the budget rule reads (`search._workers`): counted trials, RUNNING ones, queued ones."""

    counted: int
    running: frozenset[int]
    """trial ids"""
    waiting: int


def counted_and_running(trials: Sequence[FrozenTrial]) -> tuple[int, list[FrozenTrial]]:
    """How many trials count against the budget (as `Ledger.finished`), and the RUNNING ones."""
    retried = retried_numbers(trials)
    counted = sum(
        1 for t in trials if counts_toward_budget(t.state, t.number, bool(t.user_attrs.get("interrupted", False)), retried)
    )
    return counted, [t for t in trials if t.state == TrialState.RUNNING]


@dataclass(frozen=True)
class Claim:
    """A trial this worker moved to RUNNING; ``queued``: popped from the queue (enqueued,
    re-queued or retried) rather than a fresh sampler proposal, which is dropped when given back."""

    trial: optuna.Trial
    queued: bool

    @property
    def trial_id(self) -> int:
        return self.trial._trial_id

    @property
    def candidate(self) -> int | None:
        cid = self.trial.user_attrs.get("candidate")
        return None if cid is None else int(cid)


class _ParamBuffer:
    """Stands in for the study's storage while a claimed trial suggests its genome: the parameter
    writes are kept (the store writes them together), every other call goes to the storage."""

    def __init__(self, storage: optuna.storages.BaseStorage) -> None:
        self.storage = storage
        self.params: list[tuple[str, float, BaseDistribution]] = []

    def set_trial_param(self, trial_id: int, name: str, value: float, distribution: BaseDistribution) -> None:
        self.params.append((name, value, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


class TrialStore:
    """A worker's claims and finished trials through optuna's storage API (any storage)."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study

    def counts(self) -> Counts:
        trials = self.study.get_trials(deepcopy=False)
        counted, running = counted_and_running(trials)
        waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
        return Counts(counted, frozenset(t._trial_id for t in running), waiting)

    def claim(
        self, distributions: Mapping[str, BaseDistribution], user_attrs: Mapping[str, Any], *, pop: bool, fresh: bool,
    ) -> Claim | None:
        """``study.ask(distributions)`` with the parameter and ``user_attrs`` writes batched (and,
        on a heartbeat storage, the trial's first heartbeat with them): pops a queued trial (when
        ``pop``: `counts` saw one), else (when ``fresh``) creates one the study's sampler fills;
        None when there was nothing to claim."""
        study = self.study
        study._thread_local.cached_all_trials = None  # as study.ask: samplers read the latest trials
        trial_id = self._pop() if pop else None
        queued = trial_id is not None
        if trial_id is None:
            if not fresh:
                return None
            trial_id = study._storage.create_new_trial(study._study_id)
        trial = optuna.Trial(study, trial_id)
        buffer = _ParamBuffer(trial.storage)
        trial.storage = buffer  # type: ignore[assignment]
        try:
            for name, distribution in distributions.items():
                trial._suggest(name, distribution)  # what study.ask does: fixed, relative or independent
        finally:
            trial.storage = buffer.storage
        self._write_claim(trial_id, buffer.params, user_attrs)
        return Claim(trial, queued)

    def _pop(self) -> int | None:
        """Move the oldest WAITING trial to RUNNING, as ``study.ask`` does: optuna's state write
        takes the row ``FOR UPDATE`` and refuses a trial no longer WAITING, so one claimant wins."""
        for trial_id in self._waiting_ids():
            try:
                if self.study._storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    return trial_id
            except UpdateFinishedTrialError:
                continue
        return None

    def _waiting_ids(self) -> list[int]:
        return [t._trial_id for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))]

    def finish(
        self, trial: optuna.Trial, user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any],
        values: Sequence[float] | None,
    ) -> None:
        """Write a trial's attributes, then tell the study (COMPLETE with ``values``, else FAIL).

        optuna's own tell (the sampler's ``after_trial``, the state write), without the re-read
        of the finished trial that ``study.tell`` returns."""
        self._write_attrs(trial._trial_id, user_attrs, system_attrs)
        if values is None:
            _tell_with_warning(self.study, trial, state=TrialState.FAIL)
        else:
            _tell_with_warning(self.study, trial, list(values))

    def _write_claim(self, trial_id: int, params: list[tuple[str, float, BaseDistribution]], user_attrs: Mapping[str, Any]) -> None:
        storage = self.study._storage
        for name, value, distribution in params:
            storage.set_trial_param(trial_id, name, value, distribution)
        self._write_attrs(trial_id, user_attrs, {})
        if is_heartbeat_enabled(storage):
            storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]

    def _write_attrs(self, trial_id: int, user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any]) -> None:
        storage = self.study._storage
        for key, value in user_attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
        for key, value in system_attrs.items():
            storage.set_trial_system_attr(trial_id, key, value)


_trials = models.TrialModel.__table__
_params = models.TrialParamModel.__table__
_user_attrs = models.TrialUserAttributeModel.__table__
_system_attrs = models.TrialSystemAttributeModel.__table__
_heartbeats = models.TrialHeartbeatModel.__table__


class RDBTrialStore(TrialStore):
    """`TrialStore` on a database: a claim's parameters, attributes and first heartbeat are one
    transaction, a finished trial's attributes another, and the budget check three small queries
    (no trial rows loaded). The rows are optuna's (same tables, columns and JSON encoding)."""

    def __init__(self, study: optuna.Study, storage: RDBStorage) -> None:
        super().__init__(study)
        self.engine = storage.engine
        self.heartbeat = storage.get_heartbeat_interval() is not None

    def counts(self) -> Counts:
        """Three statements, in an order that can over-count (a trial RUNNING in the first and
        COMPLETE in the second counts twice: a conservative check) but never misses a trial that
        was claimed before the check began: trials only move WAITING -> RUNNING -> COMPLETE/FAIL,
        an interruption is written before its FAIL, and a retry lists its attempt once created."""
        sid = self.study._study_id
        interrupted = (
            sa.exists()
            .where(_user_attrs.c.trial_id == _trials.c.trial_id, _user_attrs.c.key == "interrupted",
                   _user_attrs.c.value_json == json.dumps(True))
        )
        complete = _trials.c.state == TrialState.COMPLETE
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(_trials.c.trial_id, _trials.c.number, _trials.c.state, interrupted)
                .where(_trials.c.study_id == sid, sa.or_(~complete, interrupted))
            ).all()
            n_complete = conn.execute(
                sa.select(sa.func.count()).select_from(_trials).where(_trials.c.study_id == sid, complete, ~interrupted)
            ).scalar_one()
            histories = conn.execute(
                sa.select(_system_attrs.c.value_json)
                .join(_trials, _trials.c.trial_id == _system_attrs.c.trial_id)
                .where(_trials.c.study_id == sid, _system_attrs.c.key == "retry_history")
            ).scalars()
            retried = {n for history in histories for n in json.loads(history)}
        counted = n_complete + sum(
            1 for _, number, state, stopped in rows if state != TrialState.COMPLETE and counts_toward_budget(state, number, stopped, retried)
        )
        running = frozenset(tid for tid, _, state, _ in rows if state == TrialState.RUNNING)
        return Counts(counted, running, sum(1 for row in rows if row[2] == TrialState.WAITING))

    def _waiting_ids(self) -> list[int]:
        query = (
            sa.select(_trials.c.trial_id)
            .where(_trials.c.study_id == self.study._study_id, _trials.c.state == TrialState.WAITING)
            .order_by(_trials.c.trial_id)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def _write_claim(self, trial_id: int, params: list[tuple[str, float, BaseDistribution]], user_attrs: Mapping[str, Any]) -> None:
        with self.engine.begin() as conn:
            self._lock_running(conn, trial_id)
            if params:
                conn.execute(sa.insert(_params), [
                    {"trial_id": trial_id, "param_name": name, "param_value": value, "distribution_json": distribution_to_json(dist)}
                    for name, value, dist in params
                ])
            self._put(conn, _user_attrs, trial_id, user_attrs)
            if self.heartbeat:
                conn.execute(sa.insert(_heartbeats).values(trial_id=trial_id))  # the database's clock, as optuna's beats

    def _write_attrs(self, trial_id: int, user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any]) -> None:
        with self.engine.begin() as conn:
            self._lock_running(conn, trial_id)
            self._put(conn, _user_attrs, trial_id, user_attrs)
            self._put(conn, _system_attrs, trial_id, system_attrs)

    @staticmethod
    def _lock_running(conn: sa.Connection, trial_id: int) -> None:
        """Hold the trial's row for the transaction, as optuna's state writes do, and refuse a
        finished trial, as optuna's attribute writes do (a heartbeat check may have failed it)."""
        state = conn.execute(sa.select(_trials.c.state).where(_trials.c.trial_id == trial_id).with_for_update()).scalar_one()
        if state.is_finished():
            raise UpdateFinishedTrialError(f"trial {trial_id} is already {state.name}; it cannot be updated")

    @staticmethod
    def _put(conn: sa.Connection, table: sa.Table, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Upsert attributes in two statements (any dialect): delete the keys, insert them."""
        if not attrs:
            return
        conn.execute(sa.delete(table).where(table.c.trial_id == trial_id, table.c.key.in_(list(attrs))))
        conn.execute(sa.insert(table), [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()])


def trial_store(study: optuna.Study, storage: optuna.storages.BaseStorage) -> TrialStore:
    """The batched store for a database ledger, optuna's API otherwise (the journal file)."""
    return RDBTrialStore(study, storage) if isinstance(storage, RDBStorage) else TrialStore(study)
