"""`run_search`: the one run loop, for a single process and for each of several workers.

Per trial (docs/search.md, "Run loop"): a look at the budget, ``study.ask``, decode, evaluate, the
ledger write (``study.tell`` last), one fsync. A failed evaluation fails its trial, never the run.

**Budget** (exact, also across racing workers): the loop claims only after a look at the ledger
saw ``counted + running < budget``; a worker then looks again and keeps its claim only if
``counted + (RUNNING trials other than its own) + 1 <= budget`` (and, for a queued candidate,
no other attempt of it is RUNNING or counted), else gives it back (`Ledger.give_back`) and backs
off. Of any set of kept claims, the last to look saw all the others, so the ledger ends with
exactly ``budget`` counted trials.

**Stops and crashes**: a ``KeyboardInterrupt`` gives the claimed trial back and returns; a SIGKILL
leaves it RUNNING, re-queued at one process's next start (`Ledger.fail_running`), or for workers
through optuna's heartbeats (`search.scaleout`). A coordinated optimizer is told a result only
after the ledger holds it (`search._optimizers._coordinator`). The loop installs no signal
handler: that is the caller's edge (`evomerge.experiments.cli`).
"""

from __future__ import annotations

import math
import random
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol, Sequence

import optuna
from optuna.trial import TrialState

from evomerge.merge import MergeRecipe
from evomerge.objectives import Evaluation

from ._fidelity import Fidelity, full_fidelity, grade_record, items_spent, rung_scalars
from ._ledger import Counts, Ledger, TrialRecord, counted, record, rerun_numbers
from ._optimizers import CoordinatedOptimizer, Optimizer, OptunaOptimizer
from ._pareto import ParetoArchive
from ._queue import CandidateQueue
from ._space import SearchSpace
from .scaleout import Crew


class ScorerLike(Protocol):
    def evaluate(self, recipe: MergeRecipe) -> Evaluation: ...


class GradedScorer(Protocol):
    """A scorer that can score the first ``items`` items of every calibration set and continue the
    candidate in its live model (`evomerge.objectives.Scorer`): what `Fidelity` needs."""

    def evaluate(self, recipe: MergeRecipe, *, items: int | None = None) -> Evaluation: ...

    def extend(self, evaluation: Evaluation, items: int) -> Evaluation: ...

    def items(self, items: int | None = None) -> int: ...


Callback = Callable[[TrialRecord], None]
"""Called with each trial this call finished, as the ledger stores it."""


@dataclass
class SearchResult:
    """Summary of one `run_search` call; the ledger holds the details."""

    archive: ParetoArchive
    n_finished: int
    """Counted trials in the ledger (this call's and earlier ones, other workers' included)."""
    n_new: int = 0
    """Trials finished by this call."""
    evaluation_seconds: float = 0.0
    overheads: list[float] = field(default_factory=list)
    """Per trial finished here: optimizer (ask, the queue's step) + ledger (looks, claim, the
    trial's writes and fsync) + decode + archive; waiting for work is not overhead."""
    gave_back: int = 0
    wall_seconds: float = 0.0
    stopped_by: Literal["budget", "time", "exhausted", "interrupt"] = "budget"

    @property
    def overhead_seconds(self) -> float:
        return sum(self.overheads)


def run_search(
    space: SearchSpace,
    scorer: ScorerLike,
    optimizer: Optimizer,
    ledger: Ledger,
    *,
    budget_evals: int | None = None,
    budget_seconds: float | None = None,
    constraints: Callable[[Evaluation], Sequence[float]] | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    worker_id: str | None = None,
    queue: int = 4,
    lease_ttl: float = 10.0,
    poll: float = 0.2,
    fidelity: Fidelity | None = None,
    budget_items: int | None = None,
) -> SearchResult:
    """Run (or resume, or join) a search until ``budget_evals`` trials count in the ledger, the
    time budget is spent, the optimizer is exhausted, or a ``KeyboardInterrupt`` arrives.

    A ledger opened with a heartbeat is shared: this call is one worker (``worker_id``) among
    several; ``queue``, ``lease_ttl``: docs/scale-out.md; ``poll``: seconds between looks while
    waiting for work. ``constraints``: values that must all be <= 0 for a feasible trial (optuna's
    convention); ``fidelity``: successive halving (a `GradedScorer`), ``budget_items`` its cost
    limit (docs/search.md, "Run loop")."""
    if budget_items is not None and fidelity is None:
        raise ValueError("budget_items counts the calibration items of graded trials: it needs a fidelity")
    started = time.perf_counter()
    shared = ledger.heartbeat is not None
    if shared != (worker_id is not None) or (shared and budget_evals is None):
        raise ValueError("workers (a worker_id) share a database ledger opened with a heartbeat, and a budget_evals")
    if not shared:
        ledger.fail_running()  # one writer: what is RUNNING now was cut off by a crash or a stop
    feed: CandidateQueue | None = None
    if isinstance(optimizer, CoordinatedOptimizer):
        feed = CandidateQueue(space, optimizer, ledger, budget=budget_evals, depth=queue if shared else 1,
                              grace=lease_ttl if shared else 0.0)
        # claims pop queued trials; the sampler is consulted only for its hooks: the cheapest one
        ledger.study.sampler = optuna.samplers.RandomSampler()
        if not shared:
            feed.start()
    elif isinstance(optimizer, OptunaOptimizer):
        optimizer.bind(space, ledger, budget=budget_evals, seed_offset=0 if worker_id is None else zlib.crc32(worker_id.encode()))
    else:
        optimizer.bind(space, ledger, budget=budget_evals)
    crew = Crew(ledger, worker_id, feed, lease_ttl=lease_ttl, poll=poll) if shared else None  # type: ignore[arg-type]
    local = feed if not shared else None
    distributions = optimizer.ask_distributions(space)
    archive = ledger.archive()
    result = SearchResult(archive=archive, n_finished=len(ledger.finished()))
    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=budget_evals, initial=result.n_finished, desc="search", unit="trial", dynamic_ncols=True)
    seed, names, trial = ledger.seed, ledger.objective_names, None
    try:
        while True:
            t0 = time.perf_counter()
            if crew is not None:
                crew.check()
            if budget_seconds is not None and t0 - started >= budget_seconds:
                result.stopped_by = "time"
                break
            if local is not None and not local.step():
                result.stopped_by = "budget" if _spent(ledger.counts(), budget_evals) else "exhausted"
                break
            look = ledger.counts()
            result.n_finished = look.counted
            if _spent(look, budget_evals) or (budget_items is not None and items_spent(ledger.trials()) >= budget_items):
                break
            if _spent(look, budget_evals, running=True) or (feed is not None and not look.waiting):
                time.sleep(poll)  # work in flight elsewhere may finish or go stale; a coordinator refills
                continue
            trial = ledger.study.ask(distributions) if crew is None else crew.claim(ledger.study, distributions)
            candidate = trial.user_attrs.get("candidate")
            if crew is not None:
                reason, requeue = _second_look(ledger, trial.number, candidate, budget_evals, feed is not None)
                if reason is not None:
                    ledger.give_back(trial, reason, requeue=requeue)
                    crew.released()
                    trial = None
                    result.gave_back += 1
                    time.sleep(random.uniform(0, poll))  # break the symmetry of a collision
                    continue
            if candidate is None:
                optimizer.suggest(space, trial)  # define-by-run parameters (a method choice)
            key = trial.number if candidate is None else int(candidate)
            recipe = optimizer.recipe(space, trial.params, seed=seed, trial=key)
            pre = time.perf_counter() - t0
            evaluation, eval_seconds, grade = evaluate_guarded(scorer, recipe, fidelity, ledger)
            t2 = time.perf_counter()
            values, failure = _values(evaluation, names)
            constraint_values = None if values is None or constraints is None else [float(c) for c in constraints(evaluation)]
            ledger.finish(trial, recipe_json=recipe.to_json(), values=values, details=evaluation.details,
                          timings={**evaluation.timings, "search_overhead": pre}, failure=failure,
                          constraints=constraint_values, fidelity=grade)
            if crew is not None:
                crew.released()
            number, trial = trial.number, None
            ledger.sync()
            had_reference = archive.reference_point is not None
            feasible = all(c <= 0 for c in constraint_values or ())
            archive.add(number, None if values is None else list(values.values()), feasible=feasible and full_fidelity(grade))
            if not had_reference and archive.reference_point is not None:
                ledger.record_reference_point(archive.reference_point)
            result.overheads.append(pre + time.perf_counter() - t2)
            result.n_new += 1
            result.evaluation_seconds += eval_seconds
            if callbacks:
                done = record(ledger.study.get_trials(deepcopy=False)[number], set())
                for callback in callbacks:
                    callback(done)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(hv=f"{archive.hypervolume():.4g}", front=len(archive.front), refresh=False)
    except KeyboardInterrupt:
        result.stopped_by = "interrupt"
        if trial is not None:
            ledger.give_back(trial, "interrupted: the run was stopped", requeue=True)
    finally:
        if crew is not None:
            crew.close()
        if bar is not None:
            bar.close()
    result.n_finished = ledger.counts().counted
    result.wall_seconds = time.perf_counter() - started
    return result


def _spent(look: Counts, budget: int | None, *, running: bool = False) -> bool:
    """Whether the counted trials (with ``running``: and the RUNNING ones) reach the budget."""
    return budget is not None and look.counted + (len(look.running) if running else 0) >= budget


def _second_look(
    ledger: Ledger, number: int, candidate: int | None, budget: int | None, coordinated: bool,
) -> tuple[str | None, bool]:
    """(None to keep a worker's claim, else why it goes back; whether it goes back to the queue).

    Besides the budget rule (module docstring): a coordinated worker keeps only a candidate that
    no other attempt holds or has finished, since a coordinator that lost its lease unawares may
    have enqueued a candidate its successor enqueued too; the later of two claims sees the earlier,
    so at most one is evaluated (if both go back, `search._queue` re-queues it after its grace)."""
    trials = ledger.trials()
    if coordinated and candidate is None:
        return "given back: a fresh trial (a coordinator queues every candidate; the queue ran empty)", False
    if candidate is not None:
        rerun = rerun_numbers(trials)
        twins = [t.number for t in trials if t.user_attrs.get("candidate") == candidate and t.number != number
                 and (t.state == TrialState.RUNNING or counted(t, rerun))]
        if twins:
            return f"given back: candidate {candidate} is held by trial {twins[0]}", False
    look = ledger.counts(trials)
    others = len(look.running - {number})
    if budget is not None and look.counted + others + 1 > budget:
        return f"given back: {look.counted} counted + {others} running reach the budget of {budget}", True
    return None, True


def evaluate_guarded(
    scorer: ScorerLike | GradedScorer, recipe: MergeRecipe, fidelity: Fidelity | None, ledger: Ledger,
) -> tuple[Evaluation, float, dict[str, Any] | None]:
    """The scorer's evaluation of ``recipe``, its wall seconds and, with a ``fidelity``, its rung
    record (`search._fidelity`: the evaluation is the one at the highest rung reached; None
    without rungs or when it failed). Scorers return failures as failed evaluations; a wrapper
    may still raise, and that too fails the trial, never the run (or a worker)."""
    start = time.perf_counter()
    scalars: list[float] = []
    peers: list[int] = []
    rung = 0
    try:
        if fidelity is None:
            evaluation = scorer.evaluate(recipe)
        else:
            evaluation = scorer.evaluate(recipe, items=fidelity.rungs[0])  # type: ignore[call-arg]
        while fidelity is not None and not evaluation.failed:
            scalar = float(fidelity.score(evaluation.values))
            others = rung_scalars(ledger.trials(), rung)  # the ledger's: a resumed run or another worker continues them
            scalars.append(scalar)
            peers.append(len(others) + 1)
            if rung == len(fidelity.rungs) - 1 or not fidelity.promote(scalar, [*others, scalar]):
                break
            rung += 1
            evaluation = scorer.extend(evaluation, fidelity.rungs[rung])  # type: ignore[union-attr]
    except Exception as exc:
        evaluation = Evaluation.failure(f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - start
    if fidelity is None or evaluation.failed:
        return evaluation, seconds, None
    return evaluation, seconds, grade_record(fidelity, rung, scalars, peers, scorer.items(fidelity.rungs[rung]))  # type: ignore[union-attr]


def _values(evaluation: Evaluation, names: Sequence[str]) -> tuple[dict[str, float] | None, str | None]:
    """(the objective values, None) of a successful evaluation, else (None, why the trial failed)."""
    if evaluation.failed:
        return None, evaluation.reason or "evaluation failed"
    missing = [n for n in names if n not in evaluation.values]
    if missing:
        return None, f"evaluation lacks objectives {missing}"
    values = {n: float(evaluation.values[n]) for n in names}
    if not all(math.isfinite(v) for v in values.values()):
        return None, f"non-finite objective values {values}"
    return values, None
