"""Issue 16 item 5: the merge method as a searched, categorical choice with conditional parameters.

Real searches on the tiny zoo (real merges, the real TransformersScorer): the trials use several
methods, each trial's params hold only what its method reads, the stored params alone rebuild the
evaluated recipe (resume, export), and float-only optimizers refuse the space."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import TrialState

from evomerge.merge import MergeRecipe
from evomerge.search import Ledger, SearchSpace, SpaceTemplate, export_results, make_optimizer, run_search, trial_recipe

from ._problem import build_problem

METHODS = ["task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs_ties"]


@pytest.fixture(scope="module")
def problem(tiny_zoo: Path):
    engine, scorer, _ = build_problem(tiny_zoo)
    space = SearchSpace(engine.layout, engine.expert_names, SpaceTemplate(methods=METHODS))
    return engine, scorer, space


def _ledger(path: Path, scorer, space: SearchSpace) -> Ledger:
    return Ledger(path, objectives=scorer.objectives, space=space.to_dict(), seed=3)


def test_space_conditions_each_method_s_parameters(problem) -> None:
    _, _, space = problem
    assert space.categorical and space.template.method == "task_arithmetic"  # the first listed starts
    kinds = {m: {n.split("[")[0].split(".")[-1] for n in space.sub(m).names} for m in METHODS}
    assert kinds == {
        "task_arithmetic": {"weight"}, "ties": {"weight", "density"}, "dare_ties": {"weight", "density"},
        "della": {"weight", "density", "epsilon"}, "breadcrumbs_ties": {"weight", "density", "gamma"},
    }
    assert space.start_params() == {"method": "task_arithmetic", "all.weight[rev]": 0.5, "all.weight[sort]": 0.5}
    with pytest.raises(ValueError, match="no flat genome"):
        space.x0
    with pytest.raises(ValueError, match="not parameters of method 'task_arithmetic'"):
        space.decode_params({**space.start_params(), "all.density[rev]": 0.5})
    with pytest.raises(ValueError, match="cannot be chosen"):
        SpaceTemplate(methods=["ties", "slerp"])
    with pytest.raises(ValueError, match="not one of methods"):
        SpaceTemplate(method="della", methods=["ties", "dare_ties"])


@pytest.mark.parametrize("spec", ["optuna:tpe", "random"])
def test_search_over_the_method_choice(problem, spec: str, tmp_path: Path) -> None:
    engine, scorer, space = problem
    ledger = _ledger(tmp_path, scorer, space)
    if spec.startswith("optuna:"):
        ledger.study.enqueue_trial(space.start_params())  # as `evomerge run` does
    run_search(space, scorer, make_optimizer(spec), ledger, budget_evals=7, progress=False)
    # resume: a reopened ledger and a fresh optimizer carry on from the stored params alone
    ledger = _ledger(tmp_path, scorer, space)
    result = run_search(space, scorer, make_optimizer(spec), ledger, budget_evals=10, progress=False)
    assert result.n_finished == 10
    trials = ledger.trials()
    used = {t.params["method"] for t in trials}
    assert len(used) > 1, used
    if spec.startswith("optuna:"):
        assert trials[0].params == space.start_params()
    for t in trials:
        method = t.params["method"]
        assert set(t.params) - {"method"} == set(space.sub(method).names)  # only what the method reads
        if method == "task_arithmetic":
            assert not any(".density" in n for n in t.params)
        assert t.state == TrialState.COMPLETE, t.user_attrs.get("failure")  # DELLA's epsilon is capped to fit its density
        recipe = trial_recipe(ledger, t.number)
        assert {rule.method for rule in recipe.rules} == {method}
        key = t.user_attrs.get("candidate", t.number)
        assert space.decode_params(t.params, seed=ledger.seed, trial=int(key)) == recipe
        assert set(t.user_attrs["objectives"]) == {"rev_loss", "l1"}
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 7
    exported = export_results(ledger, tmp_path / "out")
    header = exported["trials.csv"].read_text().splitlines()[0].split(",")
    assert "param:method" in header
    # a trial's model export merges the ledger's recipe: the engine accepts it (no ignored option)
    done = next(t for t in trials if t.state == TrialState.COMPLETE and t.params["method"] != "task_arithmetic")
    out = engine.export(trial_recipe(ledger, done.number), tmp_path / "model")
    assert MergeRecipe.model_validate_json((out / "recipe.json").read_text()) == trial_recipe(ledger, done.number)


@pytest.mark.parametrize("spec", ["nevergrad:CMA", "optuna:cmaes", "optuna:qmc"])
def test_float_only_optimizers_refuse_a_method_choice(problem, spec: str, tmp_path: Path) -> None:
    _, scorer, space = problem
    with pytest.raises(ValueError, match="no flat genome|searches floats only"):
        make_optimizer(spec).bind(space, _ledger(tmp_path, scorer, space), budget=4)
