"""TransformersScorer on the tiny zoo with the real merge engine: values, in-place swaps, failures.

References are computed independently: a fresh model loaded with the merged state dict, scored
with `model.generate` and a plain forward pass.
"""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.merge import ExpertParams, GroupRule, MergeRecipe
from evomerge.objectives import Evaluation, TransformersScorer


def recipe(weights: dict[str, float], method: str = "task_arithmetic", **kw) -> MergeRecipe:
    rule = GroupRule(method=method, experts={n: ExpertParams(weight=w) for n, w in weights.items()})
    return MergeRecipe(rules=[rule], normalize=False, **kw)


@pytest.fixture(scope="module")
def scorer(zoo_engine, zoo_objectives):
    with TransformersScorer(zoo_engine, zoo_objectives, batch_size=4, max_new_tokens=12) as s:
        yield s


def fresh_model(engine, r):
    model = AutoModelForCausalLM.from_config(engine.config, dtype=torch.float32).eval()
    model.load_state_dict(engine.merged_state(r), strict=False)
    if not engine.config.tie_word_embeddings:
        assert torch.equal(model.lm_head.weight, engine.merged_state(r)["lm_head.weight"])
    return model


def test_values_equal_an_independent_fresh_model(scorer, zoo_engine):
    r = recipe({"rev": 1.0, "sort": 0.5})
    ev = scorer.evaluate(r)
    assert not ev.failed, ev.reason
    tok = scorer.tokenizer
    model = fresh_model(zoo_engine, r)
    rev_items = next(o for o in scorer.objectives if o.name == "rev_acc").calibration.items
    losses = []
    for item, row in zip(rev_items, ev.details["rev_acc"]):
        prompt = tok(item.prompt)["input_ids"]
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        text = tok.decode(out[0, len(prompt):], skip_special_tokens=True).split("\n")[0]
        assert row["prediction"] == text
        assert row["correct"] == float(text.strip() == item.answer)
        answer = tok(item.prompt + item.answer)["input_ids"][len(prompt):]
        with torch.no_grad():
            logp = model(torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
        losses += [-logp[len(prompt) - 1 + t, a].item() for t, a in enumerate(answer)]
    assert ev.values["rev_acc"] == pytest.approx(sum(r["correct"] for r in ev.details["rev_acc"]) / len(rev_items))
    assert ev.values["rev_loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    assert set(ev.values) == {o.name for o in scorer.objectives}
    for key in ("merge", "swap", "inference", "total", "items_per_s"):
        assert ev.timings[key] >= 0
    assert ev.timings["items_per_s"] > 0
    assert ev.timings["merge"] + ev.timings["swap"] + ev.timings["inference"] <= ev.timings["total"]


def test_extend_scores_only_the_added_items_and_equals_a_direct_evaluation(scorer):
    """Multi-fidelity search: a candidate scored on the first 3 items of every set, continued in
    the live model to 6, has the values of a direct evaluation on 6 items, every metric kind."""
    r = recipe({"rev": 0.8, "sort": 0.6})
    low = scorer.evaluate(r, items=3)
    assert not low.failed, low.reason
    assert {len(rows) for rows in low.details.values()} == {3} and scorer.items(3) == 4 * 3 and scorer.items() == 4 * 8
    more = scorer.extend(low, 6)
    assert not more.failed, more.reason
    assert more.timings["merge"] == 0 and {len(rows) for rows in more.details.values()} == {6}
    direct = scorer.evaluate(r, items=6)
    assert set(more.values) == set(direct.values)
    for name, value in direct.values.items():
        assert more.values[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert more.details["rev_acc"] == direct.details["rev_acc"]
    stale = scorer.extend(more, 8)  # the live model holds `direct` now, not `more`
    assert stale.failed and "latest" in stale.reason


def test_scoring_other_objectives_in_the_same_model_equals_a_scorer_of_them(scorer, zoo_engine, zoo_dir):
    """A run's end (re-scoring, held-out sets) scores other objectives in the run's live model: the
    values are a scorer of those objectives' own, and after the block the scorer's own come back."""
    from evomerge.objectives import CalibrationSet, Objective

    r = recipe({"rev": 0.7, "sort": 0.4})
    before = scorer.evaluate(r)
    wider = [Objective("rev_loss", "answer_loss", CalibrationSet.load(zoo_dir / "data" / "rev" / "calib.jsonl")),
             Objective("sort_acc", "exact_match", CalibrationSet.load(zoo_dir / "data" / "sort" / "test.jsonl", size=5, seed=1))]
    with scorer.scoring(wider) as same:
        assert same is scorer and [o.name for o in scorer.objectives] == ["rev_loss", "sort_acc"]
        inside = scorer.evaluate(r)
        assert scorer.extend(before, 8).failed  # the evaluation before the block is not continued inside it
    with TransformersScorer(zoo_engine, wider, batch_size=4, max_new_tokens=12) as own:
        alone = own.evaluate(r)
    assert not inside.failed and inside.values == pytest.approx(alone.values, rel=1e-5, abs=1e-6)
    assert inside.details["sort_acc"] == alone.details["sort_acc"] and len(inside.details["sort_acc"]) == 5
    after = scorer.evaluate(r)
    assert after.values == before.values


def test_experts_win_their_own_skill(scorer):
    rev = scorer.evaluate(recipe({"rev": 1.0}))
    sort = scorer.evaluate(recipe({"sort": 1.0}))
    assert rev.values["rev_loss"] < sort.values["rev_loss"]
    assert sort.values["sort_loss"] < rev.values["sort_loss"]


def test_in_place_swaps_do_not_leak_state(scorer):
    a, b = recipe({"rev": 1.0}), recipe({"sort": 1.0, "rev": -0.3})
    first = scorer.evaluate(a)
    scorer.evaluate(b)
    again = scorer.evaluate(a)
    assert again.values == first.values
    assert again.details == first.details


def test_costs_come_from_merge_stats(scorer, zoo_engine):
    base = scorer.evaluate(recipe({"rev": 0.0}))
    assert base.values["l1"] == 0.0 and base.values["changed"] == 0.0 and base.values["kept"] == 0.0
    r = recipe({"rev": 1.0}, method="ties")
    ev = scorer.evaluate(r)
    merged = zoo_engine.merged_state(r)
    l1 = sum((merged[n].double() - zoo_engine.base_tensor(n).double()).abs().sum().item() for n in merged)
    assert ev.values["l1"] == pytest.approx(l1, rel=1e-5)
    assert 0 < ev.values["kept"] <= 1 and ev.values["changed"] > 0


def test_failures_are_results(scorer):
    nan = scorer.evaluate(recipe({"rev": float("nan")}))
    assert nan.failed and nan.reason.startswith("FloatingPointError: non-finite objective value") and nan.values == {}
    unknown = scorer.evaluate(recipe({"nobody": 1.0}))
    assert unknown.failed and "nobody" in unknown.reason and "\n" not in unknown.reason
    late = scorer.evaluate(recipe({"rev": 1.0}), timeout=1e-6)
    assert late.failed and late.reason.startswith("timeout") and late.timings["total"] > 0
    # a failure leaves the scorer usable
    assert not scorer.evaluate(recipe({"rev": 1.0})).failed


def test_a_timed_out_trial_keeps_its_split(scorer):
    """A timeout that strikes during inference keeps the time spent so far in its phase: the split
    (merge + swap + inference) still accounts for the total (it used to say inference 0.0)."""
    r = recipe({"rev": 0.7, "sort": 0.4})
    # the deadline is set from a measured evaluation, and the next one may run faster than that on
    # a shared machine; aim earlier into the inference on each try
    for fraction in (0.5, 0.25, 0.1, 0.05, 0.02):
        full = scorer.evaluate(r)
        assert not full.failed
        late = scorer.evaluate(r, timeout=full.timings["merge"] + full.timings["swap"] + fraction * full.timings["inference"])
        if late.failed and late.timings["inference"] > 0:
            break
    assert late.failed and late.reason.startswith("timeout")
    t = late.timings
    assert t["inference"] > 0 and t["merge"] > 0
    assert t["merge"] + t["swap"] + t["inference"] == pytest.approx(t["total"], rel=0.1, abs=0.01)


def test_warm_up_is_not_timed(scorer):
    """`warm_up` evaluates without the scorer's timeout (one-time compiles and first calls must not
    fail the first candidate); `evaluate` keeps the timeout."""
    r = recipe({"rev": 0.5, "sort": 0.5})
    scorer.timeout = 1e-9
    try:
        warm = scorer.warm_up(r)
        timed = scorer.evaluate(r)
    finally:
        scorer.timeout = None
    assert not warm.failed and warm.values
    assert timed.failed and timed.reason.startswith("timeout")
    assert warm.values == scorer.evaluate(r).values


def test_evaluation_round_trips_through_json(scorer):
    ev = scorer.evaluate(recipe({"sort": 1.0}))
    assert Evaluation.from_dict(json.loads(json.dumps(ev.to_dict()))) == ev
    bad = Evaluation.failure("timeout: x", {"total": 1.0})
    assert Evaluation.from_dict(json.loads(json.dumps(bad.to_dict()))) == bad
    assert all(math.isfinite(v) for v in ev.values.values())



def test_warm_up_builds_the_recipes_sorts_first(zoo_dir, zoo_experts, zoo_objectives):
    """`warm_up` runs the engine's one-time sorts of its recipe before evaluating (side by side,
    `MergeEngine.build_sorts`) and reports their seconds; afterwards nothing is left to sort."""
    from evomerge.merge import MergeEngine

    engine = MergeEngine.load(zoo_dir / "base", zoo_experts, progress=False)  # its own: no table built yet
    rule = GroupRule(method="ties", experts={"rev": ExpertParams(weight=0.5, density=0.4),
                                             "sort": ExpertParams(weight=0.5, density=0.6)})
    r = MergeRecipe(rules=[rule])
    with TransformersScorer(engine, zoo_objectives[:1], batch_size=4, max_new_tokens=12) as s:
        warm = s.warm_up(r)
    assert not warm.failed and warm.timings["sorts"] > 0
    built = [t for t in engine._tables.values() if t._ranks is not None and t._ranks.built(True) is not None]
    assert len(built) == 2 * len(engine.layout.slots)  # every tensor of both experts that TIES prunes
    assert engine.build_sorts([r]) < 0.05  # nothing left to sort
