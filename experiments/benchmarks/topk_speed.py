"""Exact vs approximate magnitude pruning: what mergekit's exact top-k costs per candidate.

Per-layer TIES and Breadcrumbs-TIES merges of the synthetic ~0.5B Llama (bf16, `merge_speed`'s
model) applied in place, `pruning: exact` (mergekit's entries, tie-breaking included: rank tables,
the plain thresholds, then the split tie groups' members merged again with their decisions flipped,
`_fused._refix`) against `pruning: approximate` (thresholds interpolated from
sampled order statistics, ties at the threshold all kept), interleaved round by round in one
process so machine load hits both alike; medians and their ratio are printed. The one-time cost
of the exact path (mergekit's sort, once per task vector and direction) and its memory are
reported separately: they are paid at the first candidate, not per candidate.

    python -m evomerge.experiments.benchmarks.topk_speed                 # 0.5B, 2 experts, 3 rounds
    python -m evomerge.experiments.benchmarks.topk_speed --layers 4      # ~0.1B, quick
    python -m evomerge.experiments.benchmarks.topk_speed --experts 3 --rounds 5
    python -m evomerge.experiments.benchmarks.topk_speed --threads 1    # on a loaded machine (see below)

On a shared machine (load above the core count) torch's 2-thread kernels wait for a descheduled
thread on every op: a 20k-entry gather measured 29 ms with 2 threads and 0.6 ms with 1, which
swamps small per-tensor ops; `--threads 1` measures the work instead. Wall and process CPU time
are both reported (CPU time: the steadier figure on a shared machine).

Acceptance (issue 17): exact <= 1.5x approximate per apply at 0.5B parameters.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from evomerge.experiments.benchmarks.merge_speed import per_layer_recipe, synthetic_llama
from evomerge.merge import MergeEngine, MergeRecipe, fixed_mmap_threshold


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _both(fn) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(wall, process CPU) seconds of one call: CPU time leaves out the time other processes held
    the cores of a shared machine (with one torch thread it is this process's work)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(num_layers: int, num_experts: int, rounds: int, methods: list[str]) -> dict[str, float]:
    """Build the model, time first applies, then `rounds` interleaved rounds; returns the figures."""
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base, experts = synthetic_llama(Path(tmp), num_experts, torch.bfloat16, num_layers=num_layers)
        engine = MergeEngine.load(base, experts, progress=False)
        result["params_m"] = engine.num_params / 1e6
        target = engine.new_target_model()
        names = list(experts)
        recipes: dict[str, MergeRecipe] = {}
        for method in methods:
            plan = per_layer_recipe(method, names, engine.layout.num_layers)  # breadcrumbs: gamma 0.01
            for pruning in ("approximate", "exact"):
                recipes[f"{method}/{pruning}"] = plan.model_copy(update={"pruning": pruning})
        for key, recipe in recipes.items():  # tables, rank permutations, kernel compiles
            result[f"{key}_first_s"] = _timed(lambda: engine.apply(recipe, target, stats=False))
        rank_bytes = sum(t._ranks.nbytes for t in engine._tables.values() if t._ranks is not None)
        result["rank_tables_gb"] = rank_bytes / 1e9
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in recipes}
        for _ in range(rounds):
            for key, recipe in recipes.items():
                times[key].append(_both(lambda: engine.apply(recipe, target, stats=False)))
        for key, values in times.items():
            result[f"{key}_s"] = statistics.median(w for w, _ in values)
            result[f"{key}_cpu_s"] = statistics.median(c for _, c in values)
        for method in methods:
            result[f"{method}_exact_over_approximate"] = (result[f"{method}/exact_s"]
                                                         / result[f"{method}/approximate_s"])
            result[f"{method}_exact_over_approximate_cpu"] = (result[f"{method}/exact_cpu_s"]
                                                             / result[f"{method}/approximate_cpu_s"])
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=34, help="decoder layers (34 = 0.47B parameters)")
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default="ties,breadcrumbs_ties")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fixed_mmap_threshold()  # as the CLI does before it loads (merge_speed too)
    result = run(args.layers, args.experts, args.rounds, args.methods.split(","))
    for key, value in result.items():
        print(f"{key:45s} {value:10.3f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
