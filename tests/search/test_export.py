"""Exports of a real tiny-zoo run: CSV/JSON of all trials and the front, a trial's model (the
plots are experiments/_plots.py's: tests/experiments)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from evomerge.merge import MergeRecipe
from evomerge.search import Ledger, export_results, export_trial_model, make_optimizer, run_search, trial_recipe

from ._problem import build_problem


@pytest.fixture(scope="module")
def finished_run(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory):
    engine, scorer, space = build_problem(tiny_zoo)
    ledger = Ledger(tmp_path_factory.mktemp("run"), objectives=scorer.objectives, space=space.to_dict(), reference_point=[50.0, 1e6])
    run_search(space, scorer, make_optimizer("nevergrad:TwoPointsDE"), ledger, budget_evals=10, progress=False)
    return engine, scorer, space, ledger


def test_trials_and_front_as_csv_and_json(finished_run, tmp_path: Path) -> None:
    _, _, space, ledger = finished_run
    paths = export_results(ledger, tmp_path)
    assert set(paths) == {"trials.csv", "trials.json", "front.csv", "front.json"}
    trials = json.loads(paths["trials.json"].read_text())
    assert trials["reference_point"] == [50.0, 1e6]
    assert [t["number"] for t in trials["trials"]] == list(range(10))
    front_numbers = sorted(p.number for p in ledger.archive().front)
    front = json.loads(paths["front.json"].read_text())["trials"]
    assert [t["number"] for t in front] == front_numbers
    for t in trials["trials"]:
        assert set(t["genome"]) == set(space.names)
        assert MergeRecipe.model_validate(t["recipe"]) == trial_recipe(ledger, t["number"])
        assert set(t["objectives"]) == {"rev_loss", "l1"} and t["details"]["rev_loss"]
    with open(paths["trials.csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10
    assert {"rev_loss", "l1", "on_front", "recipe", "time:merge", f"param:{space.names[0]}"} <= set(rows[0])
    assert sorted(int(r["number"]) for r in rows if r["on_front"] == "True") == front_numbers


def test_any_trial_exports_as_a_model(finished_run, tmp_path: Path) -> None:
    engine, _, _, ledger = finished_run
    number = ledger.archive().front[0].number
    out = export_trial_model(ledger, engine, number, tmp_path / "model")
    assert (out / "config.json").exists()
    assert MergeRecipe.from_json((out / "recipe.json").read_text()) == trial_recipe(ledger, number)


def test_optuna_dashboard_opens_the_ledger(finished_run) -> None:
    from wsgiref.util import setup_testing_defaults

    import optuna_dashboard as dashboard  # in the `test` extra

    _, _, _, ledger = finished_run
    app = dashboard.wsgi(ledger.storage)
    environ: dict = {"PATH_INFO": "/api/studies"}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200")
    studies = json.loads(body)["study_summaries"]
    assert [s["study_name"] for s in studies] == ["evomerge"]


def test_a_trial_cut_off_by_a_dead_process_exports_as_interrupted(tiny_zoo: Path, tmp_path: Path) -> None:
    """A trial left RUNNING by a killed process is failed and re-queued at resume (`fail_running`);
    the CSV says interrupted, as `status` does (it said FAIL, interrupted=False, no failure)."""
    _, scorer, space = build_problem(tiny_zoo)
    ledger = Ledger(tmp_path / "run", objectives=scorer.objectives, space=space.to_dict(), reference_point=[50.0, 1e6])
    ledger.study.ask()  # claimed, then the process "died"
    assert [t.number for t in ledger.fail_running()] == [0]
    with open(export_results(ledger, tmp_path / "out")["trials.csv"]) as f:
        rows = {int(r["number"]): r for r in csv.DictReader(f)}
    assert (rows[0]["state"], rows[0]["interrupted"]) == ("FAIL", "True")
    assert rows[1]["state"] == "WAITING" and rows[1]["interrupted"] == "False"  # its re-run, queued
