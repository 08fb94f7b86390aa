"""`CandidateQueue`: a coordinated optimizer's candidates reach the run loop as queued trials.

A coordinated optimizer (nevergrad, the baselines) keeps its state outside the study. Its
candidates are enqueued as WAITING trials carrying their params and ``user_attrs["candidate"]``
(``study.add_trial``: one write), the run loop claims them with ``study.ask`` like any trial, and
`step` tells the optimizer what the study finished. One process drives the queue at a time: the
run loop itself (one process, ``depth=1``: the optimizer sees exactly the ask/tell sequence of an
uninterrupted run, also after a SIGKILL), or the holder of the study's lease among several
workers (`search.scaleout`).

**Re-queue rule** (a candidate is re-run by exactly one mechanism; docs/scale-out.md): for each
candidate asked but not told, its attempts (trials with its id) decide: one counts -> its result
is told; one is WAITING or RUNNING -> in flight; the last failed a heartbeat check with no retry
left (`MAX_RETRY`) -> told as a failure; otherwise whoever cut it off re-queues it right after,
unless that process died in between: a candidate left so for ``grace`` seconds is re-queued here
(one process: at once, nothing else writes).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING

from optuna.trial import FrozenTrial, TrialState

from ._ledger import MAX_RETRY, Ledger, counted, rerun_numbers
from ._optimizers import CoordinatedOptimizer, Failure, Result
from ._optimizers._base import trial_result

if TYPE_CHECKING:
    from ._space import SearchSpace


class CandidateQueue:
    """Keeps up to ``depth`` candidates of ``optimizer`` in flight in the ledger's study."""

    def __init__(
        self, space: "SearchSpace", optimizer: CoordinatedOptimizer, ledger: Ledger, *, budget: int | None, depth: int,
        grace: float,
    ) -> None:
        self.space, self.optimizer, self.ledger = space, optimizer, ledger
        self.budget, self.depth, self.grace = budget, depth, grace
        self._orphans: dict[int, float] = {}  # candidate id -> when first seen cut off with no re-run

    def start(self) -> None:
        """Restore the optimizer, tell it what the ledger finished since its checkpoint, and
        enqueue the candidates it asked that the study never saw (the predecessor died between
        its checkpoint and the enqueue)."""
        trials = self.ledger.trials()
        self.optimizer.bind(self.space, self.ledger, budget=self.budget, batch_size=self.depth, finished=self.ledger.finished(trials))
        seen = {t.user_attrs["candidate"] for t in trials if "candidate" in t.user_attrs}
        for cand in self.optimizer.outstanding():
            if cand.key not in seen:
                self.ledger.enqueue(cand.params, cand.distributions, {"candidate": cand.key})

    def step(self) -> bool:
        """Tell the finished candidates, re-queue the cut-off ones, ask to refill; False when the
        budget is counted, or the optimizer is exhausted with nothing in flight."""
        opt, trials = self.optimizer, self.ledger.trials()
        rerun = rerun_numbers(trials)
        attempts: dict[int, list[FrozenTrial]] = defaultdict(list)
        for t in trials:
            if "candidate" in t.user_attrs:
                attempts[int(t.user_attrs["candidate"])].append(t)
        told = False
        for cid in sorted(opt.pending_keys):
            result = self._settle(cid, attempts[cid], rerun)
            if result is not None:
                opt.tell(opt.candidate(cid), result)
                told = True
        n_counted = sum(1 for t in trials if counted(t, rerun))
        in_flight = len(opt.pending_keys)
        room = self.depth - in_flight
        if self.budget is not None:
            room = min(room, self.budget - n_counted - in_flight)
        asked = opt.ask(room) if room > 0 else []  # checkpointed before anyone can see them
        for cand in asked:
            self.ledger.enqueue(cand.params, cand.distributions, {"candidate": cand.key})
        if told and not asked:
            opt.save()
        spent = self.budget is not None and n_counted >= self.budget
        return not spent and bool(opt.pending_keys)

    def _settle(self, cid: int, tries: list[FrozenTrial], rerun: set[int]) -> Result | None:
        """The result to tell for candidate ``cid`` now, or None (module docstring's rule)."""
        done = [t for t in tries if counted(t, rerun)]
        if done:
            self._orphans.pop(cid, None)
            return trial_result(self.ledger, done[0])
        if not tries or any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in tries):
            self._orphans.pop(cid, None)
            return None
        last = max(tries, key=lambda t: t.number)
        history = list(last.system_attrs.get("retry_history", ()))
        stale = last.user_attrs.get("interrupted") is None and last.number not in rerun
        if stale and len(history) >= MAX_RETRY:
            return Failure(f"its worker died {len(history) + 1} times (trial {last.number})")
        now = time.monotonic()
        if now - self._orphans.setdefault(cid, now) >= self.grace:
            del self._orphans[cid]
            # as optuna's heartbeat retry would have, for a heartbeat failure whose retry never came
            lineage = {"failed_trial": last.system_attrs.get("failed_trial", last.number), "retry_history": [*history, last.number]}
            self.ledger.requeue(last, system_attrs=lineage if stale else None)
        return None
