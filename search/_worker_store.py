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

import copy
import json
import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence

import optuna
import sqlalchemy as sa
from optuna import pruners
from optuna.distributions import BaseDistribution, distribution_to_json, json_to_distribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages._rdb import models
from optuna.study._tell import _check_values_are_feasible
from sqlalchemy.dialects import postgresql, sqlite
from optuna.trial import FrozenTrial, TrialState

from ._study_watch import TrialLike


def counts_toward_budget(state: TrialState, number: int, interrupted: bool, retried: Collection[int]) -> bool:
    """Whether a trial counts against the budget, as `Ledger.finished` counts: completed, or
    failed by its evaluation (not cut off by an interruption, nor a stale attempt that was retried)."""
    return (state == TrialState.COMPLETE or (state == TrialState.FAIL and number not in retried)) and not interrupted


def retried_numbers(trials: Iterable[TrialLike]) -> set[int]:
    """Numbers of trials that optuna's `RetryFailedTrialCallback` re-queued (their retries list them)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


@dataclass(frozen=True)
class Counts:
    """What the budget rule reads (`search._workers`): counted trials, RUNNING ones, queued ones."""

    counted: int
    running: frozenset[int]
    """trial ids"""
    waiting: int


def counted_and_running(trials: Sequence[TrialLike]) -> tuple[int, list[TrialLike]]:
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
    look: Future[Counts]
    """the budget counts read once the claim was written (the budget rule's second look);
    PostgreSQL's store reads a coordinated pop's with its genome, while the trial is evaluated,
    and a worker's own claim's in the claim's round trip (`search._pg_trial_store`)"""
    written: Future[None] = field(default_factory=lambda: _done(None))
    """the genome's write, when it goes on behind the claim (PostgreSQL, a worker's own claim):
    wait for it before giving the trial back"""

    @property
    def counts(self) -> Counts:
        """The second look (waits for it)."""
        return self.look.result()

    @property
    def trial_id(self) -> int:
        return self.trial._trial_id

    @property
    def candidate(self) -> int | None:
        cid = self.trial.user_attrs.get("candidate")
        return None if cid is None else int(cid)


def _done(value: Any) -> Future[Any]:
    done: Future[Any] = Future()
    done.set_result(value)
    return done


class _ClaimStorage:
    """The storage a claimed trial and the study's sampler see while the trial is opened and
    fills its genome: it answers the trial's read with what the claim already knows (a trial
    created a moment ago is empty), keeps the parameter writes (the store writes them together),
    lets the worker's writes behind land before the sampler reads the study (``before_read``: it
    sees the study as if the worker had waited for its last finish) and passes every other call on."""

    def __init__(
        self, storage: optuna.storages.BaseStorage, known: FrozenTrial | None, before_read: Callable[[], None],
    ) -> None:
        self.storage, self.known, self.before_read = storage, known, before_read
        self.params: list[tuple[str, float, BaseDistribution]] = []

    def get_trial(self, trial_id: int) -> FrozenTrial:
        if self.known is not None and trial_id == self.known._trial_id:
            return copy.deepcopy(self.known)
        self.before_read()
        return self.storage.get_trial(trial_id)

    def get_all_trials(self, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
        self.before_read()
        return self.storage.get_all_trials(*args, **kwargs)

    def get_n_trials(self, *args: Any, **kwargs: Any) -> int:
        self.before_read()
        return self.storage.get_n_trials(*args, **kwargs)

    def get_best_trial(self, *args: Any, **kwargs: Any) -> FrozenTrial:
        self.before_read()
        return self.storage.get_best_trial(*args, **kwargs)

    def set_trial_param(self, trial_id: int, name: str, value: float, distribution: BaseDistribution) -> None:
        self.params.append((name, value, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


def _open_trial(study: optuna.Study, trial_id: int, storage: _ClaimStorage) -> optuna.Trial:
    """``optuna.Trial(study, trial_id)`` (the sampler's ``before_trial`` included) on ``storage``:
    a Trial reads itself, and the sampler reads the study, through the trial's study's storage,
    so it is opened on a copy of the study (`TrialStore.claim` puts the study back once the
    genome is suggested)."""
    view = copy.copy(study)
    view._storage = storage  # type: ignore[assignment]
    return optuna.Trial(view, trial_id)


class TrialStore:
    """A worker's claims and finished trials through optuna's storage API (any storage)."""

    claims_look = False
    """Whether a worker's own claim looks at the budget itself (`claim`'s ``budget``), so its
    finish may go behind with no look after it (PostgreSQL's store, `search._pg_trial_store`)."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study

    def counts(self) -> Counts:
        trials = self.study.get_trials(deepcopy=False)
        counted, running = counted_and_running(trials)
        waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
        return Counts(counted, frozenset(t._trial_id for t in running), waiting)

    def claim(
        self, distributions: Mapping[str, BaseDistribution], user_attrs: Mapping[str, Any], *, pop: bool, fresh: bool,
        budget: int | None = None,
    ) -> Claim | None:
        """``study.ask(distributions)`` with the parameter and ``user_attrs`` writes batched (and,
        on a heartbeat storage, the trial's first heartbeat with them): pops a queued trial (when
        ``pop``: `counts` saw one), else (when ``fresh``) creates one the study's sampler fills;
        None when there was nothing to claim. The claim carries the counts read after it.
        ``budget``: a store that can look at the counts in the claim's own round trip
        (PostgreSQL's) claims nothing (None) once ``counted + running >= budget``, as a worker's
        first look would have decided; the others ignore it (their worker looked first)."""
        study = self.study
        study._thread_local.cached_all_trials = None  # as study.ask: samplers read the latest trials
        taken = self._take(user_attrs, pop=pop, fresh=fresh, budget=budget)
        if taken is None:
            return None
        trial_id, known, queued, look = taken
        storage = _ClaimStorage(study._storage, known, self._before_read)
        trial = _open_trial(study, trial_id, storage)
        try:
            for name, distribution in distributions.items():
                trial._suggest(name, distribution)  # what study.ask does: fixed, relative or independent
        finally:
            trial.study, trial.storage = study, study._storage
        if look is None:
            return Claim(trial, queued, self._second_look(trial_id, storage.params, queued))
        return Claim(trial, queued, _done(look), self._write_genome(trial_id, storage.params))

    def _take(
        self, user_attrs: Mapping[str, Any], *, pop: bool, fresh: bool, budget: int | None,
    ) -> tuple[int, FrozenTrial | None, bool, Counts | None] | None:
        """Move a trial to RUNNING for this worker (`_pop`, else `_create`): its id, the trial when
        known without a read, whether it was queued, and the second look when the same round
        trip read it (then the genome is written by `_write_genome`, else by `_second_look`)."""
        popped = self._pop(user_attrs) if pop else None
        if popped is not None:
            return (*popped, True, None)
        if not fresh:
            return None
        return (*self._create(user_attrs), False, None)

    def _before_read(self) -> None:
        """What must land before a claim's sampler reads the study (nothing: this store writes
        its finishes before it returns)."""

    def _second_look(self, trial_id: int, params: list[tuple[str, float, BaseDistribution]], queued: bool) -> Future[Counts]:
        """`_write_claim`, done by the time it returns."""
        return _done(self._write_claim(trial_id, params))

    def _write_genome(self, trial_id: int, params: list[tuple[str, float, BaseDistribution]]) -> Future[None]:
        """The genome of a claim whose second look is known (`_take`); done by the time it returns."""
        for name, value, distribution in params:
            self.study._storage.set_trial_param(trial_id, name, value, distribution)
        return _done(None)

    def _create(self, user_attrs: Mapping[str, Any]) -> tuple[int, FrozenTrial | None]:
        """A new RUNNING trial with ``user_attrs`` and its first heartbeat: its id, and the trial
        itself when known without a read."""
        trial_id = self.study._storage.create_new_trial(self.study._study_id)
        self._mark(trial_id, user_attrs)
        return trial_id, None

    def _pop(self, user_attrs: Mapping[str, Any]) -> tuple[int, FrozenTrial | None] | None:
        """Move the oldest WAITING trial to RUNNING, as ``study.ask`` does (optuna's state write
        takes the row ``FOR UPDATE`` and refuses a trial no longer WAITING, so one claimant wins),
        with ``user_attrs`` and its first heartbeat; as `_create`, or None when none was left."""
        for trial_id in self._waiting_ids():
            try:
                if self.study._storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    self._mark(trial_id, user_attrs)
                    return trial_id, None
            except UpdateFinishedTrialError:
                continue
        return None

    def _mark(self, trial_id: int, user_attrs: Mapping[str, Any]) -> None:
        storage = self.study._storage
        for key, value in user_attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
        if is_heartbeat_enabled(storage):
            storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]

    def _waiting_ids(self) -> list[int]:
        return [t._trial_id for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))]

    def finish(
        self, trial: optuna.Trial, user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any],
        values: Sequence[float] | None, *, behind: bool = False,
    ) -> Counts | None:
        """Write a trial's attributes, then tell the study (COMPLETE with ``values``, else FAIL);
        the counts read after it (the next claim's first look). ``behind``: the write may go on
        while the worker moves on (PostgreSQL's store); then None, and `close` waits for it."""
        storage = self.study._storage
        for key, value in user_attrs.items():
            storage.set_trial_user_attr(trial._trial_id, key, value)
        for key, value in system_attrs.items():
            storage.set_trial_system_attr(trial._trial_id, key, value)
        if values is None:
            self.study.tell(trial, state=TrialState.FAIL)
        else:
            self.study.tell(trial, list(values))
        return self.counts()

    def close(self) -> None:
        """Wait for the writes still on their way, raising the first that failed."""

    def _write_claim(self, trial_id: int, params: list[tuple[str, float, BaseDistribution]]) -> Counts:
        """Write the genome a claimed trial suggested; the counts read after it."""
        for name, value, distribution in params:
            self.study._storage.set_trial_param(trial_id, name, value, distribution)
        return self.counts()


_studies = models.StudyModel.__table__
_trials = models.TrialModel.__table__
_params = models.TrialParamModel.__table__
_values = models.TrialValueModel.__table__
_user_attrs = models.TrialUserAttributeModel.__table__
_system_attrs = models.TrialSystemAttributeModel.__table__
_heartbeats = models.TrialHeartbeatModel.__table__
_intermediate = models.TrialIntermediateValueModel.__table__


def _utc(when: datetime | None = None) -> datetime:
    """optuna's RDB storage keeps trial datetimes as naive UTC (default: now)."""
    return (datetime.now() if when is None else when).astimezone(timezone.utc).replace(tzinfo=None)


class RDBTrialStore(TrialStore):
    """`TrialStore` on SQLite (and the base of PostgreSQL's, `search._pg_trial_store`), in few
    round trips: the budget count is one query (no trial rows loaded); a claim is one transaction
    (the trial moved to RUNNING with its ``worker`` attribute and first heartbeat), one insert of
    its genome and a count; a finished trial (attributes, values, state) is one transaction.
    The rows are optuna's: same tables, columns and encodings (``tests/search/test_worker_store.py``
    compares them with optuna's own writes)."""

    def __init__(self, study: optuna.Study, storage: RDBStorage) -> None:
        super().__init__(study)
        self.engine = storage.engine
        self.heartbeat = storage.get_heartbeat_interval() is not None
        self._count_query = count_query(study._study_id)
        self._upserts = {t.name: _upsert(self.engine.dialect.name, t) for t in (_user_attrs, _system_attrs)}

    def counts(self) -> Counts:
        with self._statements() as conn:
            return tally(conn.execute(self._count_query))

    @contextmanager
    def _statements(self) -> Iterator[sa.Connection]:
        """A connection for statements that need no transaction together (SQLite: a transaction)."""
        with self.engine.begin() as conn:
            yield conn

    def _create(self, user_attrs: Mapping[str, Any]) -> tuple[int, FrozenTrial | None]:
        """optuna's trial creation in one insert (the study's row is locked, so the trial's number,
        the count of the study's trials before it, is unique, as optuna numbers them), in one
        transaction with ``user_attrs`` and the first heartbeat."""
        start = datetime.now()  # FrozenTrial: local time; the database: naive UTC
        sid = self.study._study_id
        with self.engine.begin() as conn:
            conn.execute(sa.select(_studies.c.study_id).where(_studies.c.study_id == sid).with_for_update())
            number = sa.select(sa.func.count()).select_from(_trials).where(_trials.c.study_id == sid).scalar_subquery()
            trial_id, number = conn.execute(
                sa.insert(_trials)
                .values(number=number, study_id=sid, state=TrialState.RUNNING, datetime_start=_utc(start))
                .returning(_trials.c.trial_id, _trials.c.number)
            ).one()
            self._mark_in(conn, trial_id, user_attrs)
        return trial_id, FrozenTrial(
            number=number, state=TrialState.RUNNING, value=None, values=None, datetime_start=start,
            datetime_complete=None, params={}, distributions={}, user_attrs=dict(user_attrs), system_attrs={},
            intermediate_values={}, trial_id=trial_id,
        )

    def _pop(self, user_attrs: Mapping[str, Any]) -> tuple[int, FrozenTrial | None] | None:
        # optuna's pop (a state write that refuses a trial no longer WAITING) in one statement, in
        # one transaction with the user attributes, the first heartbeat and the trial's read
        # (SQLite: one writer at a time; PostgreSQL's pop is one statement, `search._pg_trial_store`)
        start = datetime.now()
        with self.engine.connect() as conn:
            waiting = conn.execute(
                sa.select(_trials.c.trial_id)
                .where(_trials.c.study_id == self.study._study_id, _trials.c.state == TrialState.WAITING)
                .order_by(_trials.c.trial_id)
            ).scalars().all()
            for trial_id in waiting:
                number = conn.execute(
                    sa.update(_trials)
                    .where(_trials.c.trial_id == trial_id, _trials.c.state == TrialState.WAITING)
                    .values(state=TrialState.RUNNING, datetime_start=_utc(start))
                    .returning(_trials.c.number)
                ).scalar_one_or_none()
                if number is None:
                    conn.commit()
                    continue
                self._mark_in(conn, trial_id, user_attrs)
                known = self._read_queued(conn, trial_id, number, start)
                conn.commit()
                return trial_id, known
        return None

    @staticmethod
    def _read_queued(conn: sa.Connection, trial_id: int, number: int, start: datetime) -> FrozenTrial | None:
        """A popped trial as optuna's ``get_trial`` reads it, in one query instead of its six."""
        return queued_trial(trial_id, number, start, conn.execute(trial_rows(sa.literal(trial_id))))

    def _mark_in(self, conn: sa.Connection, trial_id: int, user_attrs: Mapping[str, Any]) -> None:
        """`TrialStore._mark` inside the claim's transaction."""
        self._put(conn, _user_attrs, trial_id, user_attrs)
        if self.heartbeat:
            conn.execute(sa.insert(_heartbeats).values(trial_id=trial_id))  # the database's clock, as optuna's beats

    def _write_claim(self, trial_id: int, params: list[tuple[str, float, BaseDistribution]]) -> Counts:
        # one multi-row insert, no transaction: optuna too writes parameters one statement at a
        # time. No state check: this worker moved the trial to RUNNING a moment ago with its
        # first heartbeat, and no one fails a trial before it has gone two intervals without one
        with self._statements() as conn:
            if params:
                conn.execute(sa.insert(_params), [
                    {"trial_id": trial_id, "param_name": name, "param_value": value, "distribution_json": distribution_to_json(dist)}
                    for name, value, dist in params
                ])
            return tally(conn.execute(self._count_query))

    def finish(
        self, trial: optuna.Trial, user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any],
        values: Sequence[float] | None, *, behind: bool = False,
    ) -> Counts | None:
        """optuna's tell (values checked, the sampler's ``after_trial``, values and state written)
        with the attributes and the counts that follow, in one transaction and without reading
        the trial back (``behind``: `TrialStore.finish`)."""
        study, state = self.study, TrialState.COMPLETE
        study._thread_local.cached_all_trials = None
        if values is not None and (problem := _check_values_are_feasible(study, values)) is not None:
            warnings.warn(problem, stacklevel=2)  # what study.tell does with such values: FAIL
            values = None
        if values is None:
            state = TrialState.FAIL
        frozen = trial._get_latest_trial()
        study.sampler.after_trial(pruners._filter_study(study, frozen), frozen, state, values)
        return self._write_finish(trial._trial_id, trial.number, state, user_attrs, system_attrs, values, behind=behind)

    def _write_finish(
        self, trial_id: int, number: int, state: TrialState, user_attrs: Mapping[str, Any],
        system_attrs: Mapping[str, Any], values: Sequence[float] | None, *, behind: bool = False,
    ) -> Counts | None:
        """State, attributes and values in one transaction, and the counts that follow (written
        now, ``behind`` or not: SQLite has one writer, and a write behind would hold it)."""
        with self.engine.begin() as conn:
            # first: takes the row lock, and refuses a trial a heartbeat check failed meanwhile
            if not conn.execute(
                sa.update(_trials).where(_trials.c.trial_id == trial_id, _trials.c.state == TrialState.RUNNING)
                .values(state=state, datetime_complete=_utc())
            ).rowcount:
                raise _no_longer_running(number)
            self._put(conn, _user_attrs, trial_id, user_attrs)
            self._put(conn, _system_attrs, trial_id, system_attrs)
            if values:
                conn.execute(sa.insert(_values), [{"trial_id": trial_id, **row} for row in value_rows(values)])
            return tally(conn.execute(self._count_query))

    def _put(self, conn: sa.Connection, table: sa.Table, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Upsert attributes in one ``INSERT ... ON CONFLICT DO UPDATE``, as optuna writes one."""
        if attrs:
            conn.execute(self._upserts[table.name], [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()])


_UPSERT = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
"""The dialects `RDBTrialStore` writes (upserts, ``RETURNING``); other databases use `TrialStore`."""


def _upsert(dialect: str, table: sa.Table) -> sa.Insert:
    """``INSERT ... ON CONFLICT (trial_id, key) DO UPDATE`` of an attribute table, as optuna upserts
    one attribute (built once per store: building it costs more than running it)."""
    stmt = _UPSERT[dialect](table)
    return stmt.on_conflict_do_update(index_elements=[table.c.trial_id, table.c.key], set_={"value_json": stmt.excluded.value_json})


def count_query(study_id: int) -> sa.CompoundSelect:
    """The budget count's statement (read by `tally`): a ``("trial", trial_id, number, state,
    interrupted, retry_history)`` row per trial that is not COMPLETE (or is interrupted, or is a
    retry), and one ``("complete", None, n)`` row whose ``n`` counts the COMPLETE trials that are
    not interrupted."""
    interrupted = (
        sa.exists()
        .where(_user_attrs.c.trial_id == _trials.c.trial_id, _user_attrs.c.key == "interrupted",
               _user_attrs.c.value_json == json.dumps(True))
    )
    history = _system_attrs.alias("history")
    complete = _trials.c.state == TrialState.COMPLETE
    rows = (
        sa.select(sa.literal("trial"), _trials.c.trial_id, _trials.c.number, _trials.c.state, interrupted, history.c.value_json)
        .select_from(_trials.outerjoin(history, sa.and_(history.c.trial_id == _trials.c.trial_id, history.c.key == "retry_history")))
        .where(_trials.c.study_id == study_id, sa.or_(~complete, interrupted, history.c.value_json.is_not(None)))
    )
    n_complete = (
        sa.select(sa.literal("complete"), sa.null(), sa.func.count(), sa.null(), sa.null(), sa.null())
        .select_from(_trials)
        .where(_trials.c.study_id == study_id, complete, ~interrupted)
    )
    return sa.union_all(rows, n_complete)


def tally(rows: Iterable[Sequence[Any]], finished: tuple[int, TrialState] | None = None) -> Counts:
    """The `Counts` of `count_query`'s rows, one snapshot of the study. ``finished``: a trial the
    same statement moved from RUNNING to this state (a statement does not see its own writes),
    counted as the snapshot right after it would count it: a trial finished by its worker counts
    (its retry cannot exist: a retry exists only once a heartbeat check failed it, and then the
    worker's finish is refused)."""
    trials, n_complete = [], 0
    for kind, trial_id, number, state, stopped, history in rows:
        if kind == "complete":
            n_complete = number
        elif kind == "trial":
            trials.append((trial_id, number, state, bool(stopped), history))
    if finished is not None:
        trials = [row for row in trials if row[0] != finished[0]]
        n_complete += 1
    retried = {n for *_, history in trials if history is not None for n in json.loads(history)}
    counted = n_complete + sum(
        1 for _, number, state, stopped, _ in trials
        if state != TrialState.COMPLETE and counts_toward_budget(state, number, stopped, retried)
    )
    running = frozenset(tid for tid, _, state, _, _ in trials if state == TrialState.RUNNING)
    return Counts(counted, running, sum(1 for row in trials if row[2] == TrialState.WAITING))


def trial_rows(trial_id: sa.ColumnElement[int]) -> sa.CompoundSelect:
    """What a popped trial needs read (`queued_trial`): ``(kind, key, text, value, seq)`` rows, one
    per parameter (name, distribution JSON, internal value, param_id), user and system attribute
    (key, value JSON) and intermediate value (step) of the trial ``trial_id`` (a literal, or a
    column of the statement's own pop)."""
    return sa.union_all(
        sa.select(sa.literal("param"), _params.c.param_name, _params.c.distribution_json, _params.c.param_value, _params.c.param_id)
        .where(_params.c.trial_id == trial_id),
        *(
            sa.select(sa.literal(kind), table.c.key, table.c.value_json, sa.cast(sa.null(), sa.Float), sa.literal(0))
            .where(table.c.trial_id == trial_id)
            for kind, table in (("user", _user_attrs), ("system", _system_attrs))
        ),
        sa.select(sa.literal("intermediate"), sa.cast(_intermediate.c.step, sa.String), sa.null(), sa.cast(sa.null(), sa.Float), sa.literal(0))
        .where(_intermediate.c.trial_id == trial_id),
    )


def queued_trial(trial_id: int, number: int, start: datetime, rows: Iterable[Sequence[Any]]) -> FrozenTrial | None:
    """The RUNNING trial optuna's ``get_trial`` would read from `trial_rows`; None for one with
    intermediate values (none of ours has any), which optuna then reads itself."""
    params: list[tuple[int, str, str, float]] = []
    attrs: dict[str, dict[str, Any]] = {"user": {}, "system": {}}
    for kind, key, text, value, seq in rows:
        if kind == "param":
            params.append((seq, key, text, value))
        elif kind == "intermediate":
            return None
        elif kind in attrs:
            attrs[kind][key] = json.loads(text)
    params.sort()
    distributions = {name: json_to_distribution(dist) for _, name, dist, _ in params}
    return FrozenTrial(
        number=number, state=TrialState.RUNNING, value=None, values=None, datetime_start=start,
        datetime_complete=None,
        params={name: distributions[name].to_external_repr(value) for _, name, _, value in params},
        distributions=distributions, user_attrs=attrs["user"], system_attrs=attrs["system"],
        intermediate_values={}, trial_id=trial_id,
    )


def value_rows(values: Sequence[float]) -> list[dict[str, Any]]:
    """A finished trial's ``trial_values`` rows (objective, stored value, value type), as optuna
    encodes them (infinities as a type with no value)."""
    rows = []
    for objective, value in enumerate(values):
        stored, kind = models.TrialValueModel.value_to_stored_repr(float(value))
        rows.append({"objective": objective, "value": stored, "value_type": kind})
    return rows


def _no_longer_running(number: int) -> UpdateFinishedTrialError:
    return UpdateFinishedTrialError(f"trial {number} is no longer RUNNING; it cannot be finished")
