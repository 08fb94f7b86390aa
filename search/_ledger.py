"""`Ledger`: every trial of a run, kept in a plain Optuna study.

Using a study (not a format of our own) means resume is reopening it, optuna samplers run on it
natively, several machines can share one through a database URL, and ``optuna-dashboard <storage>``
opens any run. Everything goes through optuna's public API. What a trial and the study hold, and
which storage a location names, are listed in docs/search.md ("The ledger"); reopening with a
different space or objectives raises instead of silently mixing incompatible trials.

**What counts** against the budget (`counted`): a COMPLETE trial, or a FAIL trial with a
``failure`` (its evaluation failed) that nothing re-runs. A trial cut off by a stop, a crash or a
give-back, or failed by a heartbeat check, carries no failure of its own and is re-run (a
``requeued_from`` copy, or optuna's retry listing it in ``retry_history``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._fidelity import FIDELITY_ATTR, full_fidelity
from ._journal import JournalFile, LedgerError
from ._pareto import Direction, ParetoArchive
from ._scalarize import Scalarization

MAX_DETAIL_ITEMS = 64
"""Per-task detail records kept per objective and trial: enough to read failures, small enough
that a 10k-trial SQLite ledger stays in the tens of megabytes."""

MAX_RETRY = 1
"""How often optuna's heartbeat retry re-queues a trial whose worker died."""


class ObjectiveLike(Protocol):
    name: str
    direction: str


@dataclass(frozen=True)
class ObjectiveSpec:
    """Name and direction of one objective, as the ledger records it."""

    name: str
    direction: Direction


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the ledger stores it: what callbacks, exports and reports read."""

    number: int
    state: str
    """complete | failed | interrupted (cut off and re-run, not counted) | running | waiting"""
    values: dict[str, float]
    """raw objective values (complete trials)"""
    params: dict[str, Any]
    recipe: dict[str, Any] | None
    timings: dict[str, float]
    failure: str | None = None
    feasible: bool = True
    candidate: int | None = None
    details: dict[str, Any] = field(default_factory=dict, repr=False)
    constraints: list[float] | None = None
    fidelity: dict[str, Any] | None = None
    """Multi-fidelity runs: the rung this trial reached (`search._fidelity`); None without rungs."""


@dataclass(frozen=True)
class Counts:
    """One look at the study for the budget rule: counted trials, RUNNING ones (numbers), WAITING ones."""

    counted: int
    running: frozenset[int]
    waiting: int


def rerun_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of trials something re-runs: a ``requeued_from`` copy or optuna's heartbeat retry."""
    out = {int(t.user_attrs["requeued_from"]) for t in trials if t.user_attrs.get("requeued_from") is not None}
    return out | {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def counted(trial: FrozenTrial, rerun: set[int]) -> bool:
    """Whether ``trial`` counts against the budget (module docstring); ``rerun``: `rerun_numbers`."""
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("failure") is not None and trial.number not in rerun


def storage_for(
    location: str | os.PathLike[str], *, heartbeat: int | None = None, read_only: bool = False
) -> tuple[optuna.storages.BaseStorage | str, Path | None]:
    """An Optuna storage for a path or URL, plus the run folder (None for remote databases).
    ``heartbeat`` (seconds) turns on optuna's trial heartbeats and stale-trial retry (`_database`);
    a journal file has none, so it refuses one rather than silently lack the fault tolerance.
    ``read_only``: for a reader that must leave a local ledger file as it found it (no torn
    line cut, no SQLite mode set, no folder made)."""
    storage, run_dir, _ = _open(location, heartbeat, read_only)
    return storage, run_dir


def _open(
    location: str | os.PathLike[str], heartbeat: int | None, read_only: bool = False
) -> tuple[optuna.storages.BaseStorage | str, Path | None, JournalFile | None]:
    """`storage_for`, plus the journal file behind the storage (None for databases)."""
    text = os.fspath(location)
    if "://" in text:
        if text.startswith("sqlite:///"):
            path = Path(text[len("sqlite:///"):])
            return _sqlite(path, heartbeat, read_only), path.parent, None
        return (text if heartbeat is None else _database(text, heartbeat, {})), None, None
    path = Path(text)
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        return _sqlite(path, heartbeat, read_only), path.parent, None
    if heartbeat is not None:
        raise ValueError(f"{text}: trial heartbeats need a database storage (sqlite:///... or postgresql://...)")
    if path.suffix not in (".log", ".journal"):
        path = path / "ledger.log"
    journal = JournalFile(path, read_only=read_only)
    return optuna.storages.JournalStorage(journal), path.parent, journal


def _sqlite(path: Path, heartbeat: int | None, read_only: bool = False) -> optuna.storages.RDBStorage:
    # WAL: one fsync per commit instead of several, and readers (a dashboard) never block the run.
    # The mode is persistent in the file, so it is set once with the stdlib driver.
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    return _database(f"sqlite:///{path}", heartbeat, {"connect_args": {"timeout": 60}})


def _database(url: str, heartbeat: int | None, engine_kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    """optuna's RDB storage; with a heartbeat, a trial silent for two intervals is failed (by the
    next worker's stale check, `search.scaleout.Crew`) and re-queued by optuna (`MAX_RETRY` times)."""
    if heartbeat is None:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    with warnings.catch_warnings():
        # heartbeats and their retry callback are "experimental" in optuna's API sense
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
        )


def _jsonable(value: Any) -> Any:
    """What a reader of the stored JSON gets back (floats, not numpy; lists, not tuples): the value
    itself when it is plain JSON already (the usual case; the walk costs a fraction of the round
    trip of 256 detail records per trial), else that round trip."""
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
        self.storage, self.run_dir, self._journal = _open(storage, heartbeat)
        self.heartbeat = heartbeat
        self.study_name = study_name
        self.scalarization = scalarization
        directions = ["minimize"] if scalarization is not None else [o.direction for o in self.objectives]
        if study_name in optuna.study.get_all_study_names(self.storage):  # a resume: nothing appended
            self.study = optuna.load_study(study_name=study_name, storage=self.storage)
        else:
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
                    raise LedgerError(
                        f"the ledger's stage {study_name!r} was recorded with {key} {stored.get(key)!r}, the spec now gives "
                        f"{_jsonable(meta[key])!r}; a resume continues the same search: undo the spec's change, or start a new run folder"
                    )
            self.reference_point = stored.get("reference_point")
            if reference_point is not None and self.reference_point is not None and list(map(float, reference_point)) != self.reference_point:
                raise LedgerError(f"the ledger's reference point is {self.reference_point}, not {list(reference_point)}")
        else:
            # "objectives" last: it marks complete metadata, so a worker opening the study while
            # another creates it never compares against half-written attributes
            for key in sorted(meta, key=lambda k: k == "objectives"):
                self.study.set_user_attr(key, _jsonable(meta[key]))
            self.sync()
            self.reference_point = None
        if self.reference_point is None and reference_point is not None:
            self.record_reference_point(reference_point)
        # optuna's metric names: what optuna-dashboard and optuna's plots label axes with (else "Objective 0..n")
        names = [o.name for o in self.objectives] if self.scalarization is None else [f"{self.scalarization.kind} loss"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # experimental in optuna's API sense
            if self.study.metric_names != names:
                self.study.set_metric_names(names)

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
        """Fix the run's hypervolume reference point (once; later runs read it back)."""
        self.reference_point = [float(v) for v in reference_point]
        self.study.set_user_attr("reference_point", self.reference_point)

    def sync(self) -> None:
        """Make everything written so far durable against power loss (journal: one fsync, none if
        nothing was written since; databases commit per write): the run loop calls it once per
        finished trial, a coordinated optimizer before each checkpoint write."""
        if self._journal is not None:
            self._journal.sync()

    def checkpoint_path(self, suffix: str) -> Path:
        """Where an optimizer keeps its state (a JSON history) next to the ledger."""
        if self.run_dir is None:
            raise ValueError("this ledger lives in a remote database; give the optimizer an explicit checkpoint path")
        return self.run_dir / f"{self.study_name}.{suffix}"

    # ------------------------------------------------------------------ reading
    def trials(self, states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=None if states is None else tuple(states))

    def finished(self, trials: Sequence[FrozenTrial] | None = None) -> list[FrozenTrial]:
        """Trials that count against the budget (module docstring), of ``trials`` (default: a fresh read)."""
        trials = self.trials() if trials is None else trials
        rerun = rerun_numbers(trials)
        return [t for t in trials if counted(t, rerun)]

    def counts(self, trials: Sequence[FrozenTrial] | None = None) -> Counts:
        """One look at the study for the budget rule (`search._loop`), of ``trials`` (default: a fresh read)."""
        trials = self.trials() if trials is None else trials
        return Counts(
            counted=len(self.finished(trials)),
            running=frozenset(t.number for t in trials if t.state == TrialState.RUNNING),
            waiting=sum(1 for t in trials if t.state == TrialState.WAITING),
        )

    def objective_values(self, trial: FrozenTrial) -> list[float] | None:
        """Raw objective values of a completed trial, in objective order (None if failed)."""
        if trial.state != TrialState.COMPLETE:
            return None
        stored = trial.user_attrs.get("objectives", {})
        return [float(stored[name]) for name in self.objective_names]

    @staticmethod
    def feasible(trial: FrozenTrial) -> bool:
        return all(c <= 0 for c in trial.user_attrs.get("constraints") or ())

    @classmethod
    def eligible(cls, trial: FrozenTrial) -> bool:
        """Whether a finished trial may enter the front or be named a stage's best: feasible, and
        scored at the top fidelity (a low rung's few items are too noisy)."""
        return cls.feasible(trial) and full_fidelity(trial.user_attrs.get(FIDELITY_ATTR))

    def archive(self) -> ParetoArchive:
        """The Pareto archive rebuilt from the ledger, in trial order (so resume restores history)."""
        archive = ParetoArchive(self.directions, self.reference_point)
        for trial in self.finished():
            archive.add(trial.number, self.objective_values(trial), feasible=self.eligible(trial))
        if archive.reference_point is not None and self.reference_point is None:
            self.record_reference_point(archive.reference_point)
        return archive

    def records(self) -> list[TrialRecord]:
        """Every trial as a `TrialRecord` (interrupted attempts included, marked as such)."""
        return read_records(self.study)

    # ------------------------------------------------------------------ writing
    def finish(
        self, trial: optuna.Trial, *, recipe_json: str, values: Mapping[str, float] | None,
        details: Mapping[str, Sequence[Mapping[str, Any]]], timings: Mapping[str, float], failure: str | None,
        constraints: Sequence[float] | None, fidelity: Mapping[str, Any] | None = None,
    ) -> None:
        """Write a claimed trial's attributes (details truncated to `MAX_DETAIL_ITEMS`; ``failure``
        always, None on success: a re-run copies its attempt's attributes) and constraints, then
        tell the study (COMPLETE with ``values``, else FAIL): the tell comes last, so a finished
        trial is complete in the ledger."""
        attrs: dict[str, Any] = {"timings": _jsonable(dict(timings)), "failure": failure, "recipe": recipe_json}
        if values is not None:
            attrs["objectives"] = {k: float(v) for k, v in values.items()}
        if details:
            attrs["details"] = _jsonable({k: list(v)[:MAX_DETAIL_ITEMS] for k, v in details.items()})
        if constraints is not None:
            attrs["constraints"] = [float(c) for c in constraints]
        if fidelity is not None:
            attrs[FIDELITY_ATTR] = fidelity
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        for i, c in enumerate(attrs.get("constraints") or ()):
            trial.set_constraint(str(i), c)
        if values is None:
            self.study.tell(trial, state=TrialState.FAIL)
            return
        ordered = [float(values[name]) for name in self.objective_names]  # the study's values: these, or one scalarized loss
        self.study.tell(trial, ordered if self.scalarization is None else [self.scalarization(ordered, self.directions)])

    def give_back(self, trial: optuna.Trial, reason: str, *, requeue: bool) -> None:
        """Undo a claim: the trial fails as ``interrupted`` (not counted), then (``requeue``) a copy
        of it goes back into the queue. In that order: a worker dying in between leaves a candidate that
        nothing re-runs (a coordinator re-queues it after its grace, `search._queue`), never one
        that two mechanisms re-run (optuna's heartbeat retry would re-queue a RUNNING trial too)."""
        trial.set_user_attr("interrupted", reason)
        self.study.tell(trial, state=TrialState.FAIL)
        if requeue:
            self.requeue(self.study.get_trials(deepcopy=False)[trial.number])

    def fail_running(self) -> list[FrozenTrial]:
        """Re-queue, then fail, the trials left RUNNING by a dead or stopped process, so they run
        again exactly once; returns them. Only for a ledger with one writer (no heartbeat): there,
        a RUNNING trial at open belongs to no live process."""
        stale = self.trials((TrialState.RUNNING,))
        requeued = {t.user_attrs.get("requeued_from") for t in self.trials((TrialState.WAITING,))}
        for t in stale:
            if t.number not in requeued:  # else a crash cut off the tell after the re-queue
                self.requeue(t)
            self.study.tell(t.number, state=TrialState.FAIL)
        self.sync()
        return stale

    def requeue(self, trial: FrozenTrial, *, system_attrs: Mapping[str, Any] | None = None) -> None:
        """A WAITING copy of ``trial`` (its params, candidate id and retry lineage) marked
        ``requeued_from`` it, so the study's next ``ask`` hands it out again."""
        user_attrs = {k: trial.user_attrs[k] for k in ("candidate",) if k in trial.user_attrs}
        lineage = {k: v for k, v in trial.system_attrs.items() if k in ("failed_trial", "retry_history")}
        self.enqueue(trial.params, trial.distributions, {**user_attrs, "requeued_from": trial.number},
                     {**lineage, **(system_attrs or {})})

    def enqueue(
        self, params: Mapping[str, Any], distributions: Mapping[str, Any], user_attrs: Mapping[str, Any],
        system_attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """A WAITING trial with these params (one write), which the study's next ``ask`` hands out."""
        self.study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=dict(params), distributions=dict(distributions),
            user_attrs=dict(user_attrs), system_attrs=dict(system_attrs or {}),
        ))


def read_records(study: optuna.Study) -> list[TrialRecord]:
    """Every trial of any ledger's study as a `TrialRecord`, read through optuna alone (no
    `Ledger`: ``evomerge status`` polls a run another process is writing)."""
    trials = study.get_trials(deepcopy=False)
    rerun = rerun_numbers(trials)
    return [record(t, rerun) for t in trials]


def record(trial: FrozenTrial, rerun: set[int]) -> TrialRecord:
    """A trial of the study as a `TrialRecord`; ``rerun``: `rerun_numbers` of its study."""
    attrs = trial.user_attrs
    if trial.state in (TrialState.COMPLETE, TrialState.FAIL):
        state = "complete" if trial.state == TrialState.COMPLETE else "failed" if counted(trial, rerun) else "interrupted"
    else:
        state = trial.state.name.lower()
    recipe = attrs.get("recipe")
    return TrialRecord(
        number=trial.number, state=state,
        values=dict(attrs.get("objectives") or {}) if trial.state == TrialState.COMPLETE else {},
        params=dict(trial.params), recipe=json.loads(recipe) if recipe else None,
        timings=dict(attrs.get("timings") or {}),
        failure=attrs.get("interrupted") if state == "interrupted" else attrs.get("failure"),
        feasible=Ledger.feasible(trial), candidate=attrs.get("candidate"), details=dict(attrs.get("details") or {}),
        constraints=attrs.get("constraints"), fidelity=attrs.get("fidelity"),
    )
