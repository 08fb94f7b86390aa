"""Coordinated optimizers keep data, not code: the stored state is a JSON history that resume
replays into a fresh backend; a pickle planted in the run folder is never loaded, and a missing or
replaced history is rebuilt from the ledger, continuing the uninterrupted run's sequence."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from evomerge.search import Ledger, ResumeError, SearchSpace, make_optimizer, run_search

from ._problem import build_problem


@pytest.fixture(scope="module")
def problem(tiny_zoo: Path):
    return build_problem(tiny_zoo)


def _ledger(path: Path, scorer, space: SearchSpace) -> Ledger:
    return Ledger(path, objectives=scorer.objectives, space=space.to_dict(), seed=3)


class _Payload:
    """Unpickling this creates ``marker``: the proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _stop_after(n: int):
    def callback(record) -> None:
        if record.number == n - 1:
            raise KeyboardInterrupt

    return callback


def _genomes(ledger: Ledger) -> list[dict]:
    return [t.params for t in ledger.finished()]


def _history_file(ledger: Ledger) -> Path:
    return ledger.checkpoint_path("optimizer.json")


@pytest.mark.parametrize("spec", ["nevergrad:CMA", "nevergrad:TwoPointsDE", "random"])
def test_planted_pickle_is_never_loaded_and_the_resumed_run_repeats_the_straight_one(problem, spec: str, tmp_path: Path) -> None:
    _, scorer, space = problem
    straight = _ledger(tmp_path / "straight", scorer, space)
    run_search(space, scorer, make_optimizer(spec), straight, budget_evals=8, progress=False)

    ledger = _ledger(tmp_path / "run", scorer, space)
    stopped = run_search(space, scorer, make_optimizer(spec), ledger, budget_evals=8, callbacks=[_stop_after(4)], progress=False)
    assert stopped.stopped_by == "interrupt" and stopped.n_finished == 4
    history = json.loads(_history_file(ledger).read_bytes())
    assert history["format"].startswith("evomerge.coordinator-history/") and all(type(e) is int for e in history["events"])
    # the old pickle's place and the history's place both hold a payload that would run on unpickling
    marker = tmp_path / "payload-ran"
    for path in (ledger.checkpoint_path("optimizer.pkl"), _history_file(ledger)):
        path.write_bytes(pickle.dumps(_Payload(marker)))
    resumed = run_search(space, scorer, make_optimizer(spec), _ledger(tmp_path / "run", scorer, space), budget_evals=8, progress=False)
    assert not marker.exists()
    assert (resumed.n_finished, resumed.stopped_by) == (8, "budget")
    assert _genomes(ledger) == _genomes(straight)
    assert json.loads(_history_file(ledger).read_bytes())["format"] == history["format"]  # rewritten as data


class _StopDuring:
    """A scorer that is stopped (as by Ctrl-C) in the middle of its ``n``-th evaluation: the
    claimed candidate is given back and re-queued, so the study holds it unfinished."""

    def __init__(self, scorer, n: int) -> None:
        self.scorer, self.n, self.calls = scorer, n, 0

    def evaluate(self, recipe):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.scorer.evaluate(recipe)


@pytest.mark.parametrize("spec", ["nevergrad:CMA", "random"])
def test_a_candidate_cut_off_in_flight_is_rerun_once_when_the_history_is_gone(problem, spec: str, tmp_path: Path) -> None:
    _, scorer, space = problem
    straight = _ledger(tmp_path / "straight", scorer, space)
    run_search(space, scorer, make_optimizer(spec), straight, budget_evals=6, progress=False)

    ledger = _ledger(tmp_path / "run", scorer, space)
    stopped = run_search(space, _StopDuring(scorer, 4), make_optimizer(spec), ledger, budget_evals=6, progress=False)
    assert stopped.stopped_by == "interrupt" and stopped.n_finished == 3
    _history_file(ledger).unlink()  # the ledger alone: candidate 3 is queued again, not finished
    resumed = run_search(space, scorer, make_optimizer(spec), _ledger(tmp_path / "run", scorer, space), budget_evals=6, progress=False)
    assert resumed.n_finished == 6
    assert sorted(t.user_attrs["candidate"] for t in ledger.finished()) == list(range(6))
    assert _genomes(ledger) == _genomes(straight)


def test_a_history_that_does_not_fit_the_ledger_is_not_trusted(problem, tmp_path: Path) -> None:
    _, scorer, space = problem
    ledger = _ledger(tmp_path, scorer, space)
    run_search(space, scorer, make_optimizer("nevergrad:CMA"), ledger, budget_evals=3, progress=False)
    path = _history_file(ledger)
    history = json.loads(path.read_bytes())
    # a history claiming results the ledger never recorded: replay refuses it; the ledger alone
    # (one candidate at a time) still rebuilds the optimizer
    path.write_text(json.dumps({**history, "events": [-5, 0, 1, 2, 3, 4]}))
    run_search(space, scorer, make_optimizer("nevergrad:CMA"), _ledger(tmp_path, scorer, space), budget_evals=5, progress=False)
    assert sorted(t.user_attrs["candidate"] for t in ledger.finished()) == list(range(5))


def test_unrebuildable_state_is_one_clear_error(problem, tmp_path: Path) -> None:
    _, scorer, space = problem
    ledger = _ledger(tmp_path, scorer, space)
    run_search(space, scorer, make_optimizer("nevergrad:CMA"), ledger, budget_evals=3, progress=False)
    _history_file(ledger).unlink()
    # another optimizer proposes other genomes: without a history the ledger alone cannot rebuild it
    with pytest.raises(ResumeError, match="differs from ledger trial") as info:
        make_optimizer("nevergrad:DE").bind(space, _ledger(tmp_path, scorer, space), budget=5)
    assert "\n" not in str(info.value)
