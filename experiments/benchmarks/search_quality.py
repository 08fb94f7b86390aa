"""Search quality at equal budgets: which optimizer finds the better merge per evaluation.

Part 1 (full fine-tunes, the `pareto-layerwise` space: per-layer TIES weight and density): every
optimizer runs the library's own loop (`run_search`, journal ledger, the real `TransformersScorer`)
for the same number of evaluations on the same calibration subset (``--calib-size`` items per
skill drawn with ``--data-seed``, whatever the run seed), once per run seed. Objectives: exact
match per skill (max) and the kept fraction (min). Per cell:

* hypervolume of the run's Pareto front against ONE fixed reference point (accuracy 0 for every
  skill, kept fraction 1.0), recorded in every run's ledger;
* the pick (the front member with the best mean calibration accuracy, what a run reports) scored on
  the held-out test items (200 per skill), and the pick after re-scoring (`experiments._rescore`:
  the ``--top`` front members by mean score re-scored on every calibration item, best of those);
* items scored: calibration items the run paid for (evaluations x items, plus the re-scoring), so
  cells at equal evaluations but different fidelity are compared at their cost.

Multi-fidelity cells (``--sh-optimizers``, "+SH"): the same optimizers with successive halving
(`evomerge.search.Fidelity`: ``--rungs`` items per skill, of every calibration item in an order
drawn by ``--data-seed``, ``--eta``) run until their calibration items reach those of
``--evaluations`` full evaluations of the other cells (EQUAL TOTAL SCORING COST, `run_search`'s
``budget_items``); their front holds only candidates scored on the top rung. With ``--oracle``
every candidate of every run is also scored on the held-out items: the best of those is an
upper bound on what any pick of that run could reach (expensive: one held-out pass per candidate).

Mean and 95% t-interval over seeds. Cells: random search, TPE, NSGA-II (multi-objective), GP
(optuna) and CMA-ES (nevergrad) on the mean task loss, random at three times the budget, the uniform grid (20 recipes,
deterministic: one run) and the best single expert (chosen on calibration).

Part 2 (the LoRA pool, Evo-Merging): the `evo-merging` preset run through `evomerge run`'s own
code (stage chaining included) against stage 2 alone (LoraHub-like: weights only, every density
1) at the same total budget, and the uniform average of the pool (weight 1/n each), over
``--evo-seeds`` seeds; held-out exact match of each run's pick, and the mean |weight| the pick
gives the two noise adapters (trained on shuffled targets) against the clean adapters'.

    python -m evomerge.experiments.benchmarks.search_quality            # full form (docs/search.md)
    python -m evomerge.experiments.benchmarks.search_quality --quick    # tiny zoo, 2 seeds, < 2 min
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import yaml

from evomerge.experiments._compare import single_model_recipes
from evomerge.experiments._rescore import rescore, top_trials
from evomerge.experiments.zoo import build_zoo, load_manifest
from evomerge.merge import ExpertParams, GroupRule, MergeEngine, MergeRecipe
from evomerge.objectives import CalibrationSet, Objective, TransformersScorer
from evomerge.search import Fidelity, Ledger, Scalarization, SearchSpace, SpaceTemplate, full_fidelity, make_optimizer, run_search

OPTIMIZERS = ("random", "optuna:tpe", "optuna:gp", "optuna:nsga2", "nevergrad:CMA")
SINGLE_OBJECTIVE = ("nevergrad:", "optuna:gp")
"""Cells that optimize one loss, the mean task loss (kept fraction weight 0): nevergrad's, and
optuna's GP, whose multi-objective acquisition over these 5 objectives took minutes per trial here."""
TEMPLATE = SpaceTemplate(method="ties", params=["weight", "density"], bounds={"weight": (0.0, 1.5), "density": (0.1, 1.0)},
                         init={"weight": 1.0, "density": 0.5}, granularity="layer")
"""The `pareto-layerwise` preset's space."""


@dataclass
class Cell:
    """One row of the table: per-seed figures of one method."""

    name: str
    evaluations: int
    items: list[float] = field(default_factory=list)
    hv: list[float] = field(default_factory=list)
    holdout: list[float] = field(default_factory=list)
    oracle: list[float] = field(default_factory=list)
    """Best held-out over every candidate of the run (``--oracle``): a bound on any pick."""
    candidates: list[float] = field(default_factory=list)
    top_rung: list[float] = field(default_factory=list)
    rescored: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)


_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086)
"""Student's t 97.5% quantiles for 1..20 degrees of freedom (the two-sided 95% interval)."""


def t975(df: int) -> float:
    """Student's t 97.5% quantile (the normal's 1.96 beyond the table, within 3%)."""
    return _T975[df - 1] if df <= len(_T975) else 1.96


def interval(values: Sequence[float]) -> str:
    """``mean [low, high]``: the 95% t-interval of the mean (the mean alone for one value)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "-"
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return f"{mean:.4f}"
    half = t975(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
    return f"{mean:.4f} [{mean - half:.4f}, {mean + half:.4f}]"


def print_table(title: str, cells: Sequence[Cell], columns: Sequence[tuple[str, Callable[[Cell], Sequence[float]]]]) -> None:
    print(f"\n{title}")
    header = ["cell", "evals", "seeds", "items scored", *[c for c, _ in columns]]
    rows = [[c.name, str(c.evaluations), str(max(len(c.holdout), 1)), f"{statistics.fmean(c.items):.0f}" if c.items else "-",
             *[interval(get(c)) for _, get in columns]] for c in cells]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))), flush=True)


def exact_match(zoo: Path, skills: Sequence[str], split: str, size: int | None, data_seed: int, *,
                rungs: bool = False) -> list[Objective]:
    """Exact match per skill on ``size`` items drawn by ``data_seed``; ``rungs``: in the seeded
    order whose prefixes are the nested subsets of multi-fidelity search (as `evomerge run` does)."""
    sets = [CalibrationSet.load(zoo / "data" / s / f"{split}.jsonl", name=s, size=size, seed=data_seed) for s in skills]
    return [Objective(s, "exact_match", calibration=c.shuffled(data_seed) if rungs else c) for s, c in zip(skills, sets)]


def mean_accuracy(values: Mapping[str, float], skills: Sequence[str]) -> float:
    return float(np.mean([values[s] for s in skills]))


# ------------------------------------------------------------------------------------------ part 1


@dataclass
class Bench:
    """What every run of part 1 shares: the engine, the three scorers and the fixed reference point."""

    engine: MergeEngine
    skills: list[str]
    objectives: list[Objective]
    calib: TransformersScorer
    full: TransformersScorer
    """Every calibration item (the re-scoring fidelity)."""
    graded: TransformersScorer
    """Every calibration item in the rungs' seeded order, and the kept fraction: the +SH cells' scorer."""
    test: TransformersScorer
    reference: list[float]
    items: int
    full_items: int
    top: int
    rungs: tuple[int, ...]
    eta: int
    oracle: bool

    def holdout(self, recipe: MergeRecipe) -> float:
        evaluation = self.test.evaluate(recipe)
        return math.nan if evaluation.failed else mean_accuracy(evaluation.values, self.skills)


def search_cell(bench: Bench, optimizer: str, seed: int, evaluations: int, cell: Cell, *, graded: bool = False) -> None:
    """One run: `run_search` on a fresh ledger; its hypervolume, pick and re-scored pick. ``graded``:
    successive halving until the items of ``evaluations`` full evaluations are spent."""
    space = SearchSpace(bench.engine.layout, bench.engine.expert_names, TEMPLATE)
    n = len(bench.skills)
    scalar = Scalarization(weights=tuple([1.0 / n] * n + [0.0])) if optimizer.startswith(SINGLE_OBJECTIVE) else None
    with tempfile.TemporaryDirectory() as run_dir:
        ledger = Ledger(Path(run_dir), objectives=bench.objectives, seed=seed, scalarization=scalar,
                        reference_point=bench.reference, space=space.to_dict())
        opt = make_optimizer(optimizer)
        if optimizer.startswith("optuna:"):
            ledger.study.enqueue_trial(space.describe(space.x0))  # as `evomerge run` does: the template's start first
        if graded:
            fidelity = Fidelity(bench.rungs, bench.eta, score=lambda v: mean_accuracy(v, bench.skills))
            result = run_search(space, bench.graded, opt, ledger, budget_evals=evaluations * max(bench.rungs) // min(bench.rungs),
                                budget_items=evaluations * bench.items, fidelity=fidelity, progress=False)
        else:
            result = run_search(space, bench.calib, opt, ledger, budget_evals=evaluations, progress=False)
        all_records = [r for r in ledger.records() if r.state == "complete"]
        records = {r.number: r for r in all_records if full_fidelity(r.fidelity)}
        front = [p.number for p in result.archive.front if p.number in records] or list(records)
        scores = {k: mean_accuracy(records[k].values, bench.skills) for k in front}
        recipes = {k: MergeRecipe.model_validate(records[k].recipe) for k in top_trials(scores, bench.top)}
        pick = top_trials(scores, 1)[0]
        again = rescore(bench.full, recipes, lambda v: mean_accuracy(v, bench.skills), items=bench.full_items)
        cell.hv.append(result.archive.hypervolume())
        cell.holdout.append(bench.holdout(recipes[pick]))
        cell.rescored.append(bench.holdout(recipes[again.pick]) if again is not None else math.nan)
        spent = sum(r.fidelity["scored"] for r in all_records if r.fidelity) if graded else evaluations * bench.items
        cell.items.append(spent + len(recipes) * bench.full_items)
        cell.candidates.append(len(all_records))
        cell.top_rung.append(len(records))
        if bench.oracle:
            cell.oracle.append(max(bench.holdout(MergeRecipe.model_validate(r.recipe)) for r in all_records))


def fixed_cell(bench: Bench, name: str, recipes: Mapping[Any, MergeRecipe], cell_evals: int) -> Cell:
    """A method without a seed (the grid, the experts): every recipe scored on the calibration
    subset, the best by mean accuracy scored on the held-out items."""
    cell = Cell(name, cell_evals)
    scored = {k: bench.calib.evaluate(r) for k, r in recipes.items()}
    scores = {k: mean_accuracy(e.values, bench.skills) for k, e in scored.items() if not e.failed}
    best = max(scores, key=lambda k: scores[k])
    cell.items.append(len(recipes) * bench.items)
    cell.holdout.append(bench.holdout(recipes[best]))
    cell.extra["pick"] = [float(list(recipes).index(best))]
    return cell


def grid_recipes(bench: Bench) -> dict[int, MergeRecipe]:
    """The uniform grid baseline's recipes, through its own optimizer (`GridSearch.recipe`)."""
    from evomerge.search import GridSearch

    grid = GridSearch()
    space = SearchSpace(bench.engine.layout, bench.engine.expert_names, TEMPLATE)
    out = {}
    for i, method in enumerate(grid.methods):
        for weight in grid.weights:
            for density in (grid.densities if method == "ties" else (1.0,)):
                params = {"grid.method": method, "grid.weight": weight, "grid.density": density}
                out[len(out)] = grid.recipe(space, params, seed=0, trial=0)
    return out


def part1(zoo: Path, args: argparse.Namespace) -> None:
    manifest = load_manifest(zoo)
    skills = list(manifest["skills"])
    engine = MergeEngine.load(zoo / "base", {s: zoo / manifest["experts"][s] for s in skills}, progress=False)
    calib = exact_match(zoo, skills, "calib", args.calib_size, args.data_seed)
    objectives = [*calib, Objective("kept", "kept_fraction", direction="minimize")]
    full = exact_match(zoo, skills, "calib", None, args.data_seed)
    graded = [*exact_match(zoo, skills, "calib", None, args.data_seed, rungs=True), objectives[-1]]
    test = exact_match(zoo, skills, "test", args.test_size, args.data_seed)
    options = {"batch_size": 128, "max_new_tokens": 12}
    bench = Bench(
        engine=engine, skills=skills, objectives=objectives,
        calib=TransformersScorer(engine, objectives, **options), full=TransformersScorer(engine, full, **options),
        graded=TransformersScorer(engine, graded, **options),
        test=TransformersScorer(engine, test, **options), reference=[0.0] * len(skills) + [1.0],
        items=sum(len(o.calibration) for o in calib), full_items=sum(len(o.calibration) for o in full), top=args.top,
        rungs=tuple(args.rungs), eta=args.eta, oracle=args.oracle,
    )
    print(f"part 1: zoo {zoo.name}, {len(skills)} full experts, TIES per layer ({SearchSpace(engine.layout, engine.expert_names, TEMPLATE).dim} "
          f"parameters); {args.calib_size} calibration items per skill (data seed {args.data_seed}), re-scoring the top {args.top} "
          f"on all {bench.full_items // len(skills)}; held-out: {bench.test.objectives[0].calibration.__len__()} test items per skill; "
          f"reference point {bench.reference}", flush=True)
    cells = []
    plan = [(o, args.evaluations, False) for o in args.optimizers] + [("random", args.evaluations * 3, False)] * args.random_x3
    plan += [(o, args.evaluations, True) for o in args.sh_optimizers]
    if args.sh_optimizers:
        print(f"  +SH: successive halving over {list(bench.rungs)} calibration items per skill (of all {bench.full_items // len(skills)}, "
              f"in an order drawn by the data seed), eta {bench.eta}, until the items of x{args.evaluations} are spent", flush=True)
    for optimizer, evaluations, graded_cell in plan:
        cell = Cell(f"{optimizer}{' +SH' if graded_cell else ''} x{evaluations}", evaluations)
        started = time.perf_counter()
        for seed in range(args.seeds):
            search_cell(bench, optimizer, seed, evaluations, cell, graded=graded_cell)
        extra = (f"; {statistics.fmean(cell.candidates):.0f} candidates per run, {statistics.fmean(cell.top_rung):.0f} on the top rung"
                 if graded_cell else "")
        print(f"  {cell.name}: {time.perf_counter() - started:.0f} s{extra}", flush=True)
        cells.append(cell)
    cells.append(fixed_cell(bench, "uniform grid (20 recipes)", grid_recipes(bench), 20))
    experts = {k: r for k, r in single_model_recipes(list(engine.expert_names)).items() if k != "base"}
    cells.append(fixed_cell(bench, "best single expert", experts, len(experts)))
    columns = [("hypervolume", lambda c: c.hv), ("held-out of pick", lambda c: c.holdout),
               ("held-out re-scored pick", lambda c: c.rescored)]
    if args.oracle:
        columns.append(("best held-out of any candidate", lambda c: c.oracle))
    print_table("search quality (mean [95% interval] over seeds; held-out = mean exact match on the test items)", cells, columns)
    base = next((c for c in cells if c.name == f"random x{args.evaluations}"), None)
    expert = cells[-1].holdout[0]
    print("\nheld-out difference to random search at the same scoring cost (paired by seed), and to the best expert:")
    for c in cells:
        if base is not None and c is not base and len(c.holdout) == len(base.holdout):
            print(f"  {c.name:28} pick {interval([a - b for a, b in zip(c.holdout, base.holdout)])}   "
                  f"re-scored pick {interval([a - b for a, b in zip(c.rescored, base.holdout)])}   "
                  f"re-scored pick - best expert {interval([a - expert for a in c.rescored])}")
    wide = next((c for c in cells if c.name == f"random x{3 * args.evaluations}"), None)
    if wide is not None:
        print(f"hypervolume per seed against random x{3 * args.evaluations} ({', '.join(f'{v:.4f}' for v in wide.hv)}):")
        for c in cells:
            if c.hv and c is not wide and len(c.hv) == len(wide.hv):
                wins = sum(a >= b for a, b in zip(c.hv, wide.hv))
                print(f"  {c.name:28} {', '.join(f'{v:.4f}' for v in c.hv)}   >= in {wins} of {len(c.hv)} seeds")
    print("re-scoring effect (re-scored pick - pick, paired):")
    for c in cells:
        if c.rescored:
            print(f"  {c.name:28} {interval([a - b for a, b in zip(c.rescored, c.holdout)])}")
    for s in (bench.calib, bench.full, bench.graded, bench.test):
        s.close()


# ------------------------------------------------------------------------------------------ part 2


def evo_run(zoo: Path, run_dir: Path, seed: int, evaluations: int, *, stage2_only: bool, calib_size: int) -> Path:
    """The `evo-merging` preset through `evomerge run`'s own code (`_run.start`): both stages at
    ``evaluations`` each, or stage 2 alone (every density 1) at twice that."""
    from evomerge.experiments._run import start
    from evomerge.experiments._runlog import Display
    from evomerge.experiments._signals import SignalLog
    from evomerge.experiments._spec_io import preset_path

    preset = yaml.safe_load(preset_path("evo-merging").read_text(encoding="utf-8"))
    overrides = [f"seed={seed}", f"models.zoo.path={zoo}", f"models.zoo.size={load_manifest(zoo)['size']}",
                 f"budget.evaluations={evaluations}", "budget.wall_clock=2h", "outputs.report=false",
                 f"objectives=[{{name: '{{skill}}', metric: answer_loss, data: 'zoo:data/{{skill}}/calib.jsonl', size: {calib_size}}}]"]
    if stage2_only:
        space = {**preset["stages"][1]["space"], "init": {"weight": 0.25}}  # stage 1's starting weights
        weights = {"name": "weights", "space": space, "budget": {"evaluations": 2 * evaluations, "wall_clock": "2h"}}
        overrides.append(f"stages={json.dumps([weights])}")
    printed = io.StringIO()
    with SignalLog() as signals, contextlib.redirect_stdout(printed):
        code = start(spec=None, preset="evo-merging", run_dir=run_dir, overrides=overrides,
                     display=Display(bars=False, lines=False), signals=signals)
    if code != 0:
        raise SystemExit(f"evo-merging run failed with exit {code}:\n{printed.getvalue()}")
    return run_dir


def evo_pick(run_dir: Path) -> MergeRecipe:
    """The recipe the run reports: the re-scored pick when it re-scored, else the best mean trial."""
    from evomerge.experiments._inspect import load_view, recipe_of

    view = load_view(run_dir)
    rescored = (view.comparison or {}).get("rescored")
    number = int(rescored["pick"]) if rescored else view.best_mean_trial()
    return recipe_of(view, number)


def part2(zoo: Path, args: argparse.Namespace) -> None:
    manifest = load_manifest(zoo)
    skills = list(manifest["skills"])
    pool = {p["name"]: p for p in manifest["pool"]}
    engine = MergeEngine.load(zoo / "base", {n: zoo / p["path"] for n, p in pool.items()}, progress=False)
    test = TransformersScorer(engine, exact_match(zoo, skills, "test", args.test_size, args.data_seed), batch_size=128, max_new_tokens=12)
    noise = [n for n, p in pool.items() if p["variant"] == "noise"]
    clean = [n for n, p in pool.items() if p["variant"] == "clean"]
    print(f"\npart 2: Evo-Merging on the LoRA pool of {len(pool)} adapters ({len(noise)} noise), {args.evo_evaluations} "
          f"evaluations per stage, {args.evo_seeds} seeds, calibration: answer loss on {args.evo_calib_size} items per skill", flush=True)

    def held_out(recipe: MergeRecipe) -> float:
        evaluation = test.evaluate(recipe)
        return math.nan if evaluation.failed else mean_accuracy(evaluation.values, skills)

    def weights(recipe: MergeRecipe, names: Sequence[str]) -> float:
        return float(np.mean([abs(recipe.rules[0].experts[n].weight) for n in names]))

    cells = {"full two-stage": Cell("full two-stage (60+60)", 2 * args.evo_evaluations),
             "stage 2 only": Cell("stage 2 only (LoraHub-like)", 2 * args.evo_evaluations)}
    for name, cell in cells.items():
        cell.name = cell.name.replace("60+60", f"{args.evo_evaluations}+{args.evo_evaluations}")
        for seed in range(args.evo_seeds):
            with tempfile.TemporaryDirectory() as tmp:
                run = evo_run(zoo, Path(tmp) / "run", seed, args.evo_evaluations, stage2_only=name == "stage 2 only",
                              calib_size=args.evo_calib_size)
                recipe = evo_pick(run)
                cell.holdout.append(held_out(recipe))
                cell.extra.setdefault("noise", []).append(weights(recipe, noise))
                cell.extra.setdefault("clean", []).append(weights(recipe, clean))
    uniform = Cell("uniform average of the pool", 0)
    expert = ExpertParams(weight=1.0 / len(pool), density=1.0)
    recipe = MergeRecipe(rules=[GroupRule(method="topk", experts={n: expert for n in pool})], normalize=False, lora_mode="adapter")
    uniform.holdout.append(held_out(recipe))
    print_table(
        "Evo-Merging (mean [95% interval] over seeds; held-out = mean exact match on the test items)",
        [*cells.values(), uniform],
        [("held-out of pick", lambda c: c.holdout), ("noise mean |w|", lambda c: c.extra.get("noise", [])),
         ("clean mean |w|", lambda c: c.extra.get("clean", []))],
    )
    test.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny zoo, 2 seeds, few evaluations (the CI form)")
    parser.add_argument("--zoo", type=Path, default=None, help="a built zoo folder (default: build or reuse the cached one)")
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--evaluations", type=int, default=100)
    parser.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS))
    parser.add_argument("--sh-optimizers", nargs="*", default=["random", "optuna:tpe"],
                        help="optimizers also run with successive halving at the items of --evaluations full evaluations")
    parser.add_argument("--rungs", nargs="+", type=int, default=[8, 32, 64], help="calibration items per skill at each rung")
    parser.add_argument("--eta", type=int, default=4, help="1/eta of a rung's candidates go on")
    parser.add_argument("--random-x3", type=int, choices=[0, 1], default=1, help="also run random at three times the budget")
    parser.add_argument("--oracle", action="store_true", help="score every candidate on the held-out items (an upper bound on any pick)")
    parser.add_argument("--calib-size", type=int, default=32, help="calibration items per skill")
    parser.add_argument("--data-seed", type=int, default=0, help="draws the calibration subset (the same for every run seed)")
    parser.add_argument("--test-size", type=int, default=None, help="held-out items per skill (default: all 200)")
    parser.add_argument("--top", type=int, default=5, help="front members re-scored on every calibration item")
    parser.add_argument("--evo-seeds", type=int, default=3)
    parser.add_argument("--evo-evaluations", type=int, default=60, help="per stage (stage 2 alone gets twice this)")
    parser.add_argument("--evo-calib-size", type=int, default=16)
    parser.add_argument("--skip", choices=["part1", "part2"], default=None)
    if parser.parse_known_args(argv)[0].quick:  # the quick form's defaults; explicit options still win
        parser.set_defaults(size="tiny", seeds=2, evaluations=6, calib_size=4, top=2, test_size=16, rungs=[2, 8], eta=2,
                            evo_seeds=2, evo_evaluations=3, evo_calib_size=4)
    args = parser.parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per study otherwise
    zoo = args.zoo or build_zoo(args.size, seed=0, arch="llama", progress=False)
    started = time.perf_counter()
    if args.skip != "part1":
        part1(zoo, args)
    if args.skip != "part2":
        part2(zoo, args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
