"""`propose`: an optuna trial's parameters from the study's sampler, before the trial is stored.

``study.ask(distributions)`` creates the trial, then stores every parameter as the sampler picks
it: on the journal ledger one line per parameter, each followed by optuna's re-read of the file
(32 parameters: 33 lines, about 3-5 ms per trial here, and about 2 ms more for a sampler that
re-reads the study per parameter, as independent TPE does). Here the sampler sees what
``study.ask`` shows it (the new RUNNING trial among the study's trials, ``before_trial``, the
relative sampling, then every parameter in order) on a view of the study whose storage keeps the
trial's writes in memory and answers reads from one snapshot of the study; the caller then
stores the finished proposal in one write (``create_new_trial`` with it as the template: one
journal line, one transaction on a database). Nothing else writes to a single-process ledger
while the sampler runs, so the snapshot is what optuna's reads would return.

Within one proposal, TPE's split of the trials into good and bad ones (a non-domination sort of
all trials with several objectives) is the same for every parameter, and optuna recomputes it
per parameter (about 6 ms of independent TPE's 21 ms per trial at 32 parameters): `propose`
computes it once per proposal (`_split_once`), so the proposals are the same, only cheaper.
Independent TPE's per-parameter work itself (two Parzen estimators, 24 candidates and their
scores per parameter) is done for all float parameters of the proposal at once
(`search._tpe_batch`, same proposals bit for bit).
"""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Callable, Container, Iterator, Mapping

import optuna
import optuna.samplers._tpe.sampler as _tpe
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from . import _tpe_batch

_PENDING_ID = -1
"""Trial id of the proposal while the sampler runs (it has none until it is stored)."""


class _ProposalStorage:
    """The storage the sampler sees during a proposal: the study's trials as read once at its
    start plus the pending trial; the pending trial's writes land in it; every other call goes to
    the study's storage."""

    def __init__(self, storage: optuna.storages.BaseStorage, pending: FrozenTrial, trials: list[FrozenTrial]) -> None:
        self.storage, self.pending, self.trials = storage, pending, [*trials, pending]

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self.pending if trial_id == _PENDING_ID else self.storage.get_trial(trial_id)

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        trials = [t for t in self.trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def set_trial_param(self, trial_id: int, name: str, value: float, distribution: BaseDistribution) -> None:
        self._own(trial_id)
        self.pending.params[name] = distribution.to_external_repr(value)
        self.pending.distributions[name] = distribution

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._own(trial_id)
        self.pending.system_attrs[key] = value

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._own(trial_id)
        self.pending.user_attrs[key] = value

    @staticmethod
    def _own(trial_id: int) -> None:
        if trial_id != _PENDING_ID:
            raise RuntimeError(f"a sampler wrote to trial {trial_id} while proposing another one")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


def propose(study: optuna.Study, distributions: Mapping[str, BaseDistribution]) -> optuna.Trial | None:
    """A RUNNING trial with ``distributions`` sampled as ``study.ask(distributions)`` samples
    them, stored in one write; None when the study has WAITING trials (``study.ask`` hands out
    those first, with their fixed parameters: let it)."""
    study._thread_local.cached_all_trials = None  # as study.ask: the sampler reads the latest trials
    trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return None
    pending = FrozenTrial(
        number=len(trials), state=TrialState.RUNNING, value=None, values=None, datetime_start=datetime.now(),
        datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
        intermediate_values={}, trial_id=_PENDING_ID,
    )
    view = copy.copy(study)
    view._storage = _ProposalStorage(study._storage, pending, trials)  # type: ignore[assignment]
    with _split_once(), _tpe_batch.batched(pending.number, distributions):
        trial = optuna.Trial(view, _PENDING_ID)
        for name, distribution in distributions.items():
            trial._suggest(name, distribution)
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=pending)
    # the same Trial, now on the stored trial: its sampler state (relative params) is kept
    trial.study, trial.storage, trial._trial_id = study, study._storage, trial_id
    trial._cached_frozen_trial = copy.deepcopy(study._storage.get_trial(trial_id))
    return trial


_split_local = threading.local()
_optuna_split: Callable[..., Any] = _tpe._split_trials


def _split_trials_once(study: optuna.Study, trials: list[FrozenTrial], n_below: int) -> Any:
    """optuna's ``_split_trials``, remembered for the proposal under way in this thread (keyed
    by the trial objects, which the proposal's snapshot keeps alive and unchanged)."""
    cache: dict[tuple[int, ...], Any] | None = getattr(_split_local, "cache", None)
    if cache is None:
        return _optuna_split(study, trials, n_below)
    key = (n_below, *map(id, trials))
    if key not in cache:
        cache[key] = _optuna_split(study, trials, n_below)
    below, above = cache[key]
    return list(below), list(above)


@contextmanager
def _split_once() -> Iterator[None]:
    _split_local.cache = {}
    try:
        yield
    finally:
        _split_local.cache = None


_tpe._split_trials = _split_trials_once
"""Installed once at import; outside a proposal (another thread, optuna's own study.ask) it is
optuna's function unchanged."""
