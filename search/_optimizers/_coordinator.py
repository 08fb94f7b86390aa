"""Coordinator for optimizers whose state lives outside the study (nevergrad, the baselines).

The state is data, never code: a JSON *history* of integers (``-n``: n new candidates asked;
``k >= 0``: candidate k told), plus the optimizer's name, budget and batch size. Resume replays it
into a fresh backend of the same seed with every result taken from the ledger, checking each
replayed candidate against the ledger's genome: nothing stored is unpickled or trusted, and a
deterministic backend continues the uninterrupted run's ask/tell sequence. Crash safety:

1. Every ``ask`` batch ends with the history written atomically (`evomerge.merge.write_atomic`),
   so a candidate is in the history before it is enqueued (`search._queue`).
2. A finished trial reaches the ledger before the optimizer is told, and every history write
   starts with a ledger fsync (`Ledger.sync`): the ledger is never behind the optimizer, also
   after a power loss. A tell is written with the next ask (or `save`); a crash before that is
   repaired by rule 3 from the ledger.
3. On ``bind``: the history is replayed, finished ledger trials it has not told are told, and
   pending candidates with no finished trial are re-queued; the next ``ask`` hands out those
   alone (the rest of the interrupted batch), so each candidate is evaluated to completion once.

A missing or unusable history (deleted, a pickle) is rebuilt from the ledger alone, asking each
candidate just before its result is told in ledger order: exact for one candidate per ask (the
single-process loop); otherwise the genome check decides, and a `ResumeError` says when it fails.
"""

from __future__ import annotations

import json
import math
import os
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from optuna.distributions import BaseDistribution

from evomerge.merge import write_atomic

from .._scalarize import to_losses
from ._base import Candidate, Failure, Optimizer, Result, trial_result

if TYPE_CHECKING:
    from collections.abc import Sequence

    from optuna.trial import FrozenTrial

    from .._ledger import Ledger
    from .._space import SearchSpace


@dataclass
class Proposal:
    """What a backend proposes: params, and the genome when they are one (`Candidate`)."""

    params: dict[str, Any]
    distributions: dict[str, BaseDistribution]
    x: np.ndarray | None = None


HISTORY_FORMAT = "evomerge.coordinator-history/1"
"""Tag of the stored history (JSON); anything else in the store is ignored, never loaded."""


class ResumeError(RuntimeError):
    """Neither the stored history nor the ledger alone rebuilds the optimizer (one-line message)."""


class _Unusable(Exception):
    """One way of rebuilding the backend failed (the reason is tried next to the other's)."""


@runtime_checkable
class CheckpointStore(Protocol):
    """Where a coordinator's history lives (JSON bytes): a file next to the ledger, or (several
    machines) a row in the study's database guarded by the coordinator lease (`search.scaleout`)."""

    def read(self) -> bytes | None:
        """The last history, or None when there is none yet."""

    def write(self, data: bytes) -> None:
        """Replace the history atomically (a crash leaves the old or the new one)."""


class FileCheckpoint:
    """A checkpoint file, replaced atomically (`write_atomic`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def read(self) -> bytes | None:
        return self.path.read_bytes() if self.path.exists() else None

    def write(self, data: bytes) -> None:
        write_atomic(self.path, data)

    def __str__(self) -> str:
        return str(self.path)


class CoordinatedOptimizer(Optimizer):
    """Base for backends driven through ask/tell, rebuilt by replay (see module docstring)."""

    def __init__(self, *, checkpoint: str | os.PathLike[str] | CheckpointStore | None = None) -> None:
        self._checkpoint_arg: CheckpointStore | None = (
            checkpoint if checkpoint is None or isinstance(checkpoint, CheckpointStore) else FileCheckpoint(checkpoint)
        )
        self._pending: dict[int, tuple[Any, Proposal]] = {}
        self._told: set[int] = set()
        self._next_id = 0
        self._requeue: list[int] = []
        self._events: list[int] = []
        self._started_with: tuple[int | None, int] = (None, 1)
        self._backend: Any = None
        self._dirty = False

    # ---------------------------------------------------------------- backend hooks
    @abstractmethod
    def _start(self, space: "SearchSpace", seed: int, budget: int | None, batch_size: int) -> Any:
        """A fresh backend (seeded)."""

    @abstractmethod
    def _propose(self, space: "SearchSpace") -> tuple[Any, Proposal] | None:
        """One new (token, proposal) from the backend, or None when it has nothing left."""

    @abstractmethod
    def _observe(self, token: Any, losses: np.ndarray | None) -> None:
        """Tell the backend: ``losses`` (one per optimized value; lower is better) or None (failure)."""

    # ---------------------------------------------------------------- interface
    def ask_distributions(self, space: "SearchSpace") -> dict[str, BaseDistribution]:
        """None: the queued trials carry their params (`search._queue`)."""
        return {}

    def bind(
        self, space: "SearchSpace", ledger: "Ledger", *, budget: int | None = None, batch_size: int = 1,
        finished: "Sequence[FrozenTrial] | None" = None,
    ) -> None:
        """Rebuild (or start) the backend by replay and reconcile it with the ledger (rule 3);
        ``finished``: the trials to reconcile with (default ``ledger.finished()``), the queue's
        snapshot (`search._queue.CandidateQueue`)."""
        self._space, self._ledger = space, ledger
        self._path = self._checkpoint_arg or FileCheckpoint(ledger.checkpoint_path("optimizer.json"))
        by_candidate = {
            int(t.user_attrs["candidate"]): t
            for t in (ledger.finished() if finished is None else finished) if "candidate" in t.user_attrs
        }
        history, why_not = self._read_history()
        reasons: list[str] = [] if why_not is None else [why_not]
        rebuilt_from_history = False
        if history is not None:
            try:
                self._restart(space, history["budget"], history["batch_size"])
                self._replay_history(history["events"], by_candidate)
                rebuilt_from_history = True
            except _Unusable as exc:
                reasons.append(f"its history: {exc}")
        if not rebuilt_from_history:
            try:
                self._restart(space, budget, batch_size)
                self._replay_ledger(by_candidate)
            except _Unusable as exc:
                raise ResumeError(
                    f"cannot rebuild optimizer {self.name} of study {ledger.study_name!r} from {self._path} "
                    f"({'; '.join(reasons) or 'none stored'}) nor from the ledger alone ({exc}); restore the "
                    "history file or start a new run"
                ) from None
        reconciled = False
        for cid in sorted(by_candidate):
            if cid in self._told:
                continue
            if cid not in self._pending:
                raise ResumeError(f"ledger trial {by_candidate[cid].number} holds candidate {cid}, which {self._path} never asked")
            self._tell_trial(cid, by_candidate[cid])
            reconciled = True
        self._requeue = sorted(cid for cid in self._pending if cid not in by_candidate)
        if reconciled or not rebuilt_from_history:
            self.save()
        else:
            self._dirty = False

    # ---------------------------------------------------------------- rebuilding
    def _read_history(self) -> tuple[dict[str, Any] | None, str | None]:
        """The stored history if it is ours and well-formed, else (None, why not). Only JSON is
        ever parsed: a store holding anything else (a pickle from an older version, a planted
        file) is ignored, never loaded."""
        stored = self._path.read()
        if stored is None:
            return None, None
        try:
            data = json.loads(stored.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None, f"{self._path} is not a JSON history"
        ok = (
            isinstance(data, dict) and data.get("format") == HISTORY_FORMAT
            and isinstance(data.get("events"), list) and all(type(e) is int for e in data["events"])
            and (data.get("budget") is None or type(data.get("budget")) is int) and type(data.get("batch_size")) is int
        )
        if not ok:
            return None, f"{self._path} is not a coordinator history ({HISTORY_FORMAT})"
        if data.get("name") != self.name:
            return None, f"{self._path} belongs to optimizer {data.get('name')!r}, not {self.name!r}"
        return data, None

    def _restart(self, space: "SearchSpace", budget: int | None, batch_size: int) -> None:
        """A fresh backend of the run's seed and an empty history."""
        self._pending, self._told, self._next_id, self._events = {}, set(), 0, []
        self._started_with = (budget, batch_size)
        self._backend = self._start(space, self._ledger.seed, budget, batch_size)

    def _replay_history(self, events: list[int], by_candidate: dict[int, "FrozenTrial"]) -> None:
        for event in events:
            if event < 0:
                for _ in range(-event):
                    self._ask_checked(by_candidate)
            elif event in self._pending and event in by_candidate:
                self._tell_trial(event, by_candidate[event])
            else:
                raise _Unusable(f"it tells candidate {event}, which the ledger has not finished")

    def _replay_ledger(self, by_candidate: dict[int, "FrozenTrial"]) -> None:
        """Each candidate asked just before its result is told, results in ledger order; then the
        candidates the study holds unfinished (queued, running, cut off) are asked too, so that
        they stay in flight instead of their ids going to new candidates beside them."""
        for trial in sorted(by_candidate.values(), key=lambda t: t.number):
            cid = int(trial.user_attrs["candidate"])
            while self._next_id <= cid:
                self._ask_checked(by_candidate)
            if cid in self._pending:
                self._tell_trial(cid, trial)
        attempted = {int(t.user_attrs["candidate"]): t for t in self._ledger.trials() if "candidate" in t.user_attrs}
        while self._next_id <= max(attempted, default=-1):
            self._ask_checked(attempted)

    def _ask_checked(self, known: dict[int, "FrozenTrial"]) -> None:
        """Ask one candidate and check it against the ledger's genome for it, if ``known``."""
        cid = self._ask_one()
        if cid is None:
            raise _Unusable(f"the optimizer has no candidate {self._next_id}")
        trial = known.get(cid)
        if trial is not None and not _same_params(self._pending[cid][1].params, trial.params):
            raise _Unusable(f"candidate {cid} differs from ledger trial {trial.number}'s genome")

    def _tell_trial(self, cid: int, trial: "FrozenTrial") -> None:
        self._tell_backend(cid, trial_result(self._ledger, trial))

    def ask(self, n: int) -> list[Candidate]:
        out: list[Candidate] = []
        if self._requeue:
            # the rest of the batch a crash interrupted, alone: asking new candidates before these
            # are told would show the backend a different history than an uninterrupted run
            while self._requeue and len(out) < n:
                out.append(self.candidate(self._requeue.pop(0)))
            return out
        while len(out) < n:
            cid = self._ask_one()
            if cid is None:
                break
            out.append(self.candidate(cid))
        if self._dirty:
            self.save()
        return out

    def tell(self, candidate: Candidate, result: Result) -> None:
        self._tell_backend(candidate.key, result)

    def save(self) -> None:
        budget, batch_size = self._started_with
        state = {"format": HISTORY_FORMAT, "name": self.name, "budget": budget, "batch_size": batch_size, "events": self._events}
        self._ledger.sync()  # rule 2: the trials this state has been told are durable first
        self._path.write(json.dumps(state, separators=(",", ":")).encode("utf-8"))
        self._dirty = False

    def use_checkpoint(self, store: CheckpointStore) -> None:
        """Keep the checkpoint in ``store`` (call before ``bind``): a coordinator lease's row."""
        self._checkpoint_arg = store

    @property
    def pending_keys(self) -> set[int]:
        """Ids of candidates asked but not told yet."""
        return set(self._pending)

    def outstanding(self) -> list[Candidate]:
        """Every candidate asked but not told; the caller (`search._queue`, after ``bind``) takes
        over re-queueing them, instead of ``ask`` handing them out first."""
        self._requeue = []
        return [self.candidate(cid) for cid in sorted(self._pending)]

    # ---------------------------------------------------------------- helpers
    def candidate(self, cid: int) -> Candidate:
        _, proposal = self._pending[cid]
        return Candidate(key=cid, params=dict(proposal.params), distributions=dict(proposal.distributions),
                         x=None if proposal.x is None else proposal.x.copy())

    def _ask_one(self) -> int | None:
        """One new candidate from the backend, recorded in the history; None when it has none."""
        proposed = self._propose(self._space)
        if proposed is None:
            return None
        cid, self._next_id = self._next_id, self._next_id + 1
        self._pending[cid] = proposed
        if self._events and self._events[-1] < 0:
            self._events[-1] -= 1
        else:
            self._events.append(-1)
        self._dirty = True
        return cid

    def _tell_backend(self, cid: int, result: Result) -> None:
        token, _ = self._pending.pop(cid)
        if isinstance(result, Failure):
            losses = None
        else:
            ledger = self._ledger
            if ledger.scalarization is not None:
                losses = np.array([ledger.scalarization(list(result), ledger.directions)])
            else:
                losses = to_losses(result, ledger.directions)
        self._observe(token, losses)
        self._told.add(cid)
        self._events.append(cid)
        self._dirty = True


def _same_params(proposed: dict[str, Any], stored: dict[str, Any]) -> bool:
    """Whether a replayed candidate is the one the ledger recorded (floats as stored, to 1e-9)."""
    return proposed.keys() == stored.keys() and all(
        value == stored[name] if isinstance(value, str) or isinstance(stored[name], str)
        else math.isclose(float(value), float(stored[name]), rel_tol=1e-9, abs_tol=1e-12)
        for name, value in proposed.items()
    )
