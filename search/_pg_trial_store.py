"""A worker's claims and finishes on PostgreSQL in one statement each (`PostgresTrialStore`).

With four workers a trial's coordination was ~16 round trips (a pop was a transaction of seven
statements, the genome insert and a count two more, a finish a transaction of six), each a few
milliseconds while the cores are busy evaluating: 7% of a nevergrad trial's evaluation time on
the small zoo (docs/scale-out.md, Overhead). PostgreSQL runs several writes in one statement
(data-modifying ``WITH``) and one statement in autocommit mode is its own transaction, so a
trial is now three statements:

* **pop**: ``UPDATE trials ... WHERE trial_id = (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1)``
  with the ``worker`` attribute and the first heartbeat written from its ``RETURNING`` and the
  popped trial's rows read, all in one statement. Claimants skip each other's locked row
  instead of queueing behind it; a row another claimant moved to RUNNING meanwhile is
  re-checked under its lock and passed over, so a queued trial still goes to exactly one worker.
* **genome and second look**: the parameter rows inserted in a ``WITH`` of the budget count.
  This count must be a statement of its own, after the pop committed: two claimants whose
  counts both began before the other's pop committed could both keep their claims, while of
  two counts that each follow their own pop's commit the later sees the other claim.
* **finish**: state (only while RUNNING: a trial a heartbeat check failed meanwhile is refused),
  attributes and values in one statement, with the budget count (not when written behind: no
  one reads it). The count reads the snapshot the statement began with (it does not see its
  own writes); `tally` applies the finish to it.

Each round trip still costs milliseconds while the cores evaluate (the server and the worker
wait for a core), so for a popped candidate only the pop stays on the worker's path: its genome
and second look run on the store's thread while it evaluates, and its finish while the worker
pops the next one (`_second_look`, `_write_finish`; one thread, so they land in order).

A worker's **own claim** (optuna samplers: every worker runs the sampler) is one round trip
(`_take_sql`, several statements sent as one query): under the study's row lock, the first look
at the budget (in SQL), the pop of a queued trial or else a new trial with its attributes and
first heartbeat, committed; then the second look. Its genome and its finish go behind, as a
popped candidate's do, so one round trip per trial (one synchronous commit) stays on the
worker's path. The worker needs no look of its own after a finish written behind: the claim's
first look refuses a claim the budget has no room for, and the second look keeps the budget
exact as for any claim (the workers' claims are made one at a time under the lock, each
after every claim committed before it, so a second look gives a claim back only when a claim
made without the lock, such as optuna's own ``study.ask``, raced it). A sampler that reads the study waits for
the worker's last finish first (`_before_read`), so it sees what it saw when that finish was
written before the claim.

SQLite keeps `RDBTrialStore`'s path (it has one writer at a time and no writes in ``WITH``).
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Iterator, Mapping, Sequence

import optuna
import sqlalchemy as sa
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.dialects import postgresql

from ._worker_store import (
    Counts, RDBTrialStore, TrialStore, _heartbeats, _no_longer_running, _params, _system_attrs, _trials, _user_attrs,
    _utc, _values, count_query, queued_trial, tally, trial_rows, value_rows,
)


class PostgresTrialStore(RDBTrialStore):
    """`RDBTrialStore` on PostgreSQL: a pop, a genome with its count, and a finish are one
    autocommit statement each (module docstring); the rows are the same."""

    def __init__(self, study: optuna.Study, storage: RDBStorage) -> None:
        super().__init__(study, storage)
        # statements that are their own transaction: no BEGIN and COMMIT round trips (a pool of
        # its own, as switching a pooled connection's mode costs round trips too)
        self._autocommit = sa.create_engine(self.engine.url, isolation_level="AUTOCOMMIT", pool_size=2)
        # one thread for the writes a worker does not wait for (a queued trial's genome and
        # second look, its finish), so they land in the order they were made
        self._writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writes-behind")
        self._behind: list[Future[Any]] = []  # writes behind (genomes, finishes), not yet settled
        self._genomes: dict[int, Future[None]] = {}  # trial id -> its genome's write behind, until its finish
        sid = study._study_id
        self._pop_query = _pop_query(sid, self.heartbeat)
        genome = _insert_from(_params, ("trial_id", "param_name", "param_value", "distribution_json"), None)
        self._claim_query = count_query(sid).add_cte(genome)
        self._genome_query = sa.select(sa.literal(1)).add_cte(genome)
        self._finish_query = _finish_query(sid)
        self._finish_behind_query = _finish_query(sid, count=False)
        # several statements with parameters in one query: psycopg2 (the project's driver) sends
        # it as one simple query; a driver that prepares statements (psycopg 3) cannot, and its
        # workers' own claims take `RDBTrialStore`'s transaction, their finishes written at once
        self._take_sql = _take_sql(sid, self.heartbeat, self.engine.dialect) if self.engine.dialect.driver == "psycopg2" else None
        self.claims_look = self._take_sql is not None

    @contextmanager
    def _statements(self) -> Iterator[sa.Connection]:
        with self._autocommit.connect() as conn:
            yield conn

    def counts(self) -> Counts:
        self._settle()
        return super().counts()

    def close(self) -> None:
        self._writes.shutdown(wait=True)
        self._settle()

    def _settle(self) -> None:
        """Raise the error of a write behind (a genome, a finish), once it is done."""
        done = [f for f in self._behind if f.done()]
        self._behind = [f for f in self._behind if not f.done()]
        # a genome that landed needs no check by its finish (a trial given back has none)
        self._genomes = {tid: f for tid, f in self._genomes.items() if not f.done() or f.exception() is not None}
        for finished in done:
            finished.result()

    def _pop(self, user_attrs: Mapping[str, Any]) -> tuple[int, FrozenTrial | None] | None:
        self._settle()
        start = datetime.now()  # FrozenTrial: local time; the database: naive UTC
        with self._statements() as conn:
            rows = conn.execute(self._pop_query, {"start": _utc(start), **_attr_binds("user_", user_attrs)}).all()
        popped = next((row for row in rows if row[0] == "popped"), None)
        if popped is None:
            return None  # none left, or every one locked by another claimant
        trial_id, number = popped[4], int(popped[3])
        known = queued_trial(trial_id, number, start, (row for row in rows if row[0] != "popped"))
        if known is not None:  # the statement's read predates its own attribute writes
            known.user_attrs.update(user_attrs)
        return trial_id, known

    def _take(
        self, user_attrs: Mapping[str, Any], *, pop: bool, fresh: bool, budget: int | None,
    ) -> tuple[int, FrozenTrial | None, bool, Counts | None] | None:
        """A worker's own claim (``fresh``: optuna samplers) in one round trip (`_take_sql`): the
        budget's first look, the pop of a queued trial or a new trial, its attributes and first
        heartbeat, committed; then the second look. The genome follows behind (`_write_genome`).
        A coordinated pop (not ``fresh``) is `_pop`, its genome and second look behind."""
        if not fresh or self._take_sql is None:
            return super()._take(user_attrs, pop=pop, fresh=fresh, budget=budget)
        self._settle()
        start = datetime.now()  # FrozenTrial: local time; the database: naive UTC
        params = {
            "start": _utc(start), "pop": pop, "budget": _NO_BUDGET if budget is None else budget,
            **_attr_binds("user_", user_attrs),
        }
        with self._statements() as conn:
            try:
                rows = conn.exec_driver_sql(self._take_sql, params).all()
            except BaseException:
                conn.invalidate()  # an error inside the claim's BEGIN ... COMMIT leaves the session in it
                raise
        claimed = next((row for row in rows if row[0] == "claimed"), None)
        if claimed is None:
            return None  # the first look saw the budget taken
        trial_id, number, queued = int(claimed[1]), int(claimed[2]), bool(claimed[4])
        counts = tally((kind, tid, n, None if state is None else TrialState[state], stopped, history)
                       for kind, tid, n, state, stopped, history in rows)
        if queued:  # a retry or a re-queued trial (rare): optuna reads it
            return trial_id, None, True, counts
        return trial_id, FrozenTrial(
            number=number, state=TrialState.RUNNING, value=None, values=None, datetime_start=start,
            datetime_complete=None, params={}, distributions={}, user_attrs=dict(user_attrs), system_attrs={},
            intermediate_values={}, trial_id=trial_id,
        ), False, counts

    def _before_read(self) -> None:
        """A sampler that reads the study (TPE, NSGA-II; not the random sampler) sees it as a
        worker that wrote its last finish before claiming would: the finish went behind, and
        almost always landed during the claim's round trip."""
        wait(self._behind)

    def _write_genome(self, trial_id: int, params: list[tuple[str, float, BaseDistribution]]) -> Future[None]:
        """On the store's thread while the trial is evaluated; the trial's finish waits for it.
        A worker killed before it lands leaves a RUNNING trial without parameters: failed by
        heartbeat and retried (its retry samples them), as optuna's own trials killed before
        their ``suggest`` calls are."""
        written = self._writes.submit(self._statement, self._genome_query, _genome_binds(trial_id, params))
        self._genomes[trial_id] = written
        self._behind.append(written)
        return written

    def _statement(self, statement: sa.Executable, binds: Mapping[str, Any]) -> None:
        with self._statements() as conn:
            conn.execute(statement, binds)

    def _second_look(self, trial_id: int, params: list[tuple[str, float, BaseDistribution]], queued: bool) -> Future[Counts]:
        """A queued trial's genome and second look run on the store's thread while the worker
        decodes and evaluates (its round trip, a few ms on busy cores, is then off the worker's
        path); the worker checks the look before the finish. A queued trial's genome is also in
        its ``fixed_params``, so a worker killed before the write leaves a retry that needs none.
        (A worker's own claim reads its second look in the claim's round trip, `_take`.)"""
        if not queued:
            return super()._second_look(trial_id, params, queued)
        return self._writes.submit(self._write_claim, trial_id, params)

    def _write_claim(self, trial_id: int, params: list[tuple[str, float, BaseDistribution]]) -> Counts:
        # no state check: this worker moved the trial to RUNNING a moment ago with its first
        # heartbeat, and no one fails a trial before it has gone two intervals without one
        with self._statements() as conn:
            return tally(conn.execute(self._claim_query, _genome_binds(trial_id, params)))

    def _write_finish(
        self, trial_id: int, number: int, state: TrialState, user_attrs: Mapping[str, Any],
        system_attrs: Mapping[str, Any], values: Sequence[float] | None, *, behind: bool = False,
    ) -> Counts | None:
        """``behind``: on the store's thread, after the trial's genome (one thread, in order),
        while the worker claims its next trial, and without the count that follows (no one
        reads it); a failed write is raised by the worker's next claim, finish or count, or by
        `close`.
        A worker killed before it lands leaves its trial RUNNING: failed by heartbeat and
        retried, as if killed while evaluating. Not written when the trial's genome write failed."""
        if behind:
            self._settle()
            self._behind.append(self._writes.submit(
                self._finish, self._finish_behind_query, trial_id, number, state, user_attrs, system_attrs, values,
            ))
            return None
        result = self._finish(self._finish_query, trial_id, number, state, user_attrs, system_attrs, values)
        return tally(result, finished=(trial_id, state))

    def _finish(
        self, query: sa.Executable, trial_id: int, number: int, state: TrialState, user_attrs: Mapping[str, Any],
        system_attrs: Mapping[str, Any], values: Sequence[float] | None,
    ) -> list[sa.Row[Any]]:
        genome = self._genomes.pop(trial_id, None)
        if genome is not None:
            genome.result()  # landed (raises if it failed: a trial is not finished without its genome)
        rows = value_rows(values or ())
        with self._statements() as conn:
            result = conn.execute(query, {
                "trial": trial_id, "state": state, "complete": _utc(),
                **_attr_binds("user_", user_attrs), **_attr_binds("system_", system_attrs),
                **{column: [row[column] for row in rows] for column in ("objective", "value", "value_type")},
            }).all()
        if not any(row[0] == "finished" for row in result):
            raise _no_longer_running(number)
        return result


def _genome_binds(trial_id: int, params: Sequence[tuple[str, float, BaseDistribution]]) -> dict[str, list[Any]]:
    """A genome's ``trial_params`` rows, bound for `_insert_from`'s arrays."""
    return {
        "trial_id": [trial_id] * len(params), "param_name": [name for name, _, _ in params],
        "param_value": [value for _, value, _ in params],
        "distribution_json": [distribution_to_json(dist) for _, _, dist in params],
    }


def _attr_binds(prefix: str, attrs: Mapping[str, Any]) -> dict[str, list[str]]:
    """Keys and JSON values, as optuna encodes attributes, bound for `_insert_from`'s arrays."""
    return {f"{prefix}key": list(attrs), f"{prefix}value_json": [json.dumps(v) for v in attrs.values()]}


def _unnest(table: sa.Table, columns: Sequence[str], prefix: str) -> sa.TableValuedAlias:
    """``unnest(:a::type[], ...) AS rows(a, ...)``: rows of ``table``'s ``columns`` from parallel
    arrays bound as ``prefix + column``, so a statement writes any number of rows and compiles
    once (its shape never changes); the array types type an empty array."""
    arrays = [sa.bindparam(f"{prefix}{c}", type_=postgresql.ARRAY(table.c[c].type)) for c in columns]
    return sa.func.unnest(*arrays).table_valued(*columns).render_derived(name=f"{prefix or table.name}_rows")


def _insert_from(
    table: sa.Table, columns: Sequence[str], trial: sa.CTE | None, prefix: str = "", upsert: bool = False,
) -> sa.CTE:
    """A ``WITH`` insert of ``table`` rows from bound arrays (`_unnest`), their ``trial_id`` taken
    from ``trial`` (a CTE's ``RETURNING``: no row there, no row here) unless the arrays bind it;
    ``upsert``: an attribute table, written as optuna upserts one."""
    rows = _unnest(table, [c for c in columns if trial is None or c != "trial_id"], prefix)
    if trial is None:
        source = sa.select(*(rows.c[c] for c in columns))
    else:
        source = sa.select(*(trial.c.trial_id if c == "trial_id" else rows.c[c] for c in columns)).select_from(trial.join(rows, sa.true()))
    stmt = postgresql.insert(table).from_select(list(columns), source)
    if upsert:
        stmt = stmt.on_conflict_do_update(index_elements=[table.c.trial_id, table.c.key], set_={"value_json": stmt.excluded.value_json})
    return stmt.cte(f"{prefix or table.name}_written")


_ATTR_COLUMNS = ("trial_id", "key", "value_json")


def _pop_query(study_id: int, heartbeat: bool) -> sa.CompoundSelect:
    """The pop (module docstring): ``("popped", None, None, number, trial_id)`` for the trial it
    moved to RUNNING (no row: none was left to pop), then `trial_rows` of that trial.
    Binds ``start`` and the ``user_keys``/``user_values`` to write."""
    oldest = (
        sa.select(_trials.c.trial_id)
        .where(_trials.c.study_id == study_id, _trials.c.state == TrialState.WAITING)
        .order_by(_trials.c.trial_id).limit(1).with_for_update(skip_locked=True).scalar_subquery()
    )
    popped = (
        sa.update(_trials)
        .where(_trials.c.trial_id == oldest, _trials.c.state == TrialState.WAITING)
        .values(state=TrialState.RUNNING, datetime_start=sa.bindparam("start", type_=_trials.c.datetime_start.type))
        .returning(_trials.c.trial_id, _trials.c.number)
        .cte("popped")
    )
    writes = [_insert_from(_user_attrs, _ATTR_COLUMNS, popped, "user_", upsert=True)]
    if heartbeat:  # the database's clock, as optuna's beats
        beat = sa.select(popped.c.trial_id, sa.func.current_timestamp())
        writes.append(postgresql.insert(_heartbeats).from_select(["trial_id", "heartbeat"], beat).cte("beat"))
    return sa.union_all(
        sa.select(sa.literal("popped"), sa.null(), sa.null(), sa.cast(popped.c.number, sa.Float), popped.c.trial_id),
        *trial_rows(popped.c.trial_id).selects,
    ).add_cte(*writes)


def _finish_query(study_id: int, count: bool = True) -> sa.CompoundSelect:
    """The finish (module docstring): the budget count's rows (``count``) and ``("finished",
    trial_id)`` when the trial was still RUNNING (else nothing was written). Binds ``trial``,
    ``state``, ``complete``, attribute arrays ``user_*``/``system_*`` and value arrays."""
    finished = (
        sa.update(_trials)
        .where(_trials.c.trial_id == sa.bindparam("trial"), _trials.c.state == TrialState.RUNNING)
        .values(state=sa.bindparam("state", type_=_trials.c.state.type),
                datetime_complete=sa.bindparam("complete", type_=_trials.c.datetime_complete.type))
        .returning(_trials.c.trial_id)
        .cte("finished")
    )
    writes = [
        _insert_from(_user_attrs, _ATTR_COLUMNS, finished, "user_", upsert=True),
        _insert_from(_system_attrs, _ATTR_COLUMNS, finished, "system_", upsert=True),
        _insert_from(_values, ("trial_id", "objective", "value", "value_type"), finished),
    ]
    return sa.union_all(
        *(count_query(study_id).selects if count else ()),
        sa.select(sa.literal("finished"), finished.c.trial_id, sa.null(), sa.null(), sa.null(), sa.null()),
    ).add_cte(*writes)


_NO_BUDGET = 2**31 - 1

_BUDGET_USED = """SELECT count(*) FROM trials AS t WHERE t.study_id = {sid} AND (t.state = 'RUNNING' OR (
    NOT EXISTS (SELECT 1 FROM trial_user_attributes AS u
                WHERE u.trial_id = t.trial_id AND u.key = 'interrupted' AND u.value_json = 'true')
    AND (t.state = 'COMPLETE' OR (t.state = 'FAIL' AND NOT EXISTS (
        SELECT 1 FROM trial_system_attributes AS h JOIN trials AS r ON r.trial_id = h.trial_id
        WHERE r.study_id = {sid} AND h.key = 'retry_history' AND CAST(h.value_json AS JSONB) @> to_jsonb(t.number))))))"""
"""``counted + running`` of `tally` (`counts_toward_budget` for every trial, plus the RUNNING
ones) in SQL: the first look of a worker's own claim."""


def _take_sql(study_id: int, heartbeat: bool, dialect: sa.Dialect) -> str:
    """A worker's own claim in one round trip (psycopg2 sends it as one query; PostgreSQL runs
    its statements in order): ``BEGIN``; the study's row locked (trial numbers are counted under
    it, as optuna's trial creation does, and claims of the study's workers are made one at a
    time); one statement that, if ``counted + running < budget`` (the first look,
    `_BUDGET_USED`, read after the lock: every claim committed before is seen), pops the oldest
    WAITING trial (when ``pop``) or else inserts a new one, and writes its ``worker`` attribute
    and first heartbeat; ``COMMIT``; then the budget count's rows (the second look, a statement
    of its own after the claim committed, as the budget rule requires) with
    ``("claimed", trial_id, number, None, queued)`` for the claimed trial, passed from the
    claim's statement in a session setting. Binds ``start``, ``pop``, ``budget`` and the
    ``user_key``/``user_value_json`` arrays."""
    sid = int(study_id)
    used = _BUDGET_USED.format(sid=sid)
    beat = (
        ",\n beat AS (INSERT INTO trial_heartbeats (trial_id, heartbeat) SELECT trial_id, current_timestamp FROM claimed)"
        if heartbeat else ""  # the database's clock, as optuna's beats
    )
    second_look = str(count_query(sid).compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    return f"""BEGIN;
SELECT study_id FROM studies WHERE study_id = {sid} FOR UPDATE;
WITH room AS (SELECT ({used}) < %(budget)s AS ok),
 popped AS (
    UPDATE trials SET state = 'RUNNING', datetime_start = %(start)s
    WHERE trial_id = (SELECT trial_id FROM trials WHERE study_id = {sid} AND state = 'WAITING'
                      ORDER BY trial_id LIMIT 1 FOR UPDATE SKIP LOCKED)
      AND state = 'WAITING' AND %(pop)s AND (SELECT ok FROM room)
    RETURNING trial_id, number),
 created AS (
    INSERT INTO trials (number, study_id, state, datetime_start)
    SELECT (SELECT count(*) FROM trials WHERE study_id = {sid}), {sid}, 'RUNNING', %(start)s
    WHERE (SELECT ok FROM room) AND NOT EXISTS (SELECT 1 FROM popped)
    RETURNING trial_id, number),
 claimed AS (SELECT trial_id, number, true AS queued FROM popped UNION ALL SELECT trial_id, number, false FROM created),
 attrs AS (
    INSERT INTO trial_user_attributes (trial_id, key, value_json)
    SELECT claimed.trial_id, a.key, a.value_json
    FROM claimed CROSS JOIN unnest(CAST(%(user_key)s AS VARCHAR[]), CAST(%(user_value_json)s AS TEXT[])) AS a (key, value_json)
    ON CONFLICT (trial_id, key) DO UPDATE SET value_json = excluded.value_json){beat}
SELECT set_config('evomerge.claimed', COALESCE((SELECT trial_id || ' ' || number || ' ' || queued FROM claimed), ''), false);
COMMIT;
{second_look}
UNION ALL SELECT 'claimed', CAST(c.v[1] AS INTEGER), CAST(c.v[2] AS INTEGER), NULL, c.v[3] = 'true', NULL
FROM (SELECT string_to_array(current_setting('evomerge.claimed', true), ' ') AS v) AS c WHERE c.v[1] IS NOT NULL"""


def trial_store(study: optuna.Study, storage: optuna.storages.BaseStorage) -> TrialStore:
    """The store for a worker's ledger: one statement per step on PostgreSQL, `RDBTrialStore` on
    SQLite, optuna's API otherwise (the journal file, other databases)."""
    if isinstance(storage, RDBStorage) and storage.engine.dialect.name == "postgresql":
        return PostgresTrialStore(study, storage)
    if isinstance(storage, RDBStorage) and storage.engine.dialect.name == "sqlite":
        return RDBTrialStore(study, storage)
    return TrialStore(study)
