"""Search overhead of one process: optimizer + ledger time per trial, against evaluations of
realistic length.

Each optimizer runs a real search (`run_search` on the journal ledger; per-layer TIES over all
experts of the zoo, scored by the real `TransformersScorer` on calibration items of every skill).
Every evaluation is then stretched to ``--eval-seconds`` by a sleep-free CPU load (float64
matrix products, so the cores are as busy as during a real evaluation, and the loop's writes and
fsyncs compete with it as they would). Printed per optimizer: the mean evaluation time, the mean
search-side time per trial (`SearchResult.overheads`: claim, the optimizer's ask/tell and
checkpoint, decode, the ledger's writes and fsync, the archive) and their ratio.

    python -m evomerge.experiments.benchmarks.search_overhead --size small --eval-seconds 5 --trials 12

Target (issue 15): <= 1% of the evaluation time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from evomerge.experiments.zoo import build_zoo, load_manifest
from evomerge.merge import MergeEngine, MergeRecipe
from evomerge.objectives import CalibrationSet, Evaluation, Objective, TransformersScorer
from evomerge.search import Ledger, SearchSpace, SpaceTemplate, make_optimizer, run_search

DEFAULT_OPTIMIZERS = ("nevergrad:CMA", "optuna:tpe", "random")


class Stretched:
    """The real scorer, each evaluation topped up to ``seconds`` wall time with CPU work."""

    def __init__(self, scorer: TransformersScorer, seconds: float) -> None:
        self.scorer, self.seconds = scorer, seconds
        self._a = np.random.default_rng(0).standard_normal((192, 192))

    def evaluate(self, recipe: MergeRecipe) -> Evaluation:
        start = time.perf_counter()
        evaluation = self.scorer.evaluate(recipe)
        while time.perf_counter() - start < self.seconds:
            self._a = np.tanh(self._a @ self._a.T / 192.0)
        return evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--eval-seconds", type=float, default=5.0, help="wall time of one evaluation (>= the real one)")
    parser.add_argument("--calib-size", type=int, default=16, help="calibration items per skill")
    parser.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS))
    args = parser.parse_args()

    zoo = build_zoo(args.size, seed=0, arch="llama", progress=False)
    manifest = load_manifest(zoo)
    skills = manifest["skills"]
    engine = MergeEngine.load(zoo / "base", {s: zoo / manifest["experts"][s] for s in skills}, progress=False)
    objectives = []
    for skill in skills:
        calib = CalibrationSet.load(zoo / "data" / skill / "calib.jsonl", name=skill, size=args.calib_size)
        objectives.append(Objective(f"{skill}_acc", "exact_match", calibration=calib))
    real = TransformersScorer(engine, objectives)
    scorer = Stretched(real, args.eval_seconds)
    space = SearchSpace(engine.layout, engine.expert_names, SpaceTemplate(method="ties", granularity="layer"))
    print(f"zoo {args.size}: {len(skills)} experts, {engine.layout.num_layers} layers, genome of {space.dim}, "
          f"{len(objectives)} objectives, {args.trials} trials per optimizer, evaluations of {args.eval_seconds:g} s")
    print(f"{'optimizer':20} {'eval s':>8} {'overhead ms':>12} {'max ms':>8} {'overhead %':>11}")
    for spec in args.optimizers:
        with tempfile.TemporaryDirectory() as run_dir:
            ledger = Ledger(Path(run_dir), objectives=objectives, seed=0, space=space.to_dict())
            result = run_search(space, scorer, make_optimizer(spec), ledger, budget_evals=args.trials, progress=False)
            per_eval = result.evaluation_seconds / result.n_new
            print(f"{spec:20} {per_eval:8.3f} {1000 * statistics.mean(result.overheads):12.1f} "
                  f"{1000 * max(result.overheads):8.1f} {100 * result.overhead_ratio:10.2f}%", flush=True)
    real.close()


if __name__ == "__main__":
    main()
