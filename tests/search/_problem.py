"""The real search problem the search tests run: two tiny-zoo experts merged with TIES per layer,
scored by the real `TransformersScorer` on a few calibration items (teacher-forced answer loss
on the `rev` skill) plus the merge's L1 distance to the base. Evaluations take tens of
milliseconds, and are deterministic on CPU, so seeded searches repeat exactly."""

from __future__ import annotations

from pathlib import Path

from evomerge.merge import MergeEngine
from evomerge.objectives import CalibrationSet, Objective, TransformersScorer
from evomerge.search import SearchSpace, SpaceTemplate

EXPERTS = ("rev", "sort")


def build_problem(zoo: Path, *, method: str = "ties", granularity: int | str = 1, items: int = 4):
    """(engine, scorer, space) for the tiny zoo."""
    # eager merges: the fused kernels' compile (seconds per process) would fall after the SIGKILL
    # tests' `ready`, where most kills would land, instead of amid trials; merges are tested elsewhere
    engine = MergeEngine.load(zoo / "base", {s: zoo / "experts" / s for s in EXPERTS}, progress=False, compile=False)
    calib = CalibrationSet.load(zoo / "data" / "rev" / "calib.jsonl", name="rev", size=items)
    objectives = [Objective("rev_loss", "answer_loss", calibration=calib), Objective("l1", "l1_distance")]
    scorer = TransformersScorer(engine, objectives, batch_size=items)
    space = SearchSpace(engine.layout, engine.expert_names, SpaceTemplate(method=method, granularity=granularity))
    return engine, scorer, space
