"""Search overhead: optimizer ask + tell, decode, ledger writes and checkpoints vs evaluation time.

Runs a real search (TransformersScorer on calibration items of every skill, per-layer TIES over all
experts) for each optimizer and prints, per optimizer, the mean evaluation time, the mean
search-side time per trial and their ratio, measured two ways:

* ``total``: everything `run_search` spends outside ``scorer.evaluate`` (ask, decode, ledger
  write, tell + checkpoint, Pareto archive), from `SearchResult.overhead_seconds`;
* ``recorded``: the per-trial ``timings["search_overhead"]`` the ledger stores (ask share and
  decode: the part known before the trial is written).

    python -m evomerge.experiments.benchmarks.search_overhead --size small

Acceptance (issue "Search"): total overhead <= 2% of evaluation time on the small zoo.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from evomerge.experiments.zoo import build_zoo, load_manifest
from evomerge.merge import MergeEngine
from evomerge.objectives import CalibrationSet, Objective, TransformersScorer
from evomerge.search import Ledger, SearchSpace, SpaceTemplate, make_optimizer, run_search

DEFAULT_OPTIMIZERS = ("nevergrad:CMA", "nevergrad:TwoPointsDE", "optuna:tpe", "optuna:nsga2", "random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--calib-size", type=int, default=16, help="calibration items per skill")
    parser.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS))
    parser.add_argument("--batch-size", type=int, default=4, help="candidates per ask (durability cost is per batch)")
    args = parser.parse_args()

    zoo = build_zoo(args.size, seed=0, arch="llama", progress=False)
    manifest = load_manifest(zoo)
    skills = manifest["skills"]
    engine = MergeEngine.load(zoo / "base", {s: zoo / manifest["experts"][s] for s in skills}, progress=False)
    objectives = []
    for skill in skills:
        calib = CalibrationSet.load(zoo / "data" / skill / "calib.jsonl", name=skill, size=args.calib_size)
        objectives.append(Objective(f"{skill}_acc", "exact_match", calibration=calib))
    scorer = TransformersScorer(engine, objectives)
    space = SearchSpace(engine.layout, engine.expert_names, SpaceTemplate(method="ties", granularity="layer"))
    print(f"zoo {args.size}: {len(skills)} experts, {engine.layout.num_layers} layers, genome of {space.dim}, "
          f"{len(objectives)} objectives, {args.trials} trials per optimizer, batches of {args.batch_size}")
    print(f"{'optimizer':24} {'eval s':>8} {'overhead s':>11} {'total %':>8} {'recorded %':>11}")
    for spec in args.optimizers:
        with tempfile.TemporaryDirectory() as run_dir:
            ledger = Ledger(Path(run_dir), objectives=objectives, seed=0, space=space.to_dict())
            result = run_search(space, scorer, make_optimizer(spec), ledger, budget_evals=args.trials,
                                batch_size=args.batch_size, progress=False)
            recorded = sum(t.user_attrs["timings"]["search_overhead"] for t in ledger.finished())
            per_eval = result.evaluation_seconds / result.n_new
            print(f"{spec:24} {per_eval:8.3f} {statistics.mean(result.overheads):11.4f} "
                  f"{100 * result.overhead_ratio:7.2f}% {100 * recorded / result.evaluation_seconds:10.2f}%")
    scorer.close()


if __name__ == "__main__":
    main()
