"""Every optimizer family runs a real search on the tiny zoo (real merges, real TransformersScorer);
seeded runs repeat; scalarization, constraints, failures and a clean stop behave as documented."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from optuna.trial import TrialState

from evomerge.experiments._signals import SignalLog
from evomerge.merge import MergeRecipe
from evomerge.objectives import TransformersScorer
from evomerge.search import (
    NEVERGRAD_OPTIMIZERS,
    GridSearch,
    Ledger,
    Scalarization,
    SearchSpace,
    SpaceTemplate,
    make_optimizer,
    run_search,
)

from ._problem import build_problem

SPECS = [
    "nevergrad:CMA", "nevergrad:DE", "nevergrad:TwoPointsDE", "nevergrad:PSO", "nevergrad:OnePlusOne",
    "nevergrad:NgIohTuned", "optuna:tpe", "optuna:nsga2", "optuna:nsga3", "optuna:gp", "optuna:qmc",
    "optuna:random", "random",
]


@pytest.fixture(scope="module")
def problem(tiny_zoo: Path):
    return build_problem(tiny_zoo)


def _ledger(path: Path, scorer, space: SearchSpace, **kwargs) -> Ledger:
    return Ledger(path, objectives=scorer.objectives, space=space.to_dict(), **kwargs)


@pytest.mark.parametrize("spec", SPECS)
def test_each_optimizer_runs_a_real_multi_objective_search(problem, spec: str, tmp_path: Path) -> None:
    _, scorer, space = problem
    ledger = _ledger(tmp_path, scorer, space, seed=1)
    result = run_search(space, scorer, make_optimizer(spec), ledger, budget_evals=8, progress=False)
    assert (result.n_finished, result.stopped_by) == (8, "budget")
    trials = ledger.finished()
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        recipe = MergeRecipe.from_json(t.user_attrs["recipe"])
        # the stored genome is the stored recipe's genome
        np.testing.assert_allclose(space.encode(recipe), space.from_params(t.params), atol=1e-9)
        assert set(t.user_attrs["objectives"]) == {"rev_loss", "l1"}
        assert t.user_attrs["timings"]["search_overhead"] >= 0 and t.user_attrs["timings"]["merge"] > 0
        assert len(t.user_attrs["details"]["rev_loss"]) == 4
    assert result.archive.front and result.archive.hypervolume() > 0
    assert ledger.study.user_attrs["reference_point"] == result.archive.reference_point
    if spec.startswith("nevergrad:"):  # issue 16: the first candidate is the starting point, exactly
        assert np.array_equal(space.from_params(trials[0].params), space.x0)
        assert not np.array_equal(space.from_params(trials[1].params), space.x0)


def test_every_listed_nevergrad_optimizer_asks_the_starting_point_first(problem, tmp_path: Path) -> None:
    """Every class the spec lists (NEVERGRAD_OPTIMIZERS), single- and multi-objective: the first
    ask is x0 exactly (CMA, DE and PSO would sample around it), and its result is accepted."""
    _, scorer, space = problem
    for name in NEVERGRAD_OPTIMIZERS:
        for scal in (None, Scalarization(weights=(1.0, 0.0))):
            ledger = _ledger(tmp_path / f"{name}-{scal is None}", scorer, space, scalarization=scal)
            optimizer = make_optimizer(f"nevergrad:{name}")
            optimizer.bind(space, ledger, budget=8)
            first, second = optimizer.ask(1)[0], None
            assert np.array_equal(first.x, space.x0), name
            optimizer.tell(first, [1.0, 2.0])
            second = optimizer.ask(1)[0]
            assert second.x is not None and not np.array_equal(second.x, space.x0), name

    # CMA's step is chosen from the bounds: its first populations spread a sixth of each range
    cma = make_optimizer("nevergrad:CMA")
    cma.bind(space, _ledger(tmp_path / "cma-step", scorer, space, scalarization=Scalarization()), budget=100)
    xs = np.array([c.x for c in cma.ask(60)[1:]])
    low, high = space.bounds
    assert np.all((xs >= low) & (xs <= high))
    assert 0.12 < float(np.mean(xs.std(axis=0) / (high - low))) < 0.2


def test_grid_baseline_walks_task_arithmetic_and_ties_coefficients(problem, tmp_path: Path) -> None:
    _, scorer, space = problem
    grid = GridSearch(weights=(0.5, 1.0), densities=(0.3, 0.7))
    ledger = _ledger(tmp_path, scorer, space)
    result = run_search(space, scorer, grid, ledger, progress=False)
    assert result.stopped_by == "exhausted" and result.n_finished == len(grid) == 2 + 4
    seen = {(t.params["grid.method"], t.params["grid.weight"], t.params["grid.density"]) for t in ledger.finished()}
    assert seen == {("task_arithmetic", 0.5, 1.0), ("task_arithmetic", 1.0, 1.0),
                    ("ties", 0.5, 0.3), ("ties", 0.5, 0.7), ("ties", 1.0, 0.3), ("ties", 1.0, 0.7)}
    l1 = {t.params["grid.weight"]: t.user_attrs["objectives"]["l1"] for t in ledger.finished()
          if t.params["grid.method"] == "task_arithmetic"}
    assert l1[1.0] > l1[0.5]  # a real merge: twice the coefficient, a larger distance to the base


@pytest.mark.parametrize("spec", ["nevergrad:TwoPointsDE", "optuna:tpe", "optuna:nsga2", "random"])
def test_same_seed_same_trial_sequence(problem, spec: str, tmp_path: Path) -> None:
    _, scorer, space = problem
    runs = []
    for name in ("a", "b.db"):  # the journal file and SQLite hold the same trials
        ledger = _ledger(tmp_path / name, scorer, space, seed=5)
        run_search(space, scorer, make_optimizer(spec), ledger, budget_evals=8, progress=False)
        runs.append([(t.params, t.user_attrs["objectives"]) for t in ledger.finished()])
    assert runs[0] == runs[1]
    other = _ledger(tmp_path / "c", scorer, space, seed=6)
    run_search(space, scorer, make_optimizer(spec), other, budget_evals=2, progress=False)
    assert [t.params for t in other.finished()] != [p for p, _ in runs[0][:2]]


@pytest.mark.parametrize("spec", ["optuna:cmaes", "nevergrad:CMA"])
def test_single_objective_optimizers_use_the_scalarization(problem, spec: str, tmp_path: Path) -> None:
    _, scorer, space = problem
    scal = Scalarization("chebyshev", weights=(1.0, 0.01))
    ledger = _ledger(tmp_path, scorer, space, scalarization=scal)
    run_search(space, scorer, make_optimizer(spec), ledger, budget_evals=6, progress=False)
    assert len(ledger.study.directions) == 1
    for t in ledger.finished():
        objectives = t.user_attrs["objectives"]
        assert t.values == [pytest.approx(scal([objectives["rev_loss"], objectives["l1"]], ["minimize", "minimize"]))]


def test_single_objective_sampler_without_scalarization_is_refused(problem, tmp_path: Path) -> None:
    _, scorer, space = problem
    with pytest.raises(ValueError, match="single-objective"):
        run_search(space, scorer, make_optimizer("optuna:cmaes"), _ledger(tmp_path, scorer, space), budget_evals=1, progress=False)


@pytest.mark.parametrize("spec", ["random", "optuna:nsga2"])
def test_infeasible_trials_never_reach_the_front(problem, spec: str, tmp_path: Path) -> None:
    _, scorer, space = problem
    ledger = _ledger(tmp_path, scorer, space)
    first = run_search(space, scorer, make_optimizer("random"), _ledger(tmp_path / "probe", scorer, space), budget_evals=6, progress=False)
    threshold = float(np.median(first.archive.points[:, 1]))
    result = run_search(space, scorer, make_optimizer(spec), ledger, budget_evals=6, progress=False,
                        constraints=lambda ev: [ev.values["l1"] - threshold])
    infeasible = {t.number for t in ledger.finished() if t.user_attrs["constraints"][0] > 0}
    # optuna sees the same feasibility (its constrained samplers and best_trials use it)
    assert all((t.constraints["0"] > 0) == (t.number in infeasible) for t in ledger.finished())
    assert infeasible and not infeasible & {p.number for p in result.archive.front}
    assert not infeasible & {p.number for p in ledger.archive().front}


@pytest.mark.parametrize("spec", ["nevergrad:CMA", "optuna:tpe"])
def test_failed_evaluations_fail_the_trial_not_the_run(problem, spec: str, tmp_path: Path) -> None:
    engine, scorer, space = problem
    hurried = TransformersScorer(engine, scorer.objectives, timeout=1e-9)  # every evaluation times out
    ledger = _ledger(tmp_path, hurried, space)
    result = run_search(space, hurried, make_optimizer(spec), ledger, budget_evals=4, progress=False)
    assert result.n_finished == 4
    trials = ledger.finished()
    assert all(t.state == TrialState.FAIL and "time" in t.user_attrs["failure"].lower() for t in trials)
    assert result.archive.front == [] and result.archive.hypervolume() == 0.0


def test_sigterm_stops_cleanly_and_the_run_resumes_to_the_same_total(problem, tmp_path: Path) -> None:
    """The CLI's edge (`SignalLog`) turns SIGTERM into a KeyboardInterrupt; the loop installs no
    handler of its own and stops cleanly on it."""
    _, scorer, space = problem
    before = signal.getsignal(signal.SIGTERM)

    def stop_after_three(record) -> None:
        if record.number == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    ledger = _ledger(tmp_path, scorer, space)
    with SignalLog() as signals:
        stopped = run_search(space, scorer, make_optimizer("nevergrad:DE"), ledger, budget_evals=7,
                             callbacks=[stop_after_three], progress=False)
        assert signals.exit_code() == 143
    assert stopped.stopped_by == "interrupt" and stopped.n_finished == 3
    assert signal.getsignal(signal.SIGTERM) is before
    resumed = run_search(space, scorer, make_optimizer("nevergrad:DE"), _ledger(tmp_path, scorer, space),
                         budget_evals=7, progress=False)
    assert resumed.n_new == 4 and resumed.n_finished == 7
    candidates = sorted(t.user_attrs["candidate"] for t in ledger.finished())
    assert candidates == list(range(7))  # the candidate pending at the stop ran once, after the resume
    # the resumed run repeats the uninterrupted one
    straight = _ledger(tmp_path / "straight", scorer, space)
    run_search(space, scorer, make_optimizer("nevergrad:DE"), straight, budget_evals=7, progress=False)
    assert [t.params for t in ledger.finished()] == [t.params for t in straight.finished()]


def test_the_loop_installs_no_signal_handler(problem, tmp_path: Path) -> None:
    _, scorer, space = problem
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def look(record) -> None:
        assert {s: signal.getsignal(s) for s in handlers} == handlers

    run_search(space, scorer, make_optimizer("random"), _ledger(tmp_path, scorer, space), budget_evals=2,
               callbacks=[look], progress=False)


def test_reopening_with_another_space_fails_loudly(problem, tmp_path: Path) -> None:
    engine, scorer, space = problem
    _ledger(tmp_path, scorer, space)
    other = SearchSpace(engine.layout, engine.expert_names, SpaceTemplate(method="ties", granularity="global"))
    with pytest.raises(ValueError, match="space_fingerprint"):
        _ledger(tmp_path, scorer, other)
