"""`Ledger`: every trial of a run, kept in a plain Optuna study.

Using a study (not a format of our own) means resume is reopening it, optuna samplers run on it
natively, several machines can share one through a database URL, and ``optuna-dashboard <storage>``
opens any run. What a trial holds:

* ``params``: the genome, one float per `SearchSpace.names` entry (or a baseline's own params);
* ``values``: what the optimizer optimizes: the objective values in the run's directions, or one
  scalarized loss (``minimize``) when the run uses a `Scalarization`;
* ``user_attrs``: ``objectives`` (name -> value, always the raw values), ``recipe`` (JSON),
  ``details`` (per-task records, truncated to `MAX_DETAIL_ITEMS` per objective), ``timings``,
  ``failure`` (reason, FAIL trials only), ``constraints`` (optional), ``candidate`` (coordinator id,
  nevergrad and baselines) and ``interrupted`` (a trial cut off by a crash or a stop, re-queued);
* constraints also as optuna's ``Trial.set_constraint`` entries (feasible iff all <= 0), which
  optuna's constrained samplers and ``best_trials`` read.

The study's ``user_attrs`` hold the run metadata: objectives and directions, scalarization,
reference point, seed, space description and fingerprint. Reopening with a different space or
objectives raises instead of silently mixing incompatible trials.

Storage: a directory (-> ``<dir>/ledger.log``, Optuna's JournalStorage file), a ``.log`` /
``.journal`` file, a ``.db``/``.sqlite`` file (SQLite), or any Optuna storage URL. The journal is
the default because it is fast: one fsynced line per finished trial (~4 ms with 64 params),
where optuna's SQLite ORM path costs ~90 ms per trial, beyond the 2% overhead budget; lines
are fsynced once per ask batch (`_JournalFile`, `Ledger.sync`). Its lock
is an ``flock`` (released by the kernel when a killed process dies) and a torn last line from a
kill mid-append is cut at open. A ledger has one writer (the run loop): at open, RUNNING trials
are from a dead process. ``optuna-dashboard <dir>/ledger.log`` opens a journal run.

Several workers (`run_worker`, docs/scale-out.md) share one ledger through a database: opened with
``heartbeat=`` seconds, a database ledger gets optuna's trial heartbeats and a
`RetryFailedTrialCallback` (``max_retry=1``), so a RUNNING trial whose worker died is failed and
re-queued once; `finished` then leaves the failed attempt out of the budget.
"""

from __future__ import annotations

import json
import os
import sqlite3

try:
    import fcntl
except ImportError:  # Windows: optuna's own lock file
    fcntl = None  # type: ignore[assignment]
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping, Protocol, Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from ._pareto import Direction, ParetoArchive
from ._scalarize import Scalarization

MAX_DETAIL_ITEMS = 64
"""Per-task detail records kept per objective and trial: enough to read failures, small enough
that a 10k-trial SQLite ledger stays in the tens of megabytes."""

CONSTRAINTS_PREFIX = "constraints:"
"""optuna's system attribute prefix for one constraint value (what ``Trial.set_constraint`` writes)."""


class ObjectiveLike(Protocol):
    name: str
    direction: str


@dataclass(frozen=True)
class ObjectiveSpec:
    """Name and direction of one objective, as the ledger records it."""

    name: str
    direction: Direction


def resolve_storage(
    storage: str | os.PathLike[str], *, heartbeat: int | None = None
) -> tuple[str | optuna.storages.BaseStorage, Path | None]:
    """An Optuna storage for a path or URL, plus the run folder (None for remote databases).

    ``heartbeat`` (seconds) turns on optuna's trial heartbeats for database storages (the
    journal file has none; a refused combination rather than a silent lack of fault tolerance).
    """
    text = os.fspath(storage)
    if "://" in text:
        if text.startswith("sqlite:///"):
            path = Path(text[len("sqlite:///"):])
            path.parent.mkdir(parents=True, exist_ok=True)
            return _sqlite(path, heartbeat), path.parent
        if heartbeat is None:
            return text, None
        return _rdb(text, heartbeat, {}), None
    path = Path(text)
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        path.parent.mkdir(parents=True, exist_ok=True)
        return _sqlite(path, heartbeat), path.parent
    if heartbeat is not None:
        raise ValueError(f"{text}: trial heartbeats need a database storage (sqlite:///... or postgresql://...)")
    if path.suffix not in (".log", ".journal"):
        path.mkdir(parents=True, exist_ok=True)
        path = path / "ledger.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return _journal(path), path.parent


class _FlockLock(JournalFileOpenLock):
    """Journal lock held through ``flock``: the kernel drops it when its process dies, so a
    SIGKILLed run never leaves a stale lock behind (optuna's file locks wait out a grace period)."""

    def __init__(self, filepath: str) -> None:
        super().__init__(filepath)
        self._file: IO[bytes] | None = None  # opened once: a lock per append costs no open/close

    def acquire(self) -> bool:
        if self._file is None:
            self._file = open(self._lock_file, "ab")
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        return True

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)


class _JournalFile(JournalFileBackend):
    """optuna's journal file, fsynced once per ask batch instead of once per line.

    optuna fsyncs every append, and a native sampler's ``study.ask`` appends one line per
    parameter: 16 parameters cost 16 fsyncs (~50 ms here). Lines still reach the OS at once, so
    a killed process (SIGKILL, Ctrl-C) loses nothing. `sync` makes them durable against power
    loss; the run loop calls it after every ask and a coordinated optimizer before every
    checkpoint write, so after a machine restart the checkpoint is never ahead of the ledger, and
    lines lost since the last sync are trials whose candidates the checkpoint still holds as
    pending (re-evaluated). The file stays open (one ``write`` per append) and a read that finds
    it unchanged opens nothing: optuna's storage reads before every call.
    """

    def __init__(self, file_path: str, lock_obj: JournalFileOpenLock) -> None:
        super().__init__(file_path, lock_obj=lock_obj)
        # kept open: O_APPEND puts every write at the end whoever else appended meanwhile
        self._out = open(file_path, "ab", buffering=0)
        self._synced = -1  # size at the last fsync (none yet: a killed writer's lines may be unsynced)

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        # optuna's storage re-reads the file before every call (a native sampler makes a few per
        # parameter); when the file has not grown since the last read there is nothing to open
        if self._log_number_offset.get(log_number_from) == os.fstat(self._out.fileno()).st_size:
            return
        yield from super().read_logs(log_number_from)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = memoryview(("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8"))
        self._lock.acquire()
        try:
            while data:
                data = data[self._out.write(data):]
        finally:
            self._lock.release()

    def sync(self) -> None:
        """fsync the file, unless nothing was appended since the last one (the run loop and a
        checkpoint write may both ask for the same lines)."""
        size = os.fstat(self._out.fileno()).st_size
        if size != self._synced:
            os.fsync(self._out.fileno())
            self._synced = size


def _journal(path: Path) -> optuna.storages.JournalStorage:
    lock = _FlockLock(str(path)) if fcntl is not None else JournalFileOpenLock(str(path))
    if _torn(path):
        # A kill in the middle of an append leaves a torn last line; optuna would refuse the file
        # once a new line follows it: cut back to the last complete line. Checked again under
        # the append lock: a reader (`evomerge status` on a live run) must not cut a line that
        # its writer is appending right now.
        lock.acquire()
        try:
            if _torn(path):
                data = path.read_bytes()
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            lock.release()
    return optuna.storages.JournalStorage(_JournalFile(str(path), lock_obj=lock))


def _torn(path: Path) -> bool:
    """Whether the file's last line is incomplete (read from its end: a ledger grows large)."""
    if not path.exists() or not path.stat().st_size:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _sqlite(path: Path, heartbeat: int | None) -> optuna.storages.RDBStorage:
    # WAL: one fsync per commit instead of several, and readers (a dashboard) never block the run.
    # The mode is persistent in the file, so it is set once with the stdlib driver.
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    return _rdb(f"sqlite:///{path}", heartbeat, {"connect_args": {"timeout": 60}})


def _rdb(url: str, heartbeat: int | None, engine_kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    """optuna's RDB storage; with a heartbeat, a trial whose worker stops beating for two
    intervals is failed (by whichever worker looks next) and re-queued exactly once."""
    if heartbeat is None:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
        failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1),
    )


def _jsonable(value: Any) -> Any:
    """What a reader of the stored JSON gets back (floats, not numpy; lists, not tuples): the value
    itself when it is plain JSON already (the usual case, and a walk costs a fraction of the round
    trip through JSON: 256 detail records per trial), else that round trip."""
    return value if _is_plain_json(value) else json.loads(json.dumps(value, default=float))


_JSON_SCALARS = frozenset((str, float, int, bool, type(None)))


def _is_plain_json(value: Any) -> bool:
    """Only dicts with str keys, lists and JSON scalars, by exact type (numpy floats, enums,
    tuples are not: their JSON reads back as something else). Loops, not ``all`` over
    generators: half the time on the detail records."""
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or (type(item) not in _JSON_SCALARS and not _is_plain_json(item)):
                return False
        return True
    if kind is list:
        for item in value:
            if type(item) not in _JSON_SCALARS and not _is_plain_json(item):
                return False
        return True
    return kind in _JSON_SCALARS


class Ledger:
    """A run's trials and metadata in an Optuna study. See the module docstring for the layout."""

    def __init__(
        self,
        storage: str | os.PathLike[str],
        *,
        objectives: Sequence[ObjectiveLike],
        study_name: str = "evomerge",
        seed: int = 0,
        scalarization: Scalarization | None = None,
        reference_point: Sequence[float] | None = None,
        space: Mapping[str, Any] | None = None,
        heartbeat: int | None = None,
    ) -> None:
        self.objectives = [ObjectiveSpec(o.name, o.direction) for o in objectives]  # type: ignore[arg-type]
        if not self.objectives:
            raise ValueError("a ledger needs at least one objective")
        self.storage, self.run_dir = resolve_storage(storage, heartbeat=heartbeat)
        backend = getattr(self.storage, "_backend", None)
        self._sync: Callable[[], None] = backend.sync if isinstance(backend, _JournalFile) else (lambda: None)
        self.study_name = study_name
        self.scalarization = scalarization
        directions = ["minimize"] if scalarization is not None else [o.direction for o in self.objectives]
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(
            storage=self.storage, study_name=study_name, directions=directions, load_if_exists=True
        )
        meta = {
            "objectives": [{"name": o.name, "direction": o.direction} for o in self.objectives],
            "scalarization": None if scalarization is None else scalarization.to_dict(),
            "seed": int(seed),
            "space": None if space is None else _jsonable(dict(space)),
            "space_fingerprint": None if space is None else space.get("fingerprint"),
        }
        stored = self.study.user_attrs
        if "objectives" in stored:
            for key in ("objectives", "scalarization", "seed", "space_fingerprint"):
                if _jsonable(meta[key]) != stored.get(key):
                    raise ValueError(
                        f"ledger {study_name!r} was created with {key}={stored.get(key)!r}, "
                        f"this run has {meta[key]!r}; use a new run folder or study name"
                    )
            self.reference_point = stored.get("reference_point")
            if reference_point is not None and self.reference_point is not None and list(map(float, reference_point)) != self.reference_point:
                raise ValueError(f"ledger's reference point is {self.reference_point}, not {list(reference_point)}")
        else:
            # "objectives" last: it marks complete metadata, so a worker opening the study while
            # another creates it never compares against half-written attributes
            for key in sorted(meta, key=lambda k: k == "objectives"):
                self.study.set_user_attr(key, _jsonable(meta[key]))
            self._sync()
            self.reference_point = None
        if self.reference_point is None and reference_point is not None:
            self.record_reference_point(reference_point)

    # ------------------------------------------------------------------ metadata
    @property
    def seed(self) -> int:
        return int(self.study.user_attrs["seed"])

    @property
    def directions(self) -> list[Direction]:
        """Objective directions (not the study's, which is ``minimize`` under scalarization)."""
        return [o.direction for o in self.objectives]

    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]

    def record_reference_point(self, reference_point: Sequence[float]) -> None:
        """Fix the run's hypervolume reference point (once; later runs read it back).

        Durable with the next `sync` (the run loop's, once per batch), not at once: one fsync
        less on the critical path, and one lost to a power cut is recorded again the same way
        (the explicit point of the next open, or the one derived from the first feasible trial).
        """
        self.reference_point = [float(v) for v in reference_point]
        self.study.set_user_attr("reference_point", self.reference_point)

    def sync(self) -> None:
        """Make everything written so far durable against power loss (journal: one fsync, none if
        nothing was written since the last; other storages commit per write). A coordinated
        optimizer calls it before each checkpoint write, so a checkpoint never becomes durable
        ahead of the trials it has been told; the run loop once per ask batch. Thread-safe: the
        run loop calls it from its background writer (`search._durable`)."""
        self._sync()

    def checkpoint_path(self, suffix: str) -> Path:
        """Where an optimizer keeps its state (a JSON history) next to the ledger."""
        if self.run_dir is None:
            raise ValueError("this ledger lives in a remote database; give the optimizer an explicit checkpoint path")
        return self.run_dir / f"{self.study_name}.{suffix}"

    # ------------------------------------------------------------------ reading
    def trials(self, states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=None if states is None else tuple(states))

    def finished(self) -> list[FrozenTrial]:
        """Trials that count against the budget: completed, or failed by their evaluation
        (not those cut off by an interruption, nor stale trials failed by a heartbeat check and
        retried: both are re-queued and run again)."""
        trials = self.trials()
        retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
        return [
            t for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.FAIL)
            and not t.user_attrs.get("interrupted", False)
            and not (t.state == TrialState.FAIL and t.number in retried)
        ]

    def objective_values(self, trial: FrozenTrial) -> list[float] | None:
        """Raw objective values of a completed trial, in objective order (None if failed)."""
        if trial.state != TrialState.COMPLETE:
            return None
        stored = trial.user_attrs.get("objectives", {})
        return [float(stored[name]) for name in self.objective_names]

    @staticmethod
    def feasible(trial: FrozenTrial) -> bool:
        return all(c <= 0 for c in trial.user_attrs.get("constraints", ()))

    def archive(self) -> ParetoArchive:
        """The Pareto archive rebuilt from the ledger, in trial order (so resume restores history)."""
        archive = ParetoArchive(self.directions, self.reference_point)
        for trial in self.finished():
            archive.add(trial.number, self.objective_values(trial), feasible=self.feasible(trial))
        if archive.reference_point is not None and self.reference_point is None:
            self.record_reference_point(archive.reference_point)
        return archive

    # ------------------------------------------------------------------ writing
    def trial_attrs(
        self,
        *,
        recipe_json: str | None,
        values: Mapping[str, float] | None,
        details: Mapping[str, Sequence[Mapping[str, Any]]],
        timings: Mapping[str, float],
        failure: str | None,
        constraints: Sequence[float] | None,
        candidate: int | None,
    ) -> dict[str, Any]:
        """The user attributes of one finished trial (details truncated to `MAX_DETAIL_ITEMS`)."""
        attrs: dict[str, Any] = {"timings": _jsonable(dict(timings))}
        if recipe_json is not None:
            attrs["recipe"] = recipe_json
        if values is not None:
            attrs["objectives"] = {k: float(v) for k, v in values.items()}
        if details:
            attrs["details"] = _jsonable({k: list(v)[:MAX_DETAIL_ITEMS] for k, v in details.items()})
        if failure is not None:
            attrs["failure"] = failure
        if constraints is not None:
            attrs["constraints"] = [float(c) for c in constraints]
        if candidate is not None:
            attrs["candidate"] = int(candidate)
        return attrs

    def study_values(self, values: Mapping[str, float]) -> list[float]:
        """What the study stores as trial values: objective values, or the scalarized loss."""
        ordered = [float(values[name]) for name in self.objective_names]
        if self.scalarization is not None:
            return [self.scalarization(ordered, self.directions)]
        return ordered

    def add_finished(
        self,
        params: Mapping[str, Any],
        distributions: Mapping[str, BaseDistribution],
        attrs: Mapping[str, Any],
        values: Mapping[str, float] | None,
    ) -> int:
        """Write one finished trial in a single transaction (the coordinator path); returns its number."""
        state = TrialState.COMPLETE if values is not None else TrialState.FAIL
        system_attrs = {f"{CONSTRAINTS_PREFIX}{i}": c for i, c in enumerate(attrs.get("constraints", ()))}
        trial = optuna.trial.create_trial(
            state=state,
            params=dict(params),
            distributions=dict(distributions),
            values=None if values is None else self.study_values(values),
            user_attrs=dict(attrs),
            system_attrs=system_attrs,
        )
        # (create_trial validated it) study.add_trial does the same but does not return the number
        storage = self.study._storage
        trial_id = storage.create_new_trial(self.study._study_id, template_trial=trial)
        return storage.get_trial_number_from_id(trial_id)

    def finish_live(self, trial: optuna.trial.Trial, attrs: Mapping[str, Any], values: Mapping[str, float] | None) -> None:
        """Finish a trial an optuna sampler asked for (the native path)."""
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        for i, c in enumerate(attrs.get("constraints", ())):
            trial.set_constraint(str(i), c)
        if values is None:
            self.study.tell(trial, state=TrialState.FAIL)
        else:
            self.study.tell(trial, self.study_values(values))

    def fail_running(self, reason: str, *, worker: str | None = None) -> list[FrozenTrial]:
        """Mark trials left RUNNING (a dead or stopped process; only ``worker``'s when given) as
        interrupted failures and re-queue their params as WAITING, so they run again exactly
        once; returns them."""
        stale = [t for t in self.trials((TrialState.RUNNING,)) if worker is None or t.user_attrs.get("worker") == worker]
        for t in stale:
            self._interrupt(t, reason, requeue=True)
        self._sync()
        return stale

    def give_back(self, trial_id: int, reason: str, *, requeue: bool) -> None:
        """Undo a worker's claim: the trial is failed as interrupted (not counted) and, when it
        came from the queue (``requeue``), an identical copy goes back into it."""
        self._interrupt(self.study._storage.get_trial(trial_id), reason, requeue=requeue)

    def _interrupt(self, trial: FrozenTrial, reason: str, *, requeue: bool) -> None:
        storage = self.study._storage
        try:
            storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            storage.set_trial_user_attr(trial._trial_id, "failure", reason)
            if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                return
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # finished meanwhile (a heartbeat check failed and retried it): nothing to undo
        if requeue:
            # keep the candidate id (coordinated optimizers) and optuna's retry lineage
            user_attrs = {k: v for k, v in trial.user_attrs.items() if k in _REQUEUE_USER_ATTRS}
            system_attrs = {k: v for k, v in trial.system_attrs.items() if k in _REQUEUE_SYSTEM_ATTRS}
            self.study.add_trial(
                optuna.trial.create_trial(
                    state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
                    user_attrs={**user_attrs, "requeued_from": trial.number}, system_attrs=system_attrs,
                )
            )


_REQUEUE_USER_ATTRS = ("candidate",)
_REQUEUE_SYSTEM_ATTRS = ("failed_trial", "retry_history", "fixed_params")
