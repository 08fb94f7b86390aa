"""`Scorer`: evaluates a recipe's objectives; the abstract base of the backends.

The template method `Scorer.evaluate` owns what every backend must get right the same way:
timing (merge, swap, inference), the timeout, and turning any failure (exception, non-finite
value, timeout) into `Evaluation(failed=True, reason=...)` so that one bad candidate never stops a
search. Backends implement three primitives: put a recipe's weights in place, greedy generation,
and teacher-forced log-probabilities.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ._evaluation import Evaluation
from ._objective import Objective
from ._plan import Generation, ScoringPlan, TokenIds


class EvaluationTimeout(Exception):
    """Raised inside an evaluation when its deadline has passed."""


class Deadline:
    """A point in time that long-running loops check between model calls.

    Checks are cooperative: a single forward pass (or one vLLM call) is never interrupted, so an
    evaluation can overrun its timeout by at most one such call. Killing a thread mid-forward
    would leave the live model half-written, which is worse than a short overrun.
    """

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._end = math.inf if timeout is None else time.perf_counter() + timeout

    def check(self) -> None:
        if time.perf_counter() > self._end:
            raise EvaluationTimeout(f"timeout: evaluation exceeded {self.timeout:g} s")


@dataclass(frozen=True)
class SwapResult:
    """What putting a recipe in place cost: the engine's `MergeStats` and the two timings."""

    stats: Any
    merge_seconds: float
    swap_seconds: float


def _check_finite(values: dict[str, float]) -> None:
    bad = [f"{name}={value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise FloatingPointError(f"non-finite objective value: {', '.join(bad)}")


class Scorer(ABC):
    """Scores recipes on a fixed list of objectives.

    Subclasses tokenize the calibration sets once in their constructor (via `ScoringPlan`) and
    implement `_swap_in`, `_generate` and `_logprobs`.
    """

    def __init__(self, objectives: Sequence[Objective], tokenizer: Any, *, timeout: float | None = None,
                 context_length: int | None = None) -> None:
        """``context_length``: the model's, in tokens (None: unchecked); longer calibration items are refused."""
        if not objectives:
            raise ValueError("a scorer needs at least one objective")
        self._plan = ScoringPlan(objectives, tokenizer, context_length)
        self._tokenizer = tokenizer
        self._context_length = context_length
        self.timeout = timeout
        self._live: tuple[Evaluation, int | None, Any] | None = None
        """The last evaluation, its items per set and its merge statistics: what `extend` continues."""

    @property
    def objectives(self) -> list[Objective]:
        return list(self._plan.objectives)

    def evaluate(self, recipe: Any, *, timeout: float | None = None, items: int | None = None) -> Evaluation:
        """Merge ``recipe`` into the live model and score every objective; never raises.

        ``timeout`` (seconds) overrides the scorer's default for this call. ``items``: score only
        the first ``items`` items of every calibration set (a rung of multi-fidelity search;
        `extend` adds more of them later without merging again).
        """
        return self._evaluate(recipe, Deadline(self.timeout if timeout is None else timeout), items)

    def items(self, items: int | None = None) -> int:
        """Calibration items one evaluation of the first ``items`` per set scores (all: None)."""
        return self._plan.items(items)

    def extend(self, evaluation: Evaluation, items: int, *, timeout: float | None = None) -> Evaluation:
        """``evaluation`` (this scorer's latest, of the candidate still in the live model)
        continued to the first ``items`` items of every calibration set: only the items it lacks
        are scored, and every value is recomputed from the joined per-item results
        (`ScoringPlan.combine`), so the result equals ``evaluate(recipe, items=items)`` at the
        cost of the added items. Never raises; a failure is a failed evaluation."""
        live = self._live
        if live is None or live[0] is not evaluation or evaluation.failed:
            return Evaluation.failure("extend: the evaluation is not this scorer's latest successful one (the live model moved on)")
        _, done, stats = live
        if done is None or done >= items:
            return evaluation
        start = time.perf_counter()
        timings: dict[str, float] = {"merge": 0.0, "swap": 0.0, "inference": 0.0}
        self._deadline = Deadline(self.timeout if timeout is None else timeout)
        try:
            _, more, n_sequences = self._plan.run(self._checked_generate, self._checked_logprobs, stats, start=done, stop=items)
            values, details = self._plan.combine(evaluation.values, evaluation.details, more)
            timings["inference"] = time.perf_counter() - start
            timings["items_per_s"] = n_sequences / timings["inference"] if timings["inference"] > 0 else 0.0
            _check_finite(values)
        except Exception as exc:  # noqa: BLE001 - as in `evaluate`: a failure is a result
            timings["inference"] = time.perf_counter() - start
            reason = str(exc) if isinstance(exc, EvaluationTimeout) else f"{type(exc).__name__}: {exc}"
            self._live = None
            return self._failure(reason.splitlines()[0], timings, start)
        timings["total"] = time.perf_counter() - start
        extended = Evaluation(values=values, details=details, timings=timings)
        self._live = (extended, items, stats)
        return extended

    def warm_up(self, recipe: Any) -> Evaluation:
        """Evaluate ``recipe`` once without a timeout, to be discarded: the one-time costs of a
        process (compiling the merge kernels that recipe's methods use, building the engine's tables,
        the inference kernels' first calls) then fall before the first timed candidate instead of
        counting against its timeout. Call it with a typical recipe (the search space's starting
        point) before a search; a later candidate of other methods may still compile its own kernels.

        First it runs the merge engine's one-time sorts that ``recipe`` reads, side by side and with
        their memory checked (`MergeEngine.build_sorts`; their seconds are ``timings["sorts"]``).
        Unlike a failure inside the evaluation, a `MergeError` there (the sorts would not fit in
        memory) is raised: it is the run's, not a candidate's."""
        sorts = self.build_sorts([recipe])
        evaluation = self._evaluate(recipe, Deadline(None))
        evaluation.timings["sorts"] = sorts
        return evaluation

    @abstractmethod
    def build_sorts(self, recipes: Sequence[Any]) -> float:
        """Run the one-time sorts ``recipes`` read in the engine that merges them, side by side and
        memory checked (`MergeEngine.build_sorts`: exact pruning's orders go to memory-mapped files
        in that engine's `spill_dir` when memory is short; raises its `MergeError`); returns the seconds."""

    def _evaluate(self, recipe: Any, deadline: Deadline, items: int | None = None) -> Evaluation:
        start = time.perf_counter()
        timings: dict[str, float] = {"merge": 0.0, "swap": 0.0, "inference": 0.0}
        self._deadline = deadline
        self._live = None
        phase, phase_start = "merge", start  # the phase under way: a failure is charged to it
        try:
            swapped = self._swap_in(recipe)
            timings["merge"], timings["swap"] = swapped.merge_seconds, swapped.swap_seconds
            phase, phase_start = "inference", time.perf_counter()
            deadline.check()
            values, details, n_sequences = self._plan.run(
                self._checked_generate, self._checked_logprobs, swapped.stats, stop=items)
            timings["inference"] = time.perf_counter() - phase_start
            timings["items_per_s"] = n_sequences / timings["inference"] if timings["inference"] > 0 else 0.0
            phase = ""
            _check_finite(values)
        except Exception as exc:  # noqa: BLE001 - a failed candidate (timeout included) is a result, not a crash
            if phase:  # keep what the failed phase had cost, so a timed-out trial still shows its split
                timings[phase] = time.perf_counter() - phase_start
            reason = str(exc) if isinstance(exc, EvaluationTimeout) else f"{type(exc).__name__}: {exc}"
            return self._failure(reason.splitlines()[0], timings, start)
        timings["total"] = time.perf_counter() - start
        evaluation = Evaluation(values=values, details=details, timings=timings)
        self._live = (evaluation, items, swapped.stats)
        return evaluation

    @contextmanager
    def scoring(self, objectives: Sequence[Objective]) -> Iterator["Scorer"]:
        """This scorer, scoring ``objectives`` instead of its own inside the block, in the same live
        model: a run's end re-scores its pick on more items and on held-out sets without a second
        model (a second vLLM engine does not fit beside the first on the GPU) or a second compile."""
        if not objectives:
            raise ValueError("a scorer needs at least one objective")
        saved = self._plan, self._live
        self._plan, self._live = ScoringPlan(objectives, self._tokenizer, self._context_length), None
        try:
            yield self
        finally:
            self._plan, self._live = saved[0], None

    def close(self) -> None:
        """Release the backend's resources (model, engine). The scorer is unusable afterwards."""

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _failure(self, reason: str, timings: dict[str, float], start: float) -> Evaluation:
        timings["total"] = time.perf_counter() - start
        return Evaluation.failure(reason, timings)

    def _checked_generate(self, requests: Sequence[tuple[TokenIds, TokenIds]], *, stop: Sequence[str] | None = None,
                          max_new_tokens: int | None = None) -> list[Generation]:
        self._deadline.check()
        return self._generate(requests, self._deadline, stop=stop, max_new_tokens=max_new_tokens)

    def _checked_logprobs(self, pairs: Sequence[tuple[TokenIds, TokenIds]]) -> list[list[float]]:
        self._deadline.check()
        return self._logprobs(pairs, self._deadline)

    @abstractmethod
    def _swap_in(self, recipe: Any) -> SwapResult:
        """Make the backend's model use ``recipe``'s merged weights."""

    @abstractmethod
    def _generate(self, requests: Sequence[tuple[TokenIds, TokenIds]], deadline: Deadline, *,
                  stop: Sequence[str] | None = None, max_new_tokens: int | None = None) -> list[Generation]:
        """Greedy generations for (prompt, draft) requests, in order, honouring the scorer's stop
        rules. The draft (the reference answer, possibly empty) may speed generation up and let the
        backend return its log-probs (`Generation.draft_logprobs`); it must not change the text.
        ``stop`` / ``max_new_tokens`` replace the scorer's own for this call (an lm-eval task's
        ``until`` and ``max_gen_toks``)."""

    @abstractmethod
    def _logprobs(self, pairs: Sequence[tuple[TokenIds, TokenIds]], deadline: Deadline) -> list[list[float]]:
        """Per-token log-probabilities of each continuation given its prefix, in order."""
