"""Scoring speed: in-place candidate scoring vs the naive on-disk loops, measured in one run.

The in-place path is what a search runs: `TransformersScorer.evaluate` = the engine writes the
merged weights into the live model (merge), a device sync (swap), then inference on calibration
sets tokenized once. Two naive loops score every candidate with the same inference code, so the
differences are the loops, not the kernels:

- `naive`: evomerge's own cached merge into a new model, `save_pretrained`, `from_pretrained`
  (model and tokenizer), tokenize, score: the cheapest possible on-disk loop;
- `mergekit`: what mergekit-evolve's on-disk strategy does per candidate: mergekit's `run_merge`
  on the recipe's mergekit YAML (it reads the base and every expert from their checkpoints and
  writes the merged model), then `from_pretrained`, tokenize, score.

    python -m evomerge.experiments.benchmarks.scoring_speed --size small
    python -m evomerge.experiments.benchmarks.scoring_speed --size small --compile off   # eager merges

`--compile on` (default) merges with the fused compiled kernels, as a search does for every model
size (`models.compile: auto`); their one-time
compile happens during the warm-up (one candidate per method) and is printed, not counted per
candidate. `--compile off` is the eager chunked path (`models.compile: false`).

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
from evomerge.merge import ExpertParams, GroupRule, MergeEngine, MergeRecipe, recipe_to_mergekit
from evomerge.objectives import CalibrationSet, Deadline, Objective, TransformersScorer
from evomerge.objectives._plan import ScoringPlan
from evomerge.objectives._transformers_scorer import ModelInference, load_tokenizer


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


def score_from_disk(folder: Path, engine: MergeEngine, objectives: list[Objective], args: Any) -> dict[str, float]:
    """Load a merged model folder as a fresh process would, tokenize the sets, score; (load, inference) seconds."""
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=engine.dtype).eval()
    tokenizer = load_tokenizer(folder)
    plan = ScoringPlan(objectives, tokenizer)
    t1 = time.perf_counter()
    inference = ModelInference(model, tokenizer, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    deadline = Deadline(None)
    plan.run(lambda requests: inference.generate(requests, deadline), lambda pairs: inference.logprobs(pairs, deadline), None)
    return {"load": t1 - t0, "inference": time.perf_counter() - t1}


def naive_candidate(engine: MergeEngine, recipe: MergeRecipe, objectives: list[Objective], workdir: Path, args: Any) -> dict[str, float]:
    """One candidate through evomerge's cached merge, save_pretrained, from_pretrained, score."""
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_config(engine.config, dtype=engine.dtype)
    model.load_state_dict(engine.merged_state(recipe), strict=False)
    out = workdir / f"trial-{recipe.trial}"
    model.save_pretrained(out)
    load_tokenizer(engine.base_path).save_pretrained(out)
    del model
    t1 = time.perf_counter()
    timings = score_from_disk(out, engine, objectives, args)
    return {"merge+save": t1 - t0, **timings, "total": time.perf_counter() - t0}


def mergekit_candidate(engine: MergeEngine, recipe: MergeRecipe, objectives: list[Objective], workdir: Path, args: Any) -> dict[str, float]:
    """One candidate the mergekit-evolve on-disk way: run_merge from the checkpoints, then load and score."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    t0 = time.perf_counter()
    config = recipe_to_mergekit(recipe, engine.layout, str(engine.base_path), {n: str(p) for n, p in engine.expert_paths.items()})
    out = workdir / f"mergekit-{recipe.trial}"
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(config)), str(out),
              MergeOptions(quiet=True, copy_tokenizer=True, write_model_card=False, random_seed=recipe.seed))
    t1 = time.perf_counter()
    timings = score_from_disk(out, engine, objectives, args)
    return {"merge+save": t1 - t0, **timings, "total": time.perf_counter() - t0}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="zoo size (tiny|small)")
    parser.add_argument("--candidates", type=int, default=8,
                        help="candidates timed; each goes through the in-place path and both on-disk loops in turn")
    parser.add_argument("--calib-size", type=int, default=16, help="calibration items per skill")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="on",
                        help="fused compiled merge kernels (MergeEngine.load(compile=...)); see the module doc")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    zoo = build_zoo(args.size, progress=False)
    manifest = load_manifest(zoo)
    experts = {name: zoo / path for name, path in manifest["experts"].items()}
    engine = MergeEngine.load(zoo / "base", experts, progress=False,
                              compile={"auto": "auto", "on": True, "off": False}[args.compile])
    objectives = make_objectives(zoo, manifest["skills"], args.calib_size)
    recipes = random_recipes(list(experts), args.candidates + 2, args.seed)
    scorer = TransformersScorer(engine, objectives, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    start = time.perf_counter()
    for warm in recipes[:2]:  # warm-up, one per method: compiles and first-call allocations are once per run
        scorer.evaluate(warm)
    warm_s = time.perf_counter() - start
    recipes = recipes[1:]  # recipes[0] stays the on-disk loops' warm-up

    # Every candidate runs in place and through both on-disk loops one after the other, so a burst of
    # load from other jobs on a shared machine hits all three alike (the ratios are side by side).
    loops = {"naive": naive_candidate, "mergekit": mergekit_candidate}
    runs = []
    timed: dict[str, list[dict[str, float]]] = {name: [] for name in loops}
    with tempfile.TemporaryDirectory(prefix="evomerge-naive-") as tmp:
        for candidate in loops.values():
            candidate(engine, recipes[0], objectives, Path(tmp), args)  # the same warm-up as in place
        for recipe in recipes[1:]:
            runs.append(scorer.evaluate(recipe))
            for name, candidate in loops.items():
                timed[name].append(candidate(engine, recipe, objectives, Path(tmp), args))
    failed = [e.reason for e in runs if e.failed]
    if failed:
        raise SystemExit(f"in-place evaluation failed: {failed[0]}")
    medians = {name: {k: statistics.median(t[k] for t in ts) for k in ts[0]} for name, ts in timed.items()}

    med = {k: statistics.median(e.timings[k] for e in runs) for k in ("merge", "swap", "inference", "total", "items_per_s")}
    overhead = (med["merge"] + med["swap"]) / med["total"]
    per_hour = 3600 / med["total"]
    print(f"zoo {args.size}: {engine.num_params:,} params, {len(experts)} experts, {len(objectives)} objectives, "
          f"{args.calib_size} items/skill, {args.threads} threads, fused merge kernels {'on' if engine.fused else 'off'}")
    print(f"warm-up (2 candidates, once per run: kernel compiles, first allocations): {warm_s:.1f} s")
    print(f"in-place ({len(runs)} candidates, median s): merge {med['merge']:.4f}  swap {med['swap']:.5f}  "
          f"scoring {med['inference']:.3f}  total {med['total']:.3f}  ({med['items_per_s']:.0f} items/s)")
    for method in sorted({r.rules[0].method for r in recipes[1:]}):
        own = [e for e, r in zip(runs, recipes[1:]) if r.rules[0].method == method]
        merge, total = (statistics.median(e.timings[k] for e in own) for k in ("merge", "total"))
        print(f"  {method:16s} ({len(own)}): merge {merge:.4f}  total {total:.3f}  (merge + swap) / total {merge / total:.1%}")
    result = {"overhead": overhead, "per_hour": per_hour}
    for name, m in medians.items():
        print(f"{name:8s} ({len(timed[name])} candidates, median s): merge+save {m['merge+save']:.4f}  "
              f"load {m['load']:.3f}  scoring {m['inference']:.3f}  total {m['total']:.3f}")
        result[f"speedup_vs_{name}"] = speedup = per_hour / (3600 / m["total"])
        print(f"  candidates/hour: in-place {per_hour:,.0f} vs {name} {3600 / m['total']:,.0f} = {speedup:.2f}x")
    print(f"(merge + swap) / total = {overhead:.1%}   (acceptance <= 10%: {'PASS' if overhead <= 0.10 else 'FAIL'})")
    verdict = "PASS" if result["speedup_vs_mergekit"] >= 5 else "FAIL"
    print(f"throughput vs the on-disk loop of mergekit-evolve: {result['speedup_vs_mergekit']:.2f}x   (acceptance >= 5x: {verdict})")
    return result

if __name__ == "__main__":
    main()
