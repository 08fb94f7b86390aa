"""Several workers, one search: `run_worker` evaluates candidates from a shared ledger.

Each worker process owns a scorer (one GPU) and loops: claim a trial, evaluate, finish it.

* **optuna samplers** run inside every worker, as optuna intends for distributed studies: each
  worker has its own sampler instance (seeded apart) and claims as ``study.ask`` does (popping a
  WAITING trial first; `TrialStore.claim` batches its writes). On a database a WAITING trial is claimed by exactly one worker: optuna
  moves it to RUNNING under ``SELECT ... FOR UPDATE`` and a second claimant sees it RUNNING.
* **coordinated optimizers** (nevergrad, baselines) run in one coordinator (`Coordinator`, a
  thread in whichever worker holds the study's lease, `search._lease`). It asks, checkpoints,
  enqueues candidates as WAITING trials carrying ``user_attrs["candidate"]``, and tells the
  optimizer what the ledger finished. Workers only pop those queued trials.

**Budget rule** (exact across workers): a trial counts when `Ledger.finished` counts it. A worker
claims only after a look at the counts saw ``counted + running < budget`` (a coordinated worker
that saw room but an empty queue, or whose finish is written behind, pops without a new look;
a worker's own claim on PostgreSQL takes that look itself, in the claim's round trip), then
re-reads the counts and keeps its claim only if ``counted + (RUNNING trials other than its
own) + 1 <= budget`` (on PostgreSQL a queued trial's is read while it evaluates); otherwise it gives the
claim back (failed as ``interrupted``, a queued trial re-queued) and backs off. Of any set of
kept claims, the last to check saw all the others, so kept claims never exceed the budget; the
ledger ends with exactly ``budget`` counted trials (claims may collide and retry, never overshoot).

**Failures**: a worker heartbeats its RUNNING trial (database storages); when it dies, the
first worker that checks (`optuna.storages.fail_stale_trials`, once per heartbeat interval and
worker, before a claim) fails the
trial and optuna's `RetryFailedTrialCallback` re-queues it once, with its candidate id. A killed
coordinator stops renewing its lease; after the lease's ttl another worker's coordinator takes
it, restores the checkpoint and enqueues the candidates the study never saw (`study_state`: one
mechanism re-queues a candidate, never two). The coordinator reads the study through
`search._study_watch`: one aggregate query per poll, the trials only when one finished or appeared.
"""

from __future__ import annotations

import random
import threading
import time
import zlib
from concurrent.futures import wait
from dataclasses import dataclass, field
from typing import Callable, Collection, Literal, Sequence

import optuna
from optuna.storages import RDBStorage, RetryFailedTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from evomerge.objectives import Evaluation

from ._lease import DatabaseLease, FileLease, Lease, LeaseLost
from ._ledger import CONSTRAINTS_PREFIX, Ledger
from ._loop import ScorerLike, _Signals, evaluate_guarded, finished_attrs
from ._optimizers import CoordinatedOptimizer, Failure, Optimizer, OptunaOptimizer
from ._optimizers._base import genome_distributions
from ._space import SearchSpace
from ._study_watch import TrialLike, study_watch
from ._pg_trial_store import trial_store
from ._worker_store import Claim, Counts, counted_and_running, counts_toward_budget, retried_numbers


@dataclass
class WorkerResult:
    """What one worker did; the shared ledger holds the trials."""

    n_new: int = 0
    evaluation_seconds: float = 0.0
    overheads: list[float] = field(default_factory=list)
    """Per evaluated trial: claim (stale-trial check when due, budget counts, the claim and its
    genome, budget re-check), decode and the trial's ledger write with the counts that follow;
    waiting for work is not overhead."""
    gave_back: int = 0
    stopped_by: Literal["budget", "exhausted", "interrupt"] = "budget"
    wall_seconds: float = 0.0

    @property
    def overhead_seconds(self) -> float:
        return sum(self.overheads)


def make_lease(ledger: Ledger, owner: str, *, ttl: float) -> Lease:
    """The coordinator lease matching the ledger's storage (database row, or flock by the journal)."""
    if isinstance(ledger.storage, RDBStorage):
        return DatabaseLease(ledger.storage.engine, ledger.study_name, owner, ttl=ttl)
    if ledger.run_dir is not None:
        return FileLease(ledger.run_dir, ledger.study_name, owner)
    raise ValueError("open the ledger with a heartbeat to share a database storage among workers")


def study_state(trials: Sequence[TrialLike], max_retry: int) -> tuple[list[TrialLike], set[int]]:
    """From one snapshot of the study: its *final* counted trials, and the candidate ids it *owns*.

    The **re-queue rule** of a coordinator: a candidate is re-queued by exactly one mechanism.

    * Owned by the study (the coordinator never enqueues it): a WAITING or RUNNING trial holds it;
      or its latest attempt was failed by a heartbeat check (FAIL, no ``failure`` attribute, not
      yet in any ``retry_history``) and has retries left: optuna's `RetryFailedTrialCallback`
      re-queues it right after failing it; or its latest attempt was given back (``interrupted``)
      and no trial is ``requeued_from`` it yet: `Ledger.give_back` re-queues it right after.
      Such a failed attempt is not told to the optimizer either: its retry's result will be.
    * Final (told to the optimizer): counted trials (`Ledger.finished`) not owned as above; a
      heartbeat failure with no retry left is final (a failure).
    * Neither (a pending candidate the study never saw: its coordinator died between the
      checkpoint and the enqueue): the coordinator enqueues it.

    Each step of a candidate's lineage (enqueue, claim, fail, retry/requeue) moves it between
    owned states or to final, never through "neither", so whatever moment the snapshot is taken
    the coordinator and the study never both re-queue a candidate. A process that dies *between*
    failing a trial by heartbeat and re-queueing it (two storage writes) would leave that
    candidate owned and never run: the coordinator re-queues such an attempt itself once it has
    waited ``grace`` seconds for its retry (`Coordinator`, `awaiting_retry`).
    """
    retried = retried_numbers(trials)
    requeued = {t.user_attrs["requeued_from"] for t in trials if "requeued_from" in t.user_attrs}
    awaiting = {t.number for t in awaiting_retry(trials, max_retry, retried)}
    owned: set[int] = set()
    for t in trials:
        cid = t.user_attrs.get("candidate")
        if cid is None:
            continue
        if t.state in (TrialState.WAITING, TrialState.RUNNING) or t.number in awaiting:
            owned.add(int(cid))
        elif t.state == TrialState.FAIL and t.user_attrs.get("interrupted", False) and t.number not in requeued:
            owned.add(int(cid))
    final = [
        t for t in trials
        if counts_toward_budget(t.state, t.number, bool(t.user_attrs.get("interrupted", False)), retried)
        and t.number not in awaiting
    ]
    return final, owned


def awaiting_retry(trials: Sequence[TrialLike], max_retry: int, retried: Collection[int] | None = None) -> list[TrialLike]:
    """The candidates' attempts failed by a heartbeat check (FAIL, no ``failure`` attribute) that
    no trial retries yet and that have retries left: optuna's `RetryFailedTrialCallback` re-queues
    one right after failing it, in the process that failed it. ``retried``: `retried_numbers` of
    ``trials``, when known."""
    retried = retried_numbers(trials) if retried is None else retried
    return [
        t for t in trials
        if t.state == TrialState.FAIL and "candidate" in t.user_attrs and not t.user_attrs.get("interrupted", False)
        and "failure" not in t.user_attrs and t.number not in retried
        and len(t.system_attrs.get("retry_history", ())) < max_retry
    ]


class _Heartbeat:
    """Beats for the worker's RUNNING trial, from one thread for the worker's life, so a long
    evaluation is not taken for a dead one. A trial's first beat goes with its claim
    (`TrialStore.claim`); the next ones come at most an interval apart. A beat that lands just
    after its trial finished is harmless: stale checks look at RUNNING trials only."""

    def __init__(self, storage: RDBStorage) -> None:
        self._storage = storage
        self._interval = storage.get_heartbeat_interval() or 1
        self.trial_id: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            trial_id = self.trial_id
            if trial_id is not None:
                self._storage.record_heartbeat(trial_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Coordinator:
    """Drives a coordinated optimizer for all workers while holding the study's lease."""

    def __init__(
        self, space: SearchSpace, optimizer: CoordinatedOptimizer, ledger: Ledger, lease: Lease,
        *, budget: int, queue: int, poll: float, renew_every: float, grace: float,
    ) -> None:
        """``renew_every``: seconds between lease renewals, and between a waiting coordinator's
        attempts to take the lease (a quarter of the lease's ttl: every renewal is a committed
        write, and a lease renewed more often than it can expire is no safer). ``grace``: seconds
        a heartbeat failure may wait for its retry before the coordinator re-queues it itself (the
        failing process re-queues it milliseconds after failing it, unless it died in between)."""
        self.space, self.optimizer, self.ledger, self.lease = space, optimizer, ledger, lease
        self.budget, self.queue, self.poll, self.renew_every, self.grace = budget, queue, poll, renew_every, grace
        self._awaiting: dict[int, float] = {}  # trial id -> when this coordinator first saw it await its retry
        self.error: BaseException | None = None
        self.watch = study_watch(ledger.study, ledger.storage)
        self.store = trial_store(ledger.study, ledger.storage)

    def run(self, stop: threading.Event) -> None:
        """Wait for the lease, then coordinate until the budget is spent or ``stop`` is set."""
        try:
            while not self.lease.acquire():
                if stop.wait(max(self.poll, self.renew_every)) or self._budget_spent():
                    return
            try:
                self._coordinate(stop)
            finally:
                self.lease.release()
        except LeaseLost:
            return  # a successor took over: it owns the optimizer from here
        except BaseException as exc:  # surfaced by the worker, which stops
            self.error = exc

    def _budget_spent(self) -> bool:
        return self.store.counts().counted >= self.budget

    def _coordinate(self, stop: threading.Event) -> None:
        opt, ledger = self.optimizer, self.ledger
        opt.use_checkpoint(self.lease)
        # one snapshot for both the reconciliation and the re-queue (`study_state`): two reads
        # could see a trial RUNNING in the first and failed-by-heartbeat, not yet retried, in the
        # second, and the candidate would be queued twice (once here, once by the retry)
        trials = self.watch.trials()
        final, owned = study_state(trials, self._max_retry())
        self._note_awaiting(trials)
        counted = counted_and_running(trials)[0]
        opt.bind(self.space, ledger, budget=self.budget, batch_size=self.queue, finished=final)
        for cand in opt.outstanding():
            if cand.key not in owned:  # asked by the predecessor, never enqueued
                self._enqueue(cand.params, cand.key)
        renewed = time.monotonic()  # acquired
        while True:
            # no one can take a lease renewed less than a ttl ago: renewing when due (a
            # coordinator stalled past the ttl renews first thing, and learns it lost the lease)
            if time.monotonic() - renewed >= self.renew_every:
                if not self.lease.renew():
                    raise LeaseLost(f"coordinator {self.lease.owner} lost its lease")
                renewed = time.monotonic()
            # nothing finished or appeared since the last look: nothing to tell, and what to ask
            # was asked then (the in-flight count changes only with this coordinator's tells)
            trials = self.watch.changed()
            if trials is not None:
                counted = counted_and_running(trials)[0]
                self._tell(study_state(trials, self._max_retry())[0])
                self._note_awaiting(trials)
            self._retry_orphans()
            # also on stop: the worker stops once the budget is counted, and the last results
            # must still reach the optimizer (and its checkpoint)
            if counted >= self.budget or stop.is_set():
                return
            in_flight = len(opt.pending_keys)
            n = min(self.queue - in_flight, self.budget - counted - in_flight)
            if n > 0:
                asked = opt.ask(n)  # checkpointed before anyone can see the candidates
                for cand in asked:
                    self._enqueue(cand.params, cand.key)
                if not asked and not in_flight:
                    return  # a finite generator (grid) is exhausted
            stop.wait(self.poll)

    def _max_retry(self) -> int:
        """How often the storage's failed-trial callback re-queues a heartbeat-failed trial."""
        get = getattr(self.ledger.storage, "get_heartbeat_stale_trial_callback", None)
        callback = get() if get is not None else None
        if isinstance(callback, RetryFailedTrialCallback):
            return 1_000_000 if callback._max_retry is None else int(callback._max_retry)
        return 0

    def _note_awaiting(self, trials: Sequence[TrialLike]) -> None:
        """Remember since when each heartbeat failure of a snapshot awaits its retry."""
        now = time.monotonic()
        self._awaiting = {t._trial_id: self._awaiting.get(t._trial_id, now) for t in awaiting_retry(trials, self._max_retry())}

    def _retry_orphans(self) -> None:
        """Re-queue, as the storage's retry callback would have, the heartbeat failures that
        awaited their retry for ``grace`` seconds: the process that failed them died before
        re-queueing them. Checked again on a fresh read of the study first, so a retry that
        appeared meanwhile is not doubled."""
        now = time.monotonic()
        if not any(now - since >= self.grace for since in self._awaiting.values()):
            return
        self._note_awaiting(self.watch.trials())
        callback = self.ledger.storage.get_heartbeat_stale_trial_callback()  # type: ignore[attr-defined]
        for trial_id, since in list(self._awaiting.items()):
            if now - since >= self.grace:
                callback(self.ledger.study, self.ledger.storage.get_trial(trial_id))
                del self._awaiting[trial_id]

    def _tell(self, final: Sequence[TrialLike]) -> None:
        """Tell the optimizer the final trials of its pending candidates, then checkpoint."""
        opt, pending, told = self.optimizer, self.optimizer.pending_keys, False
        for trial in final:
            cid = trial.user_attrs.get("candidate")
            if cid is not None and int(cid) in pending:
                values = self.ledger.objective_values(trial)
                result = Failure(trial.user_attrs.get("failure", "failed")) if values is None else values
                opt.tell(opt._candidate(int(cid)), result)
                told = True
        if told:
            opt.save()

    def _enqueue(self, params: dict[str, object], cid: int) -> None:
        self.ledger.study.enqueue_trial(params, user_attrs={"candidate": cid}, skip_if_exists=False)


def run_worker(
    space: SearchSpace,
    scorer: ScorerLike,
    optimizer: Optimizer,
    ledger: Ledger,
    *,
    budget_evals: int,
    worker_id: str,
    constraints: Callable[[Evaluation], Sequence[float]] | None = None,
    queue: int = 4,
    lease_ttl: float = 10.0,
    poll: float = 0.2,
) -> WorkerResult:
    """Evaluate trials of the shared ledger until it holds ``budget_evals`` counted trials (or
    SIGINT/SIGTERM). ``queue``: candidates a coordinator keeps in flight (the number of workers
    is a good value; it is nevergrad's ``num_workers``); ``lease_ttl``: seconds without a
    lease renewal after which another worker's coordinator takes over."""
    started = time.perf_counter()
    result = WorkerResult()
    coordinated = isinstance(optimizer, CoordinatedOptimizer)
    stop = threading.Event()
    coordinator_thread = None
    coordinator = None
    if coordinated:
        lease = make_lease(ledger, worker_id, ttl=lease_ttl)
        coordinator = Coordinator(
            space, optimizer, ledger, lease, budget=budget_evals, queue=queue, poll=poll, renew_every=lease_ttl / 4,
            grace=lease_ttl,
        )
        coordinator_thread = threading.Thread(target=coordinator.run, args=(stop,), name="coordinator", daemon=True)
        coordinator_thread.start()
        # queued candidates carry all their params: the study's sampler is only consulted for
        # hooks, and optuna's default (TPE) would be the costlier one to consult
        ledger.study.sampler = optuna.samplers.RandomSampler()
    else:
        if isinstance(optimizer, OptunaOptimizer):
            optimizer.seed_offset = zlib.crc32(worker_id.encode()) % 1_000_003
        optimizer.bind(space, ledger, budget=budget_evals)
    distributions = genome_distributions(space)
    store = trial_store(ledger.study, ledger.storage)
    heartbeat_storage = ledger.storage if isinstance(ledger.storage, RDBStorage) and ledger.storage.get_heartbeat_interval() else None
    stale_check = _StaleCheck(ledger.study, heartbeat_storage)
    beat = _Heartbeat(heartbeat_storage) if heartbeat_storage is not None else None
    names, seed = ledger.objective_names, ledger.seed  # the seed is a study attribute: one read, not one per trial
    signals = _Signals()
    claim: Claim | None = None
    counts: Counts | None = None  # the last finish's, while nothing else happened since
    room = False  # the last look saw budget room but an empty queue, or the last finish went behind: claim with no new look
    try:
        with signals.installed():
            while True:
                if coordinator is not None and coordinator.error is not None:
                    raise coordinator.error
                t0 = time.perf_counter()
                # a look after a stale check (it may have re-queued trials), unless the claim pops
                # first anyway and looks itself (``room``)
                if (stale_check() or counts is None) and not room:
                    counts = store.counts()
                if counts is not None:
                    if counts.counted >= budget_evals:
                        break
                    if counts.counted + len(counts.running) >= budget_evals or (coordinated and not counts.waiting):
                        # work in flight elsewhere may finish, or go stale and return; or the
                        # coordinator refills the queue: then pop at once (the claim's second look
                        # keeps the budget exact; this look only spares claims bound to go back)
                        room = coordinated and counts.counted + len(counts.running) < budget_evals
                        time.sleep(poll)
                        counts = None
                        continue
                with signals.deferred():
                    # coordinated optimizers queue every candidate: their workers only pop. A
                    # worker's own claim carries the budget: with no look since its last finish
                    # (written behind), PostgreSQL's store takes the first look in the claim
                    claim = store.claim(
                        distributions, {"worker": worker_id}, pop=counts is None or counts.waiting > 0, fresh=not coordinated,
                        budget=None if coordinated else budget_evals,
                    )
                counts, room = None, False
                if claim is None:  # another worker popped the last queued trial first, or the claim's look saw no room
                    time.sleep(random.uniform(0, poll))
                    continue
                if beat is not None:
                    beat.trial_id = claim.trial_id
                try:
                    # the second look may still be on its way (PostgreSQL reads it while a queued
                    # trial evaluates): then it is checked after the evaluation, before the finish
                    looked = claim.look.done()
                    reason = _keep_claim(claim, budget_evals, coordinated, look=looked)
                    if reason is None:
                        trial = claim.trial
                        key = trial.number if claim.candidate is None else claim.candidate
                        recipe = space.decode(space.from_params(trial.params), seed=seed, trial=key)
                        pre = time.perf_counter() - t0
                        evaluation, eval_seconds = evaluate_guarded(scorer, recipe)
                        t2 = time.perf_counter()
                        if not looked:
                            reason = _keep_claim(claim, budget_evals, coordinated)
                    if reason is not None:
                        with signals.deferred():
                            wait([claim.written])  # its genome first: the give-back copies the trial
                            # a queued trial without a candidate cannot be told to a coordinator: dropped
                            requeue = claim.queued and not (coordinated and claim.candidate is None)
                            ledger.give_back(claim.trial_id, reason, requeue=requeue)
                            claim = None
                        result.gave_back += 1
                        time.sleep(random.uniform(0, poll))  # break the symmetry of a collision
                        continue
                    values, _, _, attrs = finished_attrs(ledger, recipe, evaluation, names, constraints, pre, None)
                    system_attrs = {f"{CONSTRAINTS_PREFIX}{i}": float(c) for i, c in enumerate(attrs.get("constraints", ()))}
                    with signals.deferred():
                        # a worker does not wait for its finish (PostgreSQL writes it behind; the
                        # others return the counts that follow), and claims its next trial at
                        # once: a coordinated pop's second look, or a worker's own claim's first
                        # look, decides
                        counts = store.finish(
                            trial, attrs, system_attrs, None if values is None else ledger.study_values(dict(zip(names, values))),
                            behind=coordinated or store.claims_look,
                        )
                        claim = None
                    room = counts is None
                finally:
                    if beat is not None:
                        beat.trial_id = None
                result.n_new += 1
                result.evaluation_seconds += eval_seconds
                result.overheads.append(pre + time.perf_counter() - t2)
        result.stopped_by = "budget"
    except KeyboardInterrupt:
        result.stopped_by = "interrupt"
        if claim is not None:
            wait([claim.look, claim.written])  # its genome write first: the give-back copies the trial
            ledger.give_back(claim.trial_id, "interrupted: the worker was stopped (SIGINT/SIGTERM)", requeue=True)
    finally:
        stop.set()
        store.close()
        if beat is not None:
            beat.close()
        if coordinator_thread is not None:
            coordinator_thread.join()
    result.wall_seconds = time.perf_counter() - started
    return result


class _StaleCheck:
    """`optuna.storages.fail_stale_trials` at most once per heartbeat interval: a trial is stale
    only after two silent intervals, so checking more often finds nothing sooner; before every
    claim it was a query per trial and per worker."""

    def __init__(self, study: optuna.Study, storage: RDBStorage | None) -> None:
        self.study = study
        self.interval = None if storage is None else float(storage.get_heartbeat_interval() or 1)
        self.due = 0.0

    def __call__(self) -> bool:
        """Check if one is due; True when it ran (it may have failed and re-queued trials)."""
        if self.interval is None or time.monotonic() < self.due:
            return False
        fail_stale_trials(self.study)
        self.due = time.monotonic() + self.interval
        return True


def _keep_claim(claim: Claim, budget: int, coordinated: bool, *, look: bool = True) -> str | None:
    """None to keep a fresh claim, else why it goes back (the budget rule, module docstring);
    ``look=False``: only what needs no second look."""
    if coordinated and claim.candidate is None:
        return "given back: a queued trial without a candidate (coordinated optimizers queue every candidate)"
    if not look:
        return None
    counts = claim.counts
    others = len(counts.running - {claim.trial_id})
    if counts.counted + others + 1 > budget:
        return f"given back: {counts.counted} counted + {others} running reach the budget of {budget}"
    return None
