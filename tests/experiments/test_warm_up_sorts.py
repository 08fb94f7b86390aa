"""A run's one-time sorts cover every tensor a candidate may prune, before the first trial."""

from __future__ import annotations

from pathlib import Path

from evomerge.experiments._build import build_engine
from evomerge.experiments._run import _sorting_recipes
from evomerge.experiments._spec_io import validate_spec
from evomerge.experiments.zoo import cache_root


def test_sorts_are_built_for_densities_the_space_can_reach_even_from_a_dense_start(tiny_zoo: Path, tmp_path: Path) -> None:
    """The starting point keeps everything (density 1), so warming up on it sorts nothing; the
    recipe at the middle of the bounds prunes, so exact TIES' sorts are built before the first
    trial, not inside the first timed one that prunes. A space that holds density at 1 sorts nothing."""
    def spec(params: list[str]):
        return validate_spec({
            "name": "t",
            "models": {"base": str(tiny_zoo / "base"), "experts": {s: str(tiny_zoo / "experts" / s) for s in ("rev", "sort")}},
            "space": {"method": "ties", "params": params, "granularity": "layer",
                      "bounds": {"density": [0.2, 1.0]}, "init": {"density": 1.0}},
            "objectives": [{"name": "rev", "metric": "exact_match", "data": str(tiny_zoo / "data" / "rev" / "calib.jsonl"), "size": 4}],
            "optimizer": {"library": "optuna", "name": "tpe"},
            "budget": {"evaluations": 2},
        }, root=tmp_path, label="spec.yaml")

    pruning = spec(["weight", "density"])
    engine = build_engine(pruning, progress=False)
    assert engine.spill_dir == cache_root() / "sorts"  # exports and runs map orders from the cache's disk when short
    recipes = _sorting_recipes(pruning, engine)
    densities = {p.density for r in recipes for rule in r.rules for p in rule.experts.values()}
    assert densities == {0.6}
    assert engine.build_sorts(recipes) > 0
    built = [t for t in engine._tables.values() if t._ranks is not None and t._ranks.built(True) is not None]
    assert len(built) == 2 * len(engine.layout.slots)

    dense = spec(["weight"])  # density held at its start, 1
    engine = build_engine(dense, progress=False)
    engine.build_sorts(_sorting_recipes(dense, engine))
    assert not any(t._ranks is not None for t in engine._tables.values())
