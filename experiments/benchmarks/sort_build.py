"""The one-time sorts of a run (exact pruning's orders, DELLA's row ranks): one at a time vs side by side.

`MergeEngine.build_sorts` runs at warm-up every sort the run's recipes read. Before it, each sort
ran inside the first merge, one tensor after another, and torch sorts a flat tensor on one thread.
This times, on `merge_speed`'s synthetic bf16 Llama, `build_sorts(threads=1)` (that sequential
order: the real peer) against `build_sorts(threads=N)`, interleaved round by round on fresh tables,
checks that both build the same permutations, and prints the ratio and the memory the sorts keep.

    python -m evomerge.experiments.benchmarks.sort_build                      # 50M, 3 experts, TIES + DELLA
    python -m evomerge.experiments.benchmarks.sort_build --size 500M --rounds 2
    python -m evomerge.experiments.benchmarks.sort_build --methods ties,breadcrumbs_ties --threads 4
    python -m evomerge.experiments.benchmarks.sort_build --methods ties --spill ~/.cache/evomerge/sorts
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from evomerge.experiments.benchmarks.merge_speed import SIZES, per_layer_recipe, synthetic_llama
from evomerge.merge import MergeEngine, fixed_mmap_threshold


def _fingerprint(order: torch.Tensor) -> int:
    """A position-weighted sum of a permutation or rank tensor: two orders of the same entries that
    differ anywhere give different sums (kept instead of the tensors: a 0.5B model's are 12 GB)."""
    flat = order.reshape(-1).to(torch.int64)
    return int((flat * torch.arange(1, flat.numel() + 1, dtype=torch.int64)).sum())


def _built(engine: MergeEngine) -> tuple[dict[tuple[str, str], list[int]], int, int]:
    """Per (expert, tensor) the fingerprints of its built sorts (both directions' permutations, the
    row ranks), and their entries and bytes in all."""
    built, entries, nbytes = {}, 0, 0
    for key, table in engine._tables.items():
        ranks = table._ranks
        parts = [] if ranks is None else [p for p in (ranks.built(True), ranks.built(False)) if p is not None]
        if table._row_ranks is not None:
            parts.append(table._row_ranks)
        built[key] = [_fingerprint(p) for p in parts]
        entries += sum(p.numel() for p in parts)
        nbytes += sum(p.numel() * p.element_size() for p in parts)
    return built, entries, nbytes


def run(size: str, num_experts: int, methods: list[str], threads: int, rounds: int,
        spill: Path | None = None) -> dict[str, float]:
    """Sequential vs parallel `build_sorts` (and, with `spill`, parallel with the exact orders
    mapped from files there, as when memory is short), `rounds` interleaved rounds on fresh tables."""
    result: dict[str, float] = {"threads": threads}
    variants: dict[str, dict] = {"one_at_a_time": {"threads": 1}, "side_by_side": {"threads": threads}}
    if spill is not None:  # memory just short of what the sorts keep (set after the first build)
        variants["side_by_side_mapped"] = {"threads": threads, "spill_dir": spill}
    with tempfile.TemporaryDirectory() as tmp:
        base, experts = synthetic_llama(Path(tmp), num_experts, torch.bfloat16, size=size)
        engine = MergeEngine.load(base, experts, progress=False)
        result["params_m"] = engine.num_params / 1e6
        recipes = [per_layer_recipe(m, list(experts), engine.layout.num_layers) for m in methods]
        times: dict[str, list[float]] = {name: [] for name in variants}
        reference: dict[tuple[str, str], list[int]] | None = None
        for _ in range(rounds):
            for name, options in variants.items():
                engine._tables.clear()  # fresh tables: every sort runs again
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the mapped variant's notice
                    engine.build_sorts(recipes, **options)
                times[name].append(time.perf_counter() - start)
                built, entries, nbytes = _built(engine)
                if reference is None:
                    reference = built
                    result["kept_gb"], result["sorted_entries_m"] = nbytes / 1e9, entries / 1e6
                    if spill is not None:  # available = what the sorts keep: above 90% of it, so mapped
                        variants["side_by_side_mapped"]["available"] = nbytes
                elif built != reference:
                    raise SystemExit(f"{name} built different sorts than one at a time")
        for name in variants:
            result[f"{name}_s"] = statistics.median(times[name])
        result["speedup"] = result["one_at_a_time_s"] / result["side_by_side_s"]
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="50M", choices=sorted(SIZES))
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--methods", default="ties,della", help="comma-separated methods whose sorts are built")
    parser.add_argument("--threads", type=int, default=None, help="side-by-side sorts (default: torch's threads)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spill", type=Path, default=None,
                        help="also time the side-by-side sorts with the exact orders mapped from files in this folder")
    args = parser.parse_args(argv)
    fixed_mmap_threshold()  # as the CLI does before it loads
    threads = args.threads or torch.get_num_threads()
    if threads < 2:
        raise SystemExit("one thread: nothing to compare (pass --threads 2 or more)")
    result = run(args.size, args.experts, args.methods.split(","), threads, args.rounds, args.spill)
    print(f"synthetic Llama {args.size}: {result['params_m']:.1f}M params, {args.experts} experts, methods {args.methods}: "
          f"{result['sorted_entries_m']:.0f}M sorted entries, {result['kept_gb']:.2f} GB kept for the run")
    print(f"  one at a time (threads=1) {result['one_at_a_time_s']:.2f} s | side by side (threads={threads}) "
          f"{result['side_by_side_s']:.2f} s | {result['speedup']:.2f}x faster (medians of {args.rounds} interleaved rounds; "
          f"same permutations and ranks)")
    if args.spill is not None:
        print(f"  side by side, exact orders mapped from files in {args.spill}: {result['side_by_side_mapped_s']:.2f} s "
              f"({result['side_by_side_mapped_s'] / result['side_by_side_s']:.2f}x the in-memory build)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
