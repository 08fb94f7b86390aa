"""SearchSpace.fit: the nearest genome to a recipe made elsewhere, with a note for every misfit."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.merge import ExpertParams, GroupRule, MergeRecipe, ModelLayout
from evomerge.search import SearchSpace, SpaceTemplate

from .test_space import EXPERTS, _layout


def _space(**template) -> SearchSpace:
    return SearchSpace(_layout(4), EXPERTS[:2], SpaceTemplate(**{"method": "ties", "granularity": 2, **template}))


def test_an_expressible_recipe_fits_exactly_like_encode() -> None:
    space = _space()
    x = space.x0 + np.linspace(-0.3, 0.3, space.dim) * (space.bounds[1] - space.bounds[0]) / 4
    recipe = space.decode(x)
    genome, notes = space.fit(recipe)
    assert notes == []
    np.testing.assert_allclose(genome, space.encode(recipe), atol=1e-9)
    np.testing.assert_allclose(genome, x, atol=1e-9)


def test_misfits_are_averaged_clipped_and_named() -> None:
    space = _space(bounds={"weight": (-1.0, 1.0)}, fixed={"L2-3.density[alpha]": 0.5})
    rules = [
        GroupRule(method="dare_ties", experts={"alpha": ExpertParams(weight=0.4, density=0.7), "beta": ExpertParams(weight=0.2, density=0.9)}),
        GroupRule(layers=[1], method="dare_ties", experts={"alpha": ExpertParams(weight=0.8, density=0.7)}),  # beta absent: weight 0
        GroupRule(layers=[3], method="dare_ties", experts={"alpha": ExpertParams(weight=3.0, density=0.3), "beta": ExpertParams(weight=0.2, density=0.9)}),
    ]
    genome, notes = space.fit(MergeRecipe(rules=rules, normalize=False))
    params = space.describe(genome)
    # Means over the cell's slots: L0-1 = layer 0 (attention, mlp, norm) + embed, and layer 1's three;
    # L2-3 = layers 2 and 3 (three each) + final_norm + head (the sections follow their nearest layers).
    assert params["L0-1.weight[alpha]"] == pytest.approx((4 * 0.4 + 3 * 0.8) / 7)
    assert params["L0-1.weight[beta]"] == pytest.approx((4 * 0.2 + 3 * 0.0) / 7)  # absent in layer 1: weight 0
    assert params["L2-3.weight[alpha]"] == 1.0  # (5 * 0.4 + 3 * 3.0) / 8 = 1.375, clipped to the bound
    assert "L2-3.density[alpha]" not in params  # held
    text = " | ".join(notes)
    assert "normalize=False differs from the space's True" in text
    assert "method dare_ties differs from the space's 'ties'" in text
    assert "averaged over layers/modules the space groups together: L0-1.density[beta], L0-1.weight[alpha], L0-1.weight[beta], L2-3.density[alpha], L2-3.weight[alpha]" in text
    assert "L2-3.density[alpha] = 0.55 but the space holds it at 0.5" in text  # (5 * 0.7 + 3 * 0.3) / 8
    assert "clipped to the bounds: L2-3.weight[alpha] = 1.375 -> 1" in text


def test_fitted_values_become_the_starting_point() -> None:
    space = _space()
    recipe = MergeRecipe(rules=[GroupRule(method="ties", experts={"alpha": ExpertParams(weight=0.9, density=0.3),
                                                                   "beta": ExpertParams(weight=0.1, density=0.6)})])
    genome, _ = space.fit(recipe)
    started = SearchSpace(space.layout, space.experts, space.template.model_copy(update={"init": space.describe(genome)}))
    np.testing.assert_allclose(started.x0, genome)
    with pytest.raises(ValueError, match=r"init: unknown parameter names \['L9.weight\[alpha\]'\]"):
        SearchSpace(space.layout, space.experts, space.template.model_copy(update={"init": {"L9.weight[alpha]": 0.1}}))
