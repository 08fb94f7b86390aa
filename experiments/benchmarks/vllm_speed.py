"""vLLM scorer speed: engine start, first candidate, then per candidate merge / swap / inference.

Runs the `VllmScorer` (one `vllm.LLM` whose worker merges each recipe and swaps it in place) on a
cached toy zoo, then the `TransformersScorer` on the same candidates in the same run, and prints
both. It needs an importable vLLM: on these CPU machines the CPU build beside the repository
(README, "The vLLM scorer, tested on CPU"):

    .venv-vllm/bin/python -m evomerge.experiments.benchmarks.vllm_speed --size tiny

fp32 by default, because on the CPU build only fp32 matches the transformers backend exactly; the
figures of a CPU build say how the swap path behaves, not how fast vLLM is on a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Sequence

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: starts in seconds
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from evomerge.experiments.benchmarks.scoring_speed import make_objectives, random_recipes  # noqa: E402
from evomerge.experiments.zoo import build_zoo, load_manifest  # noqa: E402
from evomerge.merge import MergeEngine  # noqa: E402
from evomerge.objectives import Evaluation, TransformersScorer, VllmScorer  # noqa: E402


def _summary(label: str, evaluations: list[Evaluation]) -> str:
    def median(key: str) -> float:
        return statistics.median(e.timings.get(key, 0.0) for e in evaluations)

    return (f"{label}: per candidate (median of {len(evaluations)}) total {median('total'):.3f} s = merge "
            f"{median('merge'):.4f} + swap {median('swap'):.4f} + inference {median('inference'):.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"], help="zoo size (its head_dim is 32)")
    parser.add_argument("--candidates", type=int, default=6, help="candidates timed after the first")
    parser.add_argument("--calib-size", type=int, default=16, help="calibration items per skill")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)

    zoo = build_zoo(args.size, seed=0, arch="llama", progress=False)
    manifest = load_manifest(zoo)
    skills = manifest["skills"]
    experts = {s: zoo / manifest["experts"][s] for s in skills}
    objectives = make_objectives(zoo, skills, args.calib_size)
    recipes = random_recipes(list(skills), args.candidates + 1, seed=0)

    start = time.perf_counter()
    scorer = VllmScorer(zoo / "base", experts, objectives, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                        max_model_len=256, allow_cpu=True)
    started = time.perf_counter() - start
    try:
        start = time.perf_counter()
        first = scorer.evaluate(recipes[0])
        first_s = time.perf_counter() - start
        runs = [scorer.evaluate(r) for r in recipes[1:]]
    finally:
        scorer.close()
    failed = [e.reason for e in [first, *runs] if e.failed]
    if failed:
        raise SystemExit(f"vllm_speed: {len(failed)} evaluations failed, first: {failed[0]}")

    engine = MergeEngine.load(zoo / "base", experts, progress=False)
    with TransformersScorer(engine, objectives, max_new_tokens=args.max_new_tokens) as hf:
        hf.evaluate(recipes[0])  # warm-up, as the vLLM engine's first candidate
        hf_runs = [hf.evaluate(r) for r in recipes[1:]]

    print(f"zoo {args.size}, {len(skills)} experts, {len(objectives)} objectives x {args.calib_size} items, {args.dtype}")
    print(f"vLLM engine start (LLM + the worker's MergeEngine): {started:.1f} s")
    print(f"first candidate (one-time compiles): {first_s:.1f} s")
    print(_summary("vLLM        ", runs))
    print(_summary("transformers", hf_runs))


if __name__ == "__main__":
    main()
