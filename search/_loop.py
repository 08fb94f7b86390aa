"""`run_search`: ask -> decode -> evaluate -> record -> tell -> archive, until a budget is spent.

The budget counts finished trials *in the ledger* (completed + failed by their evaluation, not those
cut off by an interruption), so a resumed run continues to the same total. ``budget_seconds``
counts this call's wall time only.

Order per trial: the ledger write comes before ``optimizer.tell`` (see `CoordinatedOptimizer`),
and both run with SIGINT/SIGTERM deferred, so a stop never splits them. A stop during an
evaluation aborts that evaluation: its candidate stays pending (coordinated optimizers re-queue
it from their checkpoint; optuna's RUNNING trial is failed as interrupted and re-queued).

Durability I/O (the ledger fsync, a coordinated optimizer's checkpoint file) is written behind on
a background thread while the batch evaluates (`search._durable.WriteBehind`); the loop waits for
it before it writes the batch's first result, so the crash-safety order is unchanged and the
fsyncs cost the search nothing unless the disk is slower than an evaluation.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence

from evomerge.merge import MergeRecipe
from evomerge.objectives import Evaluation

from ._durable import WriteBehind
from ._ledger import Ledger
from ._optimizers import Candidate, Failure, Optimizer
from ._pareto import ParetoArchive
from ._space import SearchSpace


class ScorerLike(Protocol):
    def evaluate(self, recipe: MergeRecipe) -> Evaluation: ...


@dataclass(frozen=True)
class TrialRecord:
    """What a callback receives after each finished trial."""

    number: int
    candidate: Candidate
    recipe: MergeRecipe
    evaluation: Evaluation
    values: list[float] | None
    hypervolume: float
    overhead_seconds: float
    """Search-side time of this trial: ask share, decode, ledger write, tell, archive."""


Callback = Callable[[TrialRecord], None]


@dataclass
class SearchResult:
    """Summary of one `run_search` call; the ledger holds the details."""

    archive: ParetoArchive
    n_finished: int
    """Finished trials in the ledger (this call and earlier ones)."""
    n_new: int
    """Trials finished by this call."""
    evaluation_seconds: float = 0.0
    overhead_seconds: float = 0.0
    """ask + decode + ledger writes + tell (+ checkpoints) + archive, summed over this call."""
    wall_seconds: float = 0.0
    stopped_by: Literal["budget", "time", "exhausted", "interrupt"] = "budget"
    overheads: list[float] = field(default_factory=list)

    @property
    def overhead_ratio(self) -> float:
        """Search overhead as a fraction of evaluation time (the 2% target)."""
        return self.overhead_seconds / self.evaluation_seconds if self.evaluation_seconds > 0 else math.nan


class _Signals:
    """SIGINT/SIGTERM -> KeyboardInterrupt, except inside critical sections, where it is deferred."""

    def __init__(self) -> None:
        self.critical = False
        self.pending = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.critical:
            self.pending = True
        else:
            raise KeyboardInterrupt(f"signal {signum}")

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        try:
            yield
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self.critical = True
        try:
            yield
        finally:
            self.critical = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt("deferred signal")


def _objective_values(evaluation: Evaluation, names: Sequence[str]) -> tuple[list[float] | None, str | None]:
    """Values in objective order, or the reason they cannot be used."""
    if evaluation.failed:
        return None, evaluation.reason or "evaluation failed"
    missing = [n for n in names if n not in evaluation.values]
    if missing:
        return None, f"evaluation lacks objectives {missing}"
    values = [float(evaluation.values[n]) for n in names]
    if not all(math.isfinite(v) for v in values):
        return None, f"non-finite objective values {dict(zip(names, values))}"
    return values, None


def run_search(
    space: SearchSpace,
    scorer: ScorerLike,
    optimizer: Optimizer,
    ledger: Ledger,
    *,
    budget_evals: int | None = None,
    budget_seconds: float | None = None,
    batch_size: int = 1,
    constraints: Callable[[Evaluation], Sequence[float]] | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
) -> SearchResult:
    """Run (or resume) a search until ``budget_evals`` finished trials are in the ledger, the
    time budget is spent, the optimizer is exhausted, or SIGINT/SIGTERM arrives.

    ``constraints`` maps an evaluation to values that must all be <= 0 for the trial to be
    feasible (optuna's convention); infeasible trials never enter the Pareto front. Each
    ``callbacks`` entry is called with a `TrialRecord` after every finished trial.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    started = time.perf_counter()
    ledger.fail_running("interrupted: the process stopped before the evaluation finished")
    optimizer.bind(space, ledger, budget=budget_evals, batch_size=batch_size)
    durability = WriteBehind()
    optimizer.write_behind(durability)
    archive = ledger.archive()
    done = len(ledger.finished())
    result = SearchResult(archive=archive, n_finished=done, n_new=0)
    signals = _Signals()
    bar = _progress_bar(progress, budget_evals, done)
    names = ledger.objective_names
    try:
        with signals.installed():
            while True:
                if budget_evals is not None and done >= budget_evals:
                    result.stopped_by = "budget"
                    break
                if budget_seconds is not None and time.perf_counter() - started >= budget_seconds:
                    result.stopped_by = "time"
                    break
                n = batch_size if budget_evals is None else min(batch_size, budget_evals - done)
                t0 = time.perf_counter()
                with signals.deferred():
                    # a coordinated optimizer queues its checkpoint (after a ledger fsync); the
                    # fsync of the lines this ask wrote (optuna) comes after: both run while the
                    # batch evaluates, not while optuna appends, which an fsync would stall
                    candidates = optimizer.ask(n)
                    durability.submit(ledger.sync)
                ask_share = (time.perf_counter() - t0) / max(len(candidates), 1)
                if not candidates:
                    result.stopped_by = "exhausted"
                    break
                for cand in candidates:
                    t1 = time.perf_counter()
                    recipe = cand.recipe if cand.recipe is not None else space.decode(cand.x, seed=ledger.seed, trial=cand.key)
                    pre = ask_share + time.perf_counter() - t1
                    evaluation, eval_seconds = evaluate_guarded(scorer, recipe)
                    t3 = time.perf_counter()
                    with signals.deferred():
                        durability.wait()  # the checkpoint holding this candidate is durable
                        number, values = _record(ledger, optimizer, cand, recipe, evaluation, names, constraints, pre, archive)
                    overhead = pre + time.perf_counter() - t3
                    done += 1
                    result.n_new += 1
                    result.evaluation_seconds += eval_seconds
                    result.overhead_seconds += overhead
                    result.overheads.append(overhead)
                    record = TrialRecord(number, cand, recipe, evaluation, values, archive.history[-1][1], overhead)
                    for callback in callbacks:
                        callback(record)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(hv=f"{record.hypervolume:.4g}", front=len(archive.front), refresh=False)
        durability.close()
        ledger.sync()
        optimizer.save()
    except KeyboardInterrupt:
        result.stopped_by = "interrupt"
        durability.close()  # no queued checkpoint may land after the one saved below
        ledger.fail_running("interrupted: the run was stopped (SIGINT/SIGTERM)")
        ledger.sync()
        optimizer.save()
    finally:
        optimizer.write_behind(None)
        durability.close()
        if bar is not None:
            bar.close()
    result.n_finished = done
    result.wall_seconds = time.perf_counter() - started
    return result


def _record(
    ledger: Ledger,
    optimizer: Optimizer,
    cand: Candidate,
    recipe: MergeRecipe,
    evaluation: Evaluation,
    names: Sequence[str],
    constraints: Callable[[Evaluation], Sequence[float]] | None,
    pre_overhead: float,
    archive: ParetoArchive,
) -> tuple[int, list[float] | None]:
    """Ledger write, then tell, then archive (the crash-safe order)."""
    values, failure, constraint_values, attrs = finished_attrs(
        ledger, recipe, evaluation, names, constraints, pre_overhead, cand.key if cand.coordinated else None
    )
    value_map = None if values is None else dict(zip(names, values))
    if cand.trial is not None:
        ledger.finish_live(cand.trial, attrs, value_map)
        number = cand.trial.number
    else:
        number = ledger.add_finished(cand.params, cand.distributions, attrs, value_map)
    optimizer.tell(cand, Failure(failure or "failed") if values is None else values)
    feasible = constraint_values is None or all(c <= 0 for c in constraint_values)
    had_reference = archive.reference_point is not None
    archive.add(number, values, feasible=feasible)
    if not had_reference and archive.reference_point is not None:
        ledger.record_reference_point(archive.reference_point)
    return number, values


def evaluate_guarded(scorer: ScorerLike, recipe: MergeRecipe) -> tuple[Evaluation, float]:
    """The scorer's evaluation of `recipe` and its wall seconds.

    Scorers return failures as failed evaluations; a wrapper may still raise, and that too must fail
    the trial, never the run (or a worker).
    """
    start = time.perf_counter()
    try:
        evaluation = scorer.evaluate(recipe)
    except Exception as exc:
        evaluation = Evaluation.failure(f"{type(exc).__name__}: {exc}")
    return evaluation, time.perf_counter() - start


def finished_attrs(
    ledger: Ledger,
    recipe: MergeRecipe,
    evaluation: Evaluation,
    names: Sequence[str],
    constraints: Callable[[Evaluation], Sequence[float]] | None,
    pre_overhead: float,
    candidate: int | None,
) -> tuple[list[float] | None, str | None, list[float] | None, dict[str, Any]]:
    """(values, failure, constraint values, ledger attributes) of one finished evaluation.

    Shared by the single-process loop and the workers, so a trial reads the same in the ledger
    whichever of them evaluated it.
    """
    values, failure = _objective_values(evaluation, names)
    constraint_values = None
    if values is not None and constraints is not None:
        constraint_values = [float(c) for c in constraints(evaluation)]
    attrs = ledger.trial_attrs(
        recipe_json=recipe.to_json(),
        values=None if values is None else dict(zip(names, values)),
        details=evaluation.details,
        timings={**evaluation.timings, "search_overhead": pre_overhead},
        failure=failure,
        constraints=constraint_values,
        candidate=candidate,
    )
    return values, failure, constraint_values, attrs


def _progress_bar(enabled: bool, total: int | None, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="search", unit="trial", dynamic_ncols=True)
