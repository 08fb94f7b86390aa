"""Multi-fidelity search (issue 16 item 4): the promotion rule, rungs continued in the live model,
the rung statistics kept in the ledger across a resume, and the front of top-rung trials only."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.merge import MergeRecipe
from evomerge.search import Fidelity, Ledger, make_optimizer, run_search
from evomerge.search._fidelity import items_spent

from ._problem import build_problem


def test_promotion_keeps_the_top_fraction_of_a_rung() -> None:
    f = Fidelity((2, 4, 8), eta=3, score=lambda v: v["x"])
    assert f.promote(0.1, [0.1])  # the first of a rung: the best so far
    assert not f.promote(0.1, [0.5, 0.1]) and f.promote(0.6, [0.5, 0.6])  # fewer than eta: only the best goes on
    peers = [0.9, 0.8, 0.1, 0.2, 0.3, 0.4]  # 6 // 3 = 2 go on
    assert f.promote(0.8, peers) and not f.promote(0.4, peers)
    assert not f.promote(0.5, [0.5, 0.5, 0.5])  # a tie goes to the earlier candidates
    for rungs, eta in (((4,), 2), ((4, 4), 2), ((8, 4), 2), ((0, 4), 2), ((2, 4), 1)):
        with pytest.raises(ValueError):
            Fidelity(rungs, eta, score=lambda v: 0.0)


def test_graded_search_resumes_its_rung_statistics(tiny_zoo: Path, tmp_path: Path) -> None:
    engine, scorer, space = build_problem(tiny_zoo, items=16)
    fidelity = Fidelity((4, 8, 16), eta=2, score=lambda v: -v["rev_loss"])
    objectives = scorer.objectives
    ledger = Ledger(tmp_path, objectives=objectives, seed=1, space=space.to_dict())
    first = run_search(space, scorer, make_optimizer("random"), ledger, budget_evals=5, progress=False, fidelity=fidelity)
    assert first.n_new == 5
    ledger = Ledger(tmp_path, objectives=objectives, seed=1, space=space.to_dict())  # the resume: a new process
    spent = items_spent(ledger.trials())
    second = run_search(space, scorer, make_optimizer("random"), ledger, budget_evals=100, budget_items=spent + 1,
                        progress=False, fidelity=fidelity)
    assert second.n_new == 1 and second.stopped_by == "budget"  # a trial costs at least 4 items
    second = run_search(space, scorer, make_optimizer("random"), ledger, budget_evals=9, progress=False, fidelity=fidelity)
    trials = ledger.trials()
    assert len(trials) == 9 and all(t.state.name == "COMPLETE" for t in trials)
    reached: dict[int, list[float]] = {0: [], 1: [], 2: []}  # scalars per rung, replayed in trial order
    for t in trials:
        grade = t.user_attrs["fidelity"]
        rung = grade["rung"]
        assert grade["items"] == fidelity.rungs[rung] and grade["scored"] == fidelity.rungs[rung]  # one set of 16
        assert grade["full"] == (rung == 2) and len(grade["scalars"]) == rung + 1
        for r, scalar in enumerate(grade["scalars"]):
            assert grade["peers"][r] == len(reached[r]) + 1  # every earlier trial, before and after the resume
            reached[r].append(scalar)
            if r < len(fidelity.rungs) - 1:
                assert fidelity.promote(scalar, reached[r]) == (r < rung)
        assert grade["scalars"][-1] == pytest.approx(-t.user_attrs["objectives"]["rev_loss"])
        assert len(t.user_attrs["details"]["rev_loss"]) == fidelity.rungs[rung]
    assert any(t.user_attrs["fidelity"]["rung"] < 2 for t in trials)  # halving stopped some
    assert items_spent(trials) == sum(t.user_attrs["fidelity"]["scored"] for t in trials)
    full = {t.number for t in trials if t.user_attrs["fidelity"]["full"]}
    front = {p.number for p in ledger.archive().front}
    assert front and front <= full  # a low rung never enters the front
    assert {p.number for p in second.archive.front} == front
    top = trials[max(full)]
    direct = scorer.evaluate(MergeRecipe.model_validate_json(top.user_attrs["recipe"]))  # all 16 items at once
    assert direct.values["rev_loss"] == pytest.approx(top.user_attrs["objectives"]["rev_loss"], rel=1e-5)
    assert direct.values["l1"] == pytest.approx(top.user_attrs["objectives"]["l1"])
    scorer.close()
