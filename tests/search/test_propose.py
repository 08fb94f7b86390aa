"""`search._propose`: a native optuna trial proposed before it is stored, in one journal line,
with the parameters ``study.ask`` would have given it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from evomerge.search._ledger import resolve_storage
from evomerge.search._propose import propose

DISTRIBUTIONS = {f"x{i}": FloatDistribution(-1.0, 1.0) for i in range(6)}


def _values(params: dict[str, float]) -> list[float]:
    x = np.array([params[name] for name in DISTRIBUTIONS])
    return [float(np.sum(x**2)), float(np.sum((x - 0.5) ** 2)), float(np.round(x[0], 1))]


def _run(path: Path, sampler: optuna.samplers.BaseSampler, ask: bool) -> list[dict[str, float]]:
    storage, _ = resolve_storage(path)
    study = optuna.create_study(storage=storage, directions=["minimize"] * 3, sampler=sampler)
    proposed = []
    for _ in range(5):  # batches of 3: the later asks of a batch see the pending ones (constant liar)
        batch = [study.ask(DISTRIBUTIONS) if ask else propose(study, DISTRIBUTIONS) for _ in range(3)]
        for trial in batch:
            assert trial is not None
            proposed.append(dict(trial.params))
            study.tell(trial, _values(trial.params))
    return proposed


@pytest.mark.parametrize("make", [
    lambda: optuna.samplers.TPESampler(seed=3, n_startup_trials=4, constant_liar=True),
    lambda: optuna.samplers.TPESampler(seed=3, n_startup_trials=4, multivariate=True),
    lambda: optuna.samplers.NSGAIISampler(seed=3, population_size=4),
    lambda: optuna.samplers.RandomSampler(seed=3),
], ids=["tpe", "tpe-multivariate", "nsga2", "random"])
def test_proposals_are_what_study_ask_gives_in_one_line_each(tmp_path: Path, make) -> None:
    asked = _run(tmp_path / "ask.log", make(), ask=True)
    proposed = _run(tmp_path / "propose.log", make(), ask=False)
    assert proposed == asked
    lines = {name: len((tmp_path / f"{name}.log").read_text().splitlines()) for name in ("ask", "propose")}
    assert lines["propose"] < lines["ask"] - 15 * (len(DISTRIBUTIONS) - 1)  # one line per trial, not per parameter
    # optuna (and so optuna-dashboard) reads the proposed trials back as study.ask's
    loaded = optuna.load_study(study_name=None, storage=resolve_storage(tmp_path / "propose.log")[0])
    assert [t.params for t in loaded.trials] == asked
    assert all(t.state == TrialState.COMPLETE and t.distributions == DISTRIBUTIONS for t in loaded.trials)


def test_waiting_trials_are_left_to_study_ask(tmp_path: Path) -> None:
    storage, _ = resolve_storage(tmp_path / "ledger.log")
    study = optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"x0": 0.25})
    assert propose(study, DISTRIBUTIONS) is None
    assert study.ask(DISTRIBUTIONS).params["x0"] == 0.25
    trial = propose(study, DISTRIBUTIONS)
    assert trial is not None and trial.number == 1 and study.trials[1].state == TrialState.RUNNING
