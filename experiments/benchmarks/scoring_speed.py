"""Scoring speed: in-place candidate scoring vs the naive on-disk loop, measured in one run.

The in-place path is what a search runs: `TransformersScorer.evaluate` = the engine writes the
merged weights into the live model (merge), a device sync (swap), then inference on calibration
sets tokenized once. The naive loop is what on-disk merge tools do per candidate: merge into a
new model, `save_pretrained`, `from_pretrained` (model and tokenizer), tokenize the calibration
sets, score. Both score with the same inference code, so the difference is the loop, not the
kernels.

    python -m evomerge.experiments.benchmarks.scoring_speed --size small

Acceptance (issue "Objectives and scorers"): (merge + swap) <= 10% of candidate time, and in-place
throughput >= 5x the naive loop.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from evomerge.experiments.zoo import build_zoo, load_manifest
from evomerge.merge import ExpertParams, GroupRule, MergeEngine, MergeRecipe
from evomerge.objectives import CalibrationSet, Deadline, Objective, TransformersScorer
from evomerge.objectives._generation import continuation_logprobs, greedy_generate
from evomerge.objectives._plan import ScoringPlan
from evomerge.objectives._transformers_scorer import eos_token_ids, load_tokenizer


def make_objectives(zoo: Path, skills: Sequence[str], calib_size: int) -> list[Objective]:
    """Per skill: exact match of greedy generations and the answer cross-entropy (Evo-Merging)."""
    objectives = []
    for skill in skills:
        cal = CalibrationSet.load(zoo / "data" / skill / "calib.jsonl", size=calib_size, seed=0)
        objectives += [Objective(f"{skill}_acc", "exact_match", cal), Objective(f"{skill}_loss", "answer_loss", cal)]
    return objectives


def random_recipes(experts: Sequence[str], n: int, seed: int) -> list[MergeRecipe]:
    """Per-layer-free task-arithmetic / TIES candidates with random weights and densities."""
    rng = np.random.default_rng(seed)
    recipes = []
    for trial in range(n):
        method = "ties" if trial % 2 else "task_arithmetic"
        params = {e: ExpertParams(weight=float(rng.uniform(0.1, 1.0)), density=float(rng.uniform(0.3, 1.0))) for e in experts}
        recipes.append(MergeRecipe(rules=[GroupRule(method=method, experts=params)], seed=seed, trial=trial))
    return recipes


def naive_candidate(engine: MergeEngine, recipe: MergeRecipe, objectives: list[Objective], workdir: Path, args: Any) -> dict[str, float]:
    """One candidate the on-disk way; returns its timings (merge, save, load, inference, total)."""
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_config(engine.config, dtype=engine.dtype)
    model.load_state_dict(engine.merged_state(recipe), strict=False)
    t1 = time.perf_counter()
    out = workdir / f"trial-{recipe.trial}"
    model.save_pretrained(out)
    load_tokenizer(engine.base_path).save_pretrained(out)
    del model
    t2 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=engine.dtype).eval()
    tokenizer = load_tokenizer(out)
    plan = ScoringPlan(objectives, tokenizer)
    t3 = time.perf_counter()
    deadline = Deadline(None)
    pad = tokenizer.pad_token_id
    plan.run(
        lambda prompts: greedy_generate(
            model, prompts, decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True), pad_id=pad,
            eos_ids=eos_token_ids(tokenizer, model.generation_config), stop=("\n",), max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, deadline=deadline,
        ),
        lambda pairs: continuation_logprobs(model, pairs, pad_id=pad, batch_size=args.batch_size, deadline=deadline),
        None,
    )
    t4 = time.perf_counter()
    return {"merge": t1 - t0, "save": t2 - t1, "load": t3 - t2, "inference": t4 - t3, "total": t4 - t0}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="zoo size (tiny|small)")
    parser.add_argument("--candidates", type=int, default=8, help="in-place candidates timed")
    parser.add_argument("--naive-candidates", type=int, default=4, help="naive-loop candidates timed")
    parser.add_argument("--calib-size", type=int, default=16, help="calibration items per skill")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    zoo = build_zoo(args.size, progress=False)
    manifest = load_manifest(zoo)
    experts = {name: zoo / path for name, path in manifest["experts"].items()}
    engine = MergeEngine.load(zoo / "base", experts, progress=False)
    objectives = make_objectives(zoo, manifest["skills"], args.calib_size)
    recipes = random_recipes(list(experts), args.candidates + 1, args.seed)
    scorer = TransformersScorer(engine, objectives, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    scorer.evaluate(recipes[0])  # warm-up: first-call allocations are not per-candidate cost

    runs = [scorer.evaluate(r) for r in recipes[1:]]
    failed = [e.reason for e in runs if e.failed]
    if failed:
        raise SystemExit(f"in-place evaluation failed: {failed[0]}")
    with tempfile.TemporaryDirectory(prefix="evomerge-naive-") as tmp:
        naive_candidate(engine, recipes[0], objectives, Path(tmp), args)  # same warm-up
        naive = [naive_candidate(engine, r, objectives, Path(tmp), args) for r in recipes[1 : 1 + args.naive_candidates]]

    med = {k: statistics.median(e.timings[k] for e in runs) for k in ("merge", "swap", "inference", "total", "items_per_s")}
    naive_med = {k: statistics.median(n[k] for n in naive) for k in naive[0]}
    overhead = (med["merge"] + med["swap"]) / med["total"]
    per_hour, naive_per_hour = 3600 / med["total"], 3600 / naive_med["total"]
    print(f"zoo {args.size}: {engine.num_params:,} params, {len(experts)} experts, {len(objectives)} objectives, "
          f"{args.calib_size} items/skill, {args.threads} threads")
    print(f"in-place ({len(runs)} candidates, median s): merge {med['merge']:.4f}  swap {med['swap']:.5f}  "
          f"scoring {med['inference']:.3f}  total {med['total']:.3f}  ({med['items_per_s']:.0f} items/s)")
    print(f"naive    ({len(naive)} candidates, median s): merge {naive_med['merge']:.4f}  save {naive_med['save']:.3f}  "
          f"load {naive_med['load']:.3f}  scoring {naive_med['inference']:.3f}  total {naive_med['total']:.3f}")
    print(f"(merge + swap) / total = {overhead:.1%}   (acceptance <= 10%: {'PASS' if overhead <= 0.10 else 'FAIL'})")
    print(f"candidates/hour: in-place {per_hour:,.0f} vs naive {naive_per_hour:,.0f} = {per_hour / naive_per_hour:.1f}x   "
          f"(acceptance >= 5x: {'PASS' if per_hour >= 5 * naive_per_hour else 'FAIL'})")
    return {"overhead": overhead, "speedup": per_hour / naive_per_hour, "per_hour": per_hour, "naive_per_hour": naive_per_hour}


if __name__ == "__main__":
    main()
