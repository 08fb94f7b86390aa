"""SearchSpace: structure, names, held parameters, and genome -> recipe -> genome round trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.merge import ExpertParams, GroupRule, MergeRecipe, ModelLayout
from evomerge.search import SearchSpace, SpaceTemplate
from evomerge.search._space import feasible_epsilon


def _layout(num_layers: int, tied: bool = False) -> ModelLayout:
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if tied else ["lm_head.weight"])
    for i in range(num_layers):
        names += [
            f"model.layers.{i}.self_attn.q_proj.weight",
            f"model.layers.{i}.self_attn.o_proj.weight",
            f"model.layers.{i}.mlp.up_proj.weight",
            f"model.layers.{i}.input_layernorm.weight",
        ]
    return ModelLayout.from_names(names)


EXPERTS = ["alpha", "beta", "gamma"]


@st.composite
def spaces(draw: st.DrawFn) -> SearchSpace:
    num_layers = draw(st.integers(1, 7))
    method = draw(st.sampled_from(["ties", "task_arithmetic", "slerp", "della", "linear"]))
    granularity = draw(st.sampled_from(["global", "layer", 2, 3]))
    groups = num_layers if granularity == "layer" else (1 if granularity == "global" else -(-num_layers // granularity))
    smoothing = draw(st.sampled_from([None, 2, 3])) if granularity != "global" else None
    if smoothing is not None and smoothing > groups:
        smoothing = None
    params = None if method != "della" else draw(st.sampled_from([None, ["weight", "density", "epsilon"]]))
    template = SpaceTemplate(
        method=method,
        params=params,
        # epsilon below every density: no decode caps it (`feasible_epsilon`), so the round trip is exact
        bounds={"epsilon": (0.0, 0.04), "density": (0.05, 0.95)} if params else {},
        granularity=granularity,
        modules=draw(st.sampled_from(["all", "split", [["attention"], ["mlp", "norm"]]])),
        sections=draw(st.sampled_from(["attach", "group"])),
        smoothing=smoothing,
        fixed=draw(st.sampled_from([{}, {"density": 0.7}])) if method in ("ties", "della") else {},
    )
    experts = EXPERTS[: draw(st.integers(1, 3))]
    return SearchSpace(_layout(num_layers, tied=draw(st.booleans())), experts, template)


@settings(max_examples=150, deadline=None)
@given(space=spaces(), data=st.data())
def test_decode_encode_round_trip(space: SearchSpace, data: st.DataObject) -> None:
    low, high = space.bounds
    unit = np.array(data.draw(st.lists(st.floats(0, 1), min_size=space.dim, max_size=space.dim)))
    x = low + unit * (high - low)
    recipe = space.decode(x, seed=3, trial=11)
    assert (recipe.seed, recipe.trial) == (3, 11)
    np.testing.assert_allclose(space.encode(recipe), x, atol=1e-9)
    # through JSON too: what the ledger stores is what encodes
    np.testing.assert_allclose(space.encode(MergeRecipe.from_json(recipe.to_json())), x, atol=1e-9)
    # every tensor of the layout is governed by a rule of the space's method
    for slot in space.layout.slots.values():
        rule = recipe.rule_for(slot.layer, slot.kind)
        assert rule is not None and rule.method == space.template.method


def test_names_and_x0_follow_the_template() -> None:
    space = SearchSpace(_layout(4), ["a", "b"], SpaceTemplate(method="ties", granularity=2, modules="split"))
    assert space.names[:4] == ["L0-1.attention.weight[a]", "L0-1.attention.weight[b]",
                               "L0-1.attention.density[a]", "L0-1.attention.density[b]"]
    low, high = space.bounds
    assert low[0] == -1.5 and high[0] == 1.5 and low[2] == 0.05 and high[2] == 1.0
    assert space.dim == len(space.names) == len(space.x0)
    # embed is attached to the first layer group, final norm and head to the last
    recipe = space.decode(space.x0)
    assert recipe.rule_for("embed", "embedding").layers == [0, 1, "embed"]
    assert recipe.rule_for("head", "head").layers == [2, 3, "final_norm", "head"]


def test_global_space_is_one_rule_and_sections_group_is_separate() -> None:
    space = SearchSpace(_layout(3), ["a", "b"], SpaceTemplate(method="task_arithmetic"))
    assert space.names == ["all.weight[a]", "all.weight[b]"]
    assert len(space.decode(space.x0).rules) == 1
    grouped = SearchSpace(_layout(3), ["a"], SpaceTemplate(method="task_arithmetic", sections="group"))
    assert grouped.names == ["all.weight[a]", "S.weight[a]"]


def test_held_parameters_leave_the_genome() -> None:
    full = SearchSpace(_layout(2), ["a", "b"], SpaceTemplate(method="ties", granularity="layer"))
    held = SearchSpace(_layout(2), ["a", "b"],
                       SpaceTemplate(method="ties", granularity="layer", fixed={"density": 0.6, "L1.weight[b]": -0.25}))
    assert held.dim == full.dim - 4 - 1
    recipe = held.decode(held.x0)
    assert recipe.rule_for(1, "mlp").experts["b"] == ExpertParams(weight=-0.25, density=0.6)
    # a recipe that breaks a held value is not expressible
    broken = MergeRecipe(rules=[GroupRule(method="ties", experts={"a": ExpertParams(density=0.5), "b": ExpertParams(density=0.6)})])
    with pytest.raises(ValueError):
        held.encode(broken)


def test_smoothing_interpolates_linearly_across_layers() -> None:
    space = SearchSpace(_layout(5), ["a"], SpaceTemplate(method="task_arithmetic", granularity="layer", smoothing=2))
    assert space.names == ["cp0.weight[a]", "cp1.weight[a]"]
    recipe = space.decode([0.0, 1.0])
    weights = [recipe.rule_for(i, "mlp").experts["a"].weight for i in range(5)]
    np.testing.assert_allclose(weights, [0.0, 0.25, 0.5, 0.75, 1.0])


def test_foreign_recipes_encode_when_expressible_and_fail_otherwise() -> None:
    space = SearchSpace(_layout(2), ["a", "b"], SpaceTemplate(method="ties", granularity="layer"))
    # a global recipe resolves to the same values in every cell: expressible
    flat = MergeRecipe(rules=[GroupRule(method="ties", experts={"a": ExpertParams(weight=0.3, density=0.4),
                                                               "b": ExpertParams(weight=-1.0, density=0.9)})])
    x = space.encode(flat)
    assert space.describe(x)["L1.weight[b]"] == -1.0
    with pytest.raises(ValueError, match="not merged with"):
        space.encode(flat.model_copy(update={"rules": [flat.rules[0].model_copy(update={"method": "dare_ties"})]}))
    with pytest.raises(ValueError, match="outside"):
        space.encode(MergeRecipe(rules=[GroupRule(method="ties", experts={"a": ExpertParams(weight=3.0), "b": ExpertParams()})]))
    with pytest.raises(ValueError, match="normalize"):
        space.encode(flat.model_copy(update={"normalize": False}))


def test_invalid_templates_are_rejected() -> None:
    with pytest.raises(ValueError, match="default parameter kinds"):
        SpaceTemplate(method="my_method")
    with pytest.raises(ValueError, match="density"):
        SpaceTemplate(method="ties", bounds={"density": (0.0, 1.5)})
    with pytest.raises(ValueError, match="smoothing"):
        SpaceTemplate(method="ties", smoothing=3)
    with pytest.raises(ValueError, match="exceed"):
        SearchSpace(_layout(2), ["a"], SpaceTemplate(method="ties", granularity="layer", smoothing=3))
    with pytest.raises(ValueError, match="unknown parameter"):
        SearchSpace(_layout(2), ["a"], SpaceTemplate(method="ties", fixed={"L9.weight[a]": 1.0}))


def test_fingerprint_tracks_meaning() -> None:
    a = SearchSpace(_layout(2), ["a", "b"], SpaceTemplate(method="ties"))
    assert a.fingerprint() == SearchSpace(_layout(2), ["a", "b"], SpaceTemplate(method="ties")).fingerprint()
    assert a.fingerprint() != SearchSpace(_layout(2), ["b", "a"], SpaceTemplate(method="ties")).fingerprint()
    assert a.fingerprint() != SearchSpace(_layout(2), ["a", "b"], SpaceTemplate(method="ties", granularity=1)).fingerprint()


def test_della_epsilon_is_capped_to_fit_its_density() -> None:
    """density ± epsilon must stay inside (0, 1) (mergekit refuses it otherwise): a box cannot say
    so, so decoding caps epsilon and every genome of the box is a valid DELLA recipe."""
    space = SearchSpace(_layout(3), ["a", "b"], SpaceTemplate(method="della", params=["weight", "density", "epsilon"]))
    low, high = space.bounds
    x = np.where([".density" in n for n in space.names], low, high)  # smallest densities, largest epsilons
    recipe = space.decode(x)
    for rule in recipe.rules:
        for p in rule.experts.values():
            assert p.density == pytest.approx(0.05) and p.epsilon == pytest.approx(0.99 * 0.05)
            assert 0.0 < p.density - p.epsilon and p.density + p.epsilon < 1.0
    x[[".density" in n for n in space.names]] = 0.9  # near the top end the other bound caps it
    assert [p.epsilon for rule in space.decode(x).rules for p in rule.experts.values()] == pytest.approx([0.99 * 0.1] * 2)
    assert space.decode(space.encode(recipe)) == recipe  # a capped recipe is its own fixed point
    assert feasible_epsilon(1.0, 0.3) == 0.3 and feasible_epsilon(0.5, 0.2) == 0.2


@pytest.mark.parametrize(("template", "message"), [
    (dict(method="dare_ties", params=["weight", "density", "epsilon"]), r"params: method 'dare_ties' does not read epsilon"),
    (dict(method="task_arithmetic", params=["weight", "density"]), r"does not read density; remove it \(it reads weight\)"),
    (dict(method="ties", params=["weight"], fixed={"density": 0.3}), r"fixed: 'density' is not among the searched kinds"),
    (dict(method="ties", params=["weight", "density"], fixed={"density": 1.7}), r"fixed: density 1.7 must lie in \[0.0, 1.0\]"),
])
def test_kinds_a_method_ignores_and_held_values_out_of_range_are_refused(template: dict, message: str) -> None:
    """Each was accepted and then failed every trial (a traceback) or was silently ignored."""
    with pytest.raises(ValueError, match=message):
        SpaceTemplate(**template)


def test_della_reads_epsilon_and_a_held_searched_kind_is_accepted() -> None:
    assert SpaceTemplate(method="della", params=["weight", "density", "epsilon"]).searched_kinds == ("weight", "density", "epsilon")
    assert SpaceTemplate(method="ties", params=["weight", "density"], fixed={"density": 0.3}).fixed == {"density": 0.3}
