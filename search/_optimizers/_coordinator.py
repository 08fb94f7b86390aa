"""Coordinator for optimizers whose state lives outside the study (nevergrad, the baselines).

Crash safety rests on three rules:

1. Every ``ask`` batch ends with the whole state (backend optimizer, candidates asked but not
   told, ids told) pickled atomically: temp file, fsync, ``os.replace``, directory fsync. A
   candidate thus exists in the checkpoint before it is enqueued (`search._queue`), hence
   before its result reaches the ledger.
2. A finished trial reaches the ledger (one append, with its candidate id) *before* the
   optimizer is told, so the ledger is never behind the optimizer; every checkpoint write
   starts with a ledger fsync (`Ledger.sync`), so that also holds for what survives a power loss.
   The tell itself is not checkpointed on its own: the next ask's checkpoint includes it, and if
   the process dies first, rule 3 replays it from the ledger with the same values. Durability
   thus costs three fsyncs per ask batch (ledger, checkpoint file, its directory); `save` also
   runs when a run stops.
3. On ``bind`` (resume): finished ledger trials the checkpoint has not told are told now; pending
   candidates with no finished trial are re-queued, and the next ``ask`` hands out those alone
   (the rest of the interrupted batch). Every candidate is evaluated to completion exactly once,
   and a deterministic backend sees the same ask/tell sequence as an uninterrupted run.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from optuna.distributions import BaseDistribution

from evomerge.merge import MergeRecipe

from .._scalarize import to_losses
from ._base import Candidate, Failure, Optimizer, Result

if TYPE_CHECKING:
    from collections.abc import Sequence

    from optuna.trial import FrozenTrial

    from .._ledger import Ledger
    from .._space import SearchSpace


@dataclass
class Proposal:
    """What a backend proposes: a genome, or (for generators outside the space) a recipe."""

    params: dict[str, Any]
    distributions: dict[str, BaseDistribution]
    x: np.ndarray | None = None
    recipe: MergeRecipe | None = None


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable across a machine restart
    finally:
        os.close(dir_fd)


@runtime_checkable
class CheckpointStore(Protocol):
    """Where a coordinator's pickle lives: a file next to the ledger, or (several machines) a
    row in the study's database guarded by the coordinator lease (`search.scaleout`)."""

    def read(self) -> bytes | None:
        """The last checkpoint, or None when there is none yet."""

    def write(self, data: bytes) -> None:
        """Replace the checkpoint atomically (a crash leaves the old or the new one)."""


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
    """Base for backends driven through ask/tell with a pickled state (see module docstring)."""

    def __init__(self, *, checkpoint: str | os.PathLike[str] | CheckpointStore | None = None) -> None:
        self._checkpoint_arg: CheckpointStore | None = (
            checkpoint if checkpoint is None or isinstance(checkpoint, CheckpointStore) else FileCheckpoint(checkpoint)
        )
        self._pending: dict[int, tuple[Any, Proposal]] = {}
        self._told: set[int] = set()
        self._next_id = 0
        self._requeue: list[int] = []
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
        """Restore (or start) the backend and reconcile it with the ledger (rule 3).

        ``finished``: the trials to reconcile with, instead of ``ledger.finished()``; a multi-worker
        coordinator passes the final ones of the same snapshot it re-queues from
        (`search._queue.CandidateQueue`)."""
        self._space, self._ledger = space, ledger
        self._path = self._checkpoint_arg or FileCheckpoint(ledger.checkpoint_path("optimizer.pkl"))
        finished = {
            int(t.user_attrs["candidate"]): t
            for t in (ledger.finished() if finished is None else finished) if "candidate" in t.user_attrs
        }
        stored = self._path.read()
        if stored is not None:
            state = pickle.loads(stored)
            if state["name"] != self.name:
                raise ValueError(f"checkpoint {self._path} belongs to optimizer {state['name']!r}, not {self.name!r}")
            self._backend, self._pending, self._told, self._next_id = (
                state["backend"], state["pending"], state["told"], state["next_id"],
            )
        elif finished:
            raise RuntimeError(
                f"the ledger holds {len(finished)} coordinated trials but the optimizer checkpoint "
                f"{self._path} is missing; restore it or start a new run"
            )
        else:
            self._backend = self._start(space, ledger.seed, budget, batch_size)
        reconciled = False
        for cid in sorted(finished):
            if cid in self._told:
                continue
            if cid not in self._pending:
                raise RuntimeError(f"ledger trial with candidate {cid} is unknown to the checkpoint {self._path}")
            trial = finished[cid]
            values = ledger.objective_values(trial)
            self._tell_backend(cid, Failure(trial.user_attrs.get("failure", "failed")) if values is None else values)
            reconciled = True
        self._requeue = sorted(cid for cid in self._pending if cid not in finished)
        if reconciled or stored is None:
            self.save()

    def ask(self, n: int) -> list[Candidate]:
        out: list[Candidate] = []
        if self._requeue:
            # the rest of the batch a crash interrupted, alone: asking new candidates before these
            # are told would show the backend a different history than an uninterrupted run
            while self._requeue and len(out) < n:
                out.append(self.candidate(self._requeue.pop(0)))
            return out
        while len(out) < n:
            proposed = self._propose(self._space)
            if proposed is None:
                break
            cid, self._next_id = self._next_id, self._next_id + 1
            self._pending[cid] = proposed
            self._dirty = True
            out.append(self.candidate(cid))
        if self._dirty:
            self.save()
        return out

    def tell(self, candidate: Candidate, result: Result) -> None:
        self._tell_backend(candidate.key, result)

    def save(self) -> None:
        self._persist(self._state())
        self._dirty = False

    def _persist(self, data: bytes) -> None:
        self._ledger.sync()  # rule 2: the trials this state has been told are durable first
        self._path.write(data)

    def _state(self) -> bytes:
        state = {
            "name": self.name,
            "backend": self._backend,
            "pending": self._pending,
            "told": self._told,
            "next_id": self._next_id,
        }
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    def use_checkpoint(self, store: CheckpointStore) -> None:
        """Keep the checkpoint in ``store`` (call before ``bind``): a coordinator lease's row."""
        self._checkpoint_arg = store

    @property
    def pending_keys(self) -> set[int]:
        """Ids of candidates asked but not told yet."""
        return set(self._pending)

    def outstanding(self) -> list[Candidate]:
        """Every candidate asked but not told, and the caller takes over re-queueing them.

        For the queue feeding the run loop (`search._queue`): after ``bind`` it enqueues whichever
        of these the study does not hold already, instead of ``ask`` handing them out first.
        """
        self._requeue = []
        return [self.candidate(cid) for cid in sorted(self._pending)]

    # ---------------------------------------------------------------- helpers
    def candidate(self, cid: int) -> Candidate:
        _, proposal = self._pending[cid]
        recipe = proposal.recipe
        if recipe is not None:
            recipe = recipe.model_copy(update={"trial": cid})
        return Candidate(
            key=cid, params=dict(proposal.params), distributions=dict(proposal.distributions),
            x=None if proposal.x is None else proposal.x.copy(), recipe=recipe,
        )

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
        self._dirty = True
