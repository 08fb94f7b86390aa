"""Search overhead of one process: optimizer + ledger time per trial, against evaluations of
realistic length.

Each optimizer runs a real search (`run_search` on the journal ledger; per-layer TIES over all
experts of the zoo, scored by the real `TransformersScorer` on calibration items of every skill).
Every evaluation is then stretched to ``--eval-seconds`` by a sleep-free CPU load (float64
matrix products, so the cores are as busy as during a real evaluation, and the loop's writes and
fsyncs compete with it as they would). Printed per optimizer: the mean evaluation time, the mean
search-side time per trial (`SearchResult.overheads`: claim, the optimizer's ask/tell and
checkpoint, decode, the ledger's writes and fsync, the archive), the same over the last half of the
trials (past the samplers' random start: TPE models the history from its 11th trial on, and its cost
grows with the history), and the loop thread's CPU time per trial over the last half (between two
evaluations it does only the search's work; on a shared machine other jobs inflate wall time
several-fold but not CPU time) over ``--eval-seconds``, the nominal evaluation length: the target's
figure. For optuna samplers a second row, "sampler alone": the same sampler's ``ask`` + ``tell`` on an
in-memory study fed the run's values, CPU per trial over the last half: optuna's own share, which
no ledger can undercut.

    python -m evomerge.experiments.benchmarks.search_overhead --size small --eval-seconds 5 --trials 40

Target (issue 15): <= 1% of the evaluation time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

from evomerge.experiments.zoo import build_zoo, load_manifest
from evomerge.merge import MergeEngine, MergeRecipe
from evomerge.objectives import CalibrationSet, Evaluation, Objective, TransformersScorer
from evomerge.search import Ledger, SearchSpace, SpaceTemplate, make_optimizer, run_search
from evomerge.search._optimizers._base import genome_distributions
from evomerge.search._optimizers._optuna import _make_sampler

DEFAULT_OPTIMIZERS = ("nevergrad:CMA", "optuna:tpe", "random")


class Stretched:
    """The real scorer, each evaluation topped up to ``seconds`` wall time with CPU work."""

    def __init__(self, scorer: TransformersScorer, seconds: float) -> None:
        self.scorer, self.seconds = scorer, seconds
        self._a = np.random.default_rng(0).standard_normal((192, 192))
        self.cpu_marks: list[tuple[float, float]] = []
        """CPU time of the loop's thread at the start and end of each evaluation: between two
        evaluations it does only the search's own work, so the gaps are its CPU time per trial,
        which other jobs on a shared machine do not inflate as they do wall time (the thread's, not
        the process's: torch's idle worker threads spin for a while after each evaluation)."""

    def evaluate(self, recipe: MergeRecipe) -> Evaluation:
        start, cpu = time.perf_counter(), time.thread_time()
        evaluation = self.scorer.evaluate(recipe)
        while time.perf_counter() - start < self.seconds:
            self._a = np.tanh(self._a @ self._a.T / 192.0)
        self.cpu_marks.append((cpu, time.thread_time()))
        return evaluation

    def search_cpu(self) -> list[float]:
        """CPU seconds of the search between consecutive evaluations (one per trial after the first)."""
        marks, self.cpu_marks = self.cpu_marks, []
        return [start - end for (_, end), (start, _) in zip(marks, marks[1:])]


def sampler_alone(spec: str, space: SearchSpace, history: list[list[float]], directions: list[str]) -> list[float]:
    """CPU seconds per trial of an optuna sampler by itself: ``ask`` with the genome and
    ``tell`` of the real run's values, on an in-memory study. It is the part of the overhead that is
    optuna's own (a lower bound for the loop's, which adds the ledger, the decode and the archive)."""
    study = optuna.create_study(directions=directions, sampler=_make_sampler(spec.partition(":")[2], 0, {}, workers=False))
    distributions = genome_distributions(space)
    cpu = []
    for values in history:
        start = time.thread_time()
        study.tell(study.ask(distributions), values)
        cpu.append(time.thread_time() - start)
    return cpu


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
    print(f"{'optimizer':20} {'eval s':>8} {'overhead ms':>12} {'last half ms':>13} {'max ms':>8} "
          f"{'last half CPU ms':>17} {'CPU / eval':>11}")
    for spec in args.optimizers:
        with tempfile.TemporaryDirectory() as run_dir:
            ledger = Ledger(Path(run_dir), objectives=objectives, seed=0, space=space.to_dict())
            result = run_search(space, scorer, make_optimizer(spec), ledger, budget_evals=args.trials, progress=False)
            per_eval = result.evaluation_seconds / result.n_new
            steady = statistics.mean(result.overheads[len(result.overheads) // 2:])
            cpu = scorer.search_cpu()
            steady_cpu = statistics.mean(cpu[len(cpu) // 2:])
            nominal = args.eval_seconds or per_eval
            print(f"{spec:20} {per_eval:8.3f} {1000 * statistics.mean(result.overheads):12.1f} {1000 * steady:13.1f} "
                  f"{1000 * max(result.overheads):8.1f} {1000 * steady_cpu:17.1f} {100 * steady_cpu / nominal:10.2f}%",
                  flush=True)
            if spec.startswith("optuna:"):
                history = [list(t.values) for t in ledger.trials() if t.values is not None]
                alone = sampler_alone(spec, space, history, [d.name.lower() for d in ledger.study.directions])
                steady_alone = statistics.mean(alone[len(alone) // 2:])
                print(f"{'  sampler alone':20} {'':8} {'':12} {'':13} {'':8} {1000 * steady_alone:17.1f} "
                      f"{100 * steady_alone / nominal:10.2f}%", flush=True)
    real.close()


if __name__ == "__main__":
    main()
