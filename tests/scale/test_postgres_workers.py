"""Four `evomerge worker` processes (each the one run loop, `evomerge.search.run_search`, on optuna's
RDBStorage with heartbeats) share one search through a real PostgreSQL; one is SIGKILLed
while its trial is RUNNING. The ledger must end with exactly the budget, the killed trial retried
once and only once, no candidate evaluated twice, and a front that matches the ledger.

Heartbeats (1 s, dead after 2 s) and the coordinator lease (2 s) are short so a kill is
noticed quickly; each evaluation on the tiny zoo (16 items per objective, one at a time) takes
~0.3-1 s, long enough for the test to see a worker evaluating (two looks 0.1 s apart) and kill it.
"""

from __future__ import annotations

import os
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Collection
from pathlib import Path

import numpy as np
import optuna
import sqlalchemy as sa
import yaml
from optuna.trial import FrozenTrial, TrialState

from evomerge.search import ParetoArchive, pareto_mask, read_records
from evomerge.search.scaleout import LEASE_TABLE

BUDGET = 14
WORKERS = 4


def _spec(tmp_path: Path, zoo: Path, stage: str, optimizer: dict, budget: int = BUDGET) -> Path:
    spec = {
        "name": "scale",
        "models": {"zoo": {"size": "tiny", "path": str(zoo)}},
        "space": {"method": "ties", "params": ["weight", "density"], "granularity": "layer"},
        "objectives": [
            {"name": s, "metric": "exact_match", "data": f"zoo:data/{s}/calib.jsonl", "size": 24} for s in ("rev", "sort")
        ],
        "scorer": {"batch_size": 1, "max_new_tokens": 16},  # one item at a time: an evaluation lasts long enough to be seen RUNNING
        "stages": [{"name": stage, "optimizer": optimizer, "budget": {"evaluations": budget}}],
        "budget": {"evaluations": budget},
    }
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _start_workers(spec: Path, url: str, tmp_path: Path) -> dict[str, subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = {}
    for i in range(WORKERS):
        wid = f"w{i}"
        log = open(tmp_path / f"{wid}.log", "w")
        procs[wid] = subprocess.Popen(
            [sys.executable, "-m", "evomerge.experiments.cli", "worker", str(spec), "--storage", _named(url, wid),
             "--worker-id", wid, "--heartbeat", "1", "--lease-ttl", "2", "--queue", str(WORKERS), "--quiet"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    return procs


_storages: dict[str, optuna.storages.RDBStorage] = {}


def _named(url: str, worker: str) -> str:
    """The storage URL with libpq's application_name set to the worker id, so the test can see
    that worker's sessions on the server (pg_stat_activity)."""
    return f"{url}{'&' if '?' in url else '?'}application_name={worker}"


def _busy_sessions(url: str, worker: str) -> int:
    """How many of ``worker``'s server sessions are executing a statement right now."""
    with _storages[url].engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :w AND state = 'active'"),
                            {"w": worker}).scalar_one()


def _study(url: str, stage: str) -> optuna.Study | None:
    storage = _storages.get(url) or _storages.setdefault(url, optuna.storages.RDBStorage(url))  # one pool, polled often
    try:
        return optuna.load_study(study_name=stage, storage=storage)
    except KeyError:
        return None  # the workers have not created the study yet


def _trials(url: str, stage: str) -> list[FrozenTrial]:
    study = _study(url, stage)
    return [] if study is None else study.get_trials(deepcopy=False)


def _counted(url: str, stage: str) -> int:
    """Trials that count against the budget, as the ledger counts them (`TrialRecord.state`)."""
    study = _study(url, stage)
    return 0 if study is None else sum(r.state in ("complete", "failed") for r in read_records(study))


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_while_running(
    url: str, stage: str, procs: dict[str, subprocess.Popen], victims: Collection[str] | None = None,
    before: int | None = None,
) -> tuple[str, FrozenTrial]:
    """SIGKILL the first of ``victims`` (default: any worker) that the ledger shows evaluating a
    trial; returns its id and that trial. Under load some workers start late, so the victim is
    whoever evaluates first; the test fails only if the budget ends before anyone could be killed.
    ``before``: kill only while fewer trials than that are counted."""
    candidates = set(procs) if victims is None else set(victims)

    def finished_without_a_kill() -> None:
        if all(proc.poll() is not None for wid, proc in procs.items() if wid in candidates):
            codes = {wid: proc.returncode for wid, proc in procs.items()}
            raise AssertionError(f"the search ended ({codes}) before a worker of {sorted(candidates)} was seen evaluating")

    def evaluating() -> str | None:
        """A live candidate the ledger shows holding a RUNNING trial."""
        trials = _trials(url, stage)
        if before is not None and _counted(url, stage) >= before:
            return None
        return next((w for t in trials if t.state == TrialState.RUNNING and (w := t.user_attrs.get("worker")) in candidates
                     and procs[w].poll() is None), None)

    def frozen_while_running() -> tuple[str, FrozenTrial] | None:
        # the victim may finish its trial between the last look and the kill (a tiny zoo trial
        # takes a fraction of a second): stop it first, let the server finish what it had sent,
        # and kill it only while it holds a RUNNING trial with its genome and not being given
        # back (a transaction it left open is rolled back by the kill, so RUNNING now is RUNNING
        # for good); that trial, or the next one it claimed meanwhile, is the killed one
        victim = evaluating()
        if victim is None:
            return finished_without_a_kill()
        procs[victim].send_signal(signal.SIGSTOP)
        time.sleep(0.1)
        # a statement the victim sent before it stopped (a finishing commit) may still be running
        # on the server: wait until it is done, so the look below sees the final state
        _wait(lambda: _busy_sessions(url, victim) == 0, 30, f"{victim}'s last statements to finish")
        still = next((
            t for t in _trials(url, stage)
            if t.state == TrialState.RUNNING and t.user_attrs.get("worker") == victim and t.params
            and "interrupted" not in t.user_attrs
        ), None)
        if still is None:
            procs[victim].send_signal(signal.SIGCONT)
            return None
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        return victim, still

    return _wait(frozen_while_running, 150, f"one of {sorted(candidates)} to evaluate a trial")


def _finish(procs: dict[str, subprocess.Popen], tmp_path: Path, killed: str) -> None:
    for wid, proc in procs.items():
        code = proc.wait(timeout=150)
        if wid != killed:
            assert code == 0, (tmp_path / f"{wid}.log").read_text()


def _check_ledger(url: str, stage: str, killed: FrozenTrial, budget: int = BUDGET) -> list[FrozenTrial]:
    """Budget, one retry of the killed trial, no duplicate evaluations, front; returns the counted trials."""
    trials = _trials(url, stage)
    records = read_records(_study(url, stage))  # type: ignore[arg-type]
    assert sum(r.state in ("complete", "failed") for r in records) == budget
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    counted = {r.number for r in records if r.state in ("complete", "failed")}
    finished = [t for t in trials if t.number in counted]
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    # the killed attempt: failed by a heartbeat check (not by its evaluation: no failure reason, the
    # ledger's own rule; the kill may land after its result's attributes were written, failure=None
    # among them, and before the state change), retried exactly once
    failed = next(t for t in trials if t.number == killed.number)
    assert failed.state == TrialState.FAIL and failed.user_attrs.get("failure") is None and failed.number in retried
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    completed_retries = [t for t in retries if t.state == TrialState.COMPLETE]
    assert len(completed_retries) == 1, [(t.number, t.state) for t in retries]
    assert completed_retries[0].params == killed.params
    # no candidate evaluated twice
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    genomes = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(genomes)) == len(genomes)
    # the study's values are the recorded objectives (or, for a scalarized optimizer such as
    # nevergrad's, their loss: minus the mean of the two maximized exact matches)
    values = np.array([[t.user_attrs["objectives"][n] for n in ("rev", "sort")] for t in complete])
    study = optuna.load_study(study_name=stage, storage=_storages[url])
    if len(study.directions) == 1:
        losses = -values.mean(axis=1)
        assert np.allclose(losses, [t.values[0] for t in complete])
        assert np.isclose(study.best_value, losses.min())
        directions = ["maximize", "maximize"]
    else:
        assert np.allclose(values, [t.values for t in complete])
        directions = ["maximize" if d == optuna.study.StudyDirection.MAXIMIZE else "minimize" for d in study.directions]
    # the ledger's front is the Pareto front of the recorded objectives
    archive = ParetoArchive(directions)
    for t, v in zip(complete, values):
        archive.add(t.number, list(v))
    expected = {t.number for t, keep in zip(complete, pareto_mask(values, directions)) if keep}
    assert {p.number for p in archive.front} == expected
    if len(study.directions) > 1:  # and optuna's front is the ledger's front
        best = {t.number for t in study.best_trials}
        assert expected <= best and {tuple(t.values) for t in complete if t.number in best} == {tuple(values[[c.number for c in complete].index(n)]) for n in expected}
    return finished


def test_optuna_sampler_across_four_workers_survives_a_kill(postgres_url: str, tiny_zoo: Path, tmp_path: Path) -> None:
    stage = f"tpe-{uuid.uuid4().hex[:8]}"
    spec = _spec(tmp_path, tiny_zoo, stage, {"library": "optuna", "name": "tpe"})
    procs = _start_workers(spec, postgres_url, tmp_path)
    try:
        victim, killed = _kill_while_running(postgres_url, stage, procs)
        _finish(procs, tmp_path, victim)
    finally:
        for proc in procs.values():
            proc.kill()
    counted = _check_ledger(postgres_url, stage, killed)
    # the killed trial's retry ran on a surviving worker; every counted trial names its worker
    survivors = set(procs) - {victim}
    retry = next(t for t in counted if t.system_attrs.get("failed_trial") == killed.number)
    assert retry.user_attrs["worker"] in survivors
    assert {t.user_attrs["worker"] for t in counted} <= set(procs)
    # a claim given back (the budget's second look lost a race) was re-queued, and no queued
    # trial is left RUNNING
    trials = _trials(postgres_url, stage)
    given_back = {t.number for t in trials if t.user_attrs.get("interrupted")}
    assert given_back <= {t.user_attrs.get("requeued_from") for t in trials}


def _lease_owner(url: str, stage: str) -> str | None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text(f"SELECT owner FROM {LEASE_TABLE} WHERE study_name = :s"), {"s": stage}).first()
    except sa.exc.ProgrammingError:
        return None  # table not created yet
    finally:
        engine.dispose()
    return row[0] if row and row[0] else None


def test_nevergrad_coordinator_is_replaced_after_a_kill(postgres_url: str, tiny_zoo: Path, tmp_path: Path) -> None:
    stage = f"ng-{uuid.uuid4().hex[:8]}"
    spec = _spec(tmp_path, tiny_zoo, stage, {"library": "nevergrad", "name": "TwoPointsDE"}, budget=2 * BUDGET)
    procs = _start_workers(spec, postgres_url, tmp_path)
    try:
        coordinator = _wait(lambda: _lease_owner(postgres_url, stage), 150, "a coordinator")
        _wait(lambda: sum(t.state == TrialState.COMPLETE for t in _trials(postgres_url, stage)) >= 2, 150, "2 trials")
        # early enough that the queue (at most WORKERS candidates) cannot finish the budget: the
        # workers need a successor to ask the rest
        _, killed = _kill_while_running(postgres_url, stage, procs, [coordinator], before=2 * BUDGET - 2 * WORKERS)
        successor = _wait(
            lambda: (o := _lease_owner(postgres_url, stage)) not in (None, coordinator) and o, 60, "a new coordinator"
        )
        _finish(procs, tmp_path, coordinator)
    finally:
        for proc in procs.values():
            proc.kill()
    assert successor != coordinator
    counted = _check_ledger(postgres_url, stage, killed, budget=2 * BUDGET)
    complete = [int(t.user_attrs["candidate"]) for t in counted if t.state == TrialState.COMPLETE]
    assert len(complete) == len(set(complete))  # every candidate completed at most once
    # the successor told nevergrad every counted candidate (the checkpoint lives in the database)
    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        blob = conn.execute(sa.text(f"SELECT checkpoint FROM {LEASE_TABLE} WHERE study_name = :s"), {"s": stage}).scalar_one()
    engine.dispose()
    state = json.loads(bytes(blob))  # data only: the history (candidate k told = entry k >= 0)
    assert {int(t.user_attrs["candidate"]) for t in counted} <= {e for e in state["events"] if e >= 0}
