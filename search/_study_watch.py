"""What a coordinator reads of the shared study each poll, without reloading it.

A coordinator (`search._workers.Coordinator`) polls the study a few times a second to tell its
optimizer what finished and to decide what to enqueue. Reloading every trial with all its rows
(optuna's ``get_trials``: a 32-parameter genome is 32 parameter rows) each poll was the larger
part of a nevergrad run's coordination cost (docs/scale-out.md, Overhead). What the coordinator
needs of a trial is its number, state and five attributes, and it needs them only when a trial
finished or appeared since its last look. `RDBStudyWatch` therefore asks first one aggregate
query (trials, COMPLETE ones, FAIL ones) and reads the trials only when it changed, and then
only the trials from the oldest one that was unfinished at the last read on (finished trials
never change).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import optuna
import sqlalchemy as sa
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

_trials = models.TrialModel.__table__
_user_attrs = models.TrialUserAttributeModel.__table__
_system_attrs = models.TrialSystemAttributeModel.__table__

USER_KEYS = ("candidate", "interrupted", "failure", "requeued_from", "objectives")
"""The user attributes the coordinator reads (`search._workers.study_state`, its tell)."""
SYSTEM_KEYS = ("retry_history",)
"""The system attribute the coordinator reads (optuna's retry lineage)."""
_FINISHED = (TrialState.COMPLETE, TrialState.FAIL)


@dataclass(frozen=True)
class TrialRecord:
    """The part of a trial a coordinator reads (duck-types ``FrozenTrial`` for `study_state`,
    `counted_and_running` and `Ledger.objective_values`)."""

    _trial_id: int
    number: int
    state: TrialState
    user_attrs: Mapping[str, Any]
    system_attrs: Mapping[str, Any]


TrialLike = FrozenTrial | TrialRecord
"""What the coordinator's rules read a trial as: optuna's, or the watch's record of it."""


class StudyWatch:
    """Any storage: every poll is a full read of the study (the journal file has no cheaper one)."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study

    def changed(self) -> Sequence[TrialLike] | None:
        """The study's trials if anything may have changed since the last call, else None."""
        return self.study.get_trials(deepcopy=False)

    def trials(self) -> Sequence[TrialLike]:
        """The study's trials now (one read)."""
        return self.study.get_trials(deepcopy=False)


class RDBStudyWatch(StudyWatch):
    """PostgreSQL/SQLite: a poll is one aggregate query while nothing finished or appeared; a read
    is one statement (one snapshot on PostgreSQL) over the trials not known to be finished.

    Why the aggregate is a sufficient change test: trials are never deleted and a finished
    trial's state never changes, so (trials, COMPLETE, FAIL) only grows, and every step the
    coordinator acts on grows it: a trial finishes (COMPLETE or FAIL, its attributes written
    before or with its state), a retry or a re-queue is a new trial (its lineage attributes
    written with it). A RUNNING trial that only heartbeats, or a WAITING one popped, changes no
    decision: the coordinator counts its in-flight candidates itself.

    Why reading from the floor on misses no trial: a trial's id is drawn after its study's row
    is locked (optuna's trial creation and `RDBTrialStore`'s both lock it), so a study's trials
    commit in id order and a trial committed after a read has an id above every trial it saw."""

    def __init__(self, study: optuna.Study, storage: RDBStorage) -> None:
        super().__init__(study)
        self.engine = storage.engine
        sid = study._study_id
        self._token_query = sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(sa.case((_trials.c.state == TrialState.COMPLETE, 1), else_=0)), 0),
            sa.func.coalesce(sa.func.sum(sa.case((_trials.c.state == TrialState.FAIL, 1), else_=0)), 0),
        ).where(_trials.c.study_id == sid)
        self._token: tuple[int, int, int] | None = None
        self._known: dict[int, TrialRecord] = {}  # by trial id: finished ones below the floor, and the last read's
        self._floor = 0  # trials below this id were finished at the last read

    def changed(self) -> Sequence[TrialRecord] | None:
        with self.engine.connect() as conn:
            token = tuple(conn.execute(self._token_query).one())
        if token == self._token:
            return None
        # the token is the one read *before* the trials: a change in between is read now and
        # seen again at the next poll (one read too many, never one too few)
        records = self.trials()
        self._token = token  # type: ignore[assignment]
        return records

    def trials(self) -> Sequence[TrialRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(_read_query(self.study._study_id), {"floor": self._floor}).all()
        fresh: dict[int, TrialRecord] = {}
        for kind, trial_id, number, state, key, value in rows:
            if kind == "trial":
                fresh[trial_id] = TrialRecord(trial_id, number, TrialState(state), {}, {})
        for kind, trial_id, _, _, key, value in rows:
            if kind != "trial" and trial_id in fresh:
                attrs = fresh[trial_id].user_attrs if kind == "user" else fresh[trial_id].system_attrs
                attrs[key] = json.loads(value)  # type: ignore[index]
        self._known = {tid: rec for tid, rec in self._known.items() if tid < self._floor} | fresh
        unfinished = [tid for tid, rec in fresh.items() if rec.state not in _FINISHED]
        self._floor = min(unfinished) if unfinished else max(fresh, default=self._floor - 1) + 1
        return sorted(self._known.values(), key=lambda rec: rec.number)


def _read_query(study_id: int) -> sa.CompoundSelect:
    """(kind, trial_id, number, state, key, value_json) rows: one per trial with ``trial_id >=
    :floor`` (kind "trial") and one per attribute of it the coordinator reads (kind "user" or
    "system"), in one statement."""
    recent = sa.and_(_trials.c.study_id == study_id, _trials.c.trial_id >= sa.bindparam("floor"))

    def attrs(kind: str, table: sa.Table, keys: Sequence[str]) -> sa.Select:
        return (
            sa.select(sa.literal(kind), table.c.trial_id, sa.null(), sa.null(), table.c.key, table.c.value_json)
            .select_from(table.join(_trials, _trials.c.trial_id == table.c.trial_id))
            .where(recent, table.c.key.in_(keys))
        )

    return sa.union_all(
        sa.select(sa.literal("trial"), _trials.c.trial_id, _trials.c.number, _trials.c.state, sa.null(), sa.null()).where(recent),
        attrs("user", _user_attrs, USER_KEYS),
        attrs("system", _system_attrs, SYSTEM_KEYS),
    )


def study_watch(study: optuna.Study, storage: optuna.storages.BaseStorage) -> StudyWatch:
    """The cheap watch on a PostgreSQL or SQLite ledger, full reads otherwise."""
    if isinstance(storage, RDBStorage) and storage.engine.dialect.name in ("postgresql", "sqlite"):
        return RDBStudyWatch(study, storage)
    return StudyWatch(study)
