"""Resume after SIGKILL: a real tiny-zoo search killed at seeded random moments and restarted.

The driver (`_resume_driver.py`) runs in a subprocess; the test kills it with SIGKILL at random
times after it reports ``ready`` (the kill lands in bind/reconcile, ask, evaluation, the ledger
write, tell or the checkpoint write), restarts it, and finally lets it finish.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.search import pareto_mask, read_records, storage_for

from ._resume_driver import drive

DRIVER = Path(__file__).with_name("_resume_driver.py")
pytestmark = pytest.mark.slow


def _start(run_dir: Path, zoo: Path, optimizer: str, budget: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, str(DRIVER), str(run_dir), str(zoo), "--optimizer", optimizer, "--budget", str(budget)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )


def _wait_ready(proc: subprocess.Popen) -> bool:
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("ready"):
            return True
    return False


def _trials(run_dir: Path) -> list[optuna.trial.FrozenTrial]:
    storage, _ = storage_for(run_dir)
    return optuna.load_study(study_name="evomerge", storage=storage).get_trials(deepcopy=False)


def _finished(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials that count (`Ledger.finished`'s rule: not cut off by a kill and re-run)."""
    rerun = {t.user_attrs["requeued_from"] for t in trials if "requeued_from" in t.user_attrs}
    return [t for t in trials if t.state.is_finished() and t.number not in rerun]


def _run_with_kills(run_dir: Path, zoo: Path, optimizer: str, budget: int, kills: int, seed: int) -> tuple[int, list]:
    """Kill ``kills`` times at random moments, then finish; returns the kills done and the
    finished trials seen after each kill."""
    rng = random.Random(seed)
    snapshots = []
    done = 0
    while done < kills:
        proc = _start(run_dir, zoo, optimizer, budget)
        assert _wait_ready(proc), "driver died before it was ready"
        time.sleep(rng.uniform(0.0, 0.8))
        if proc.poll() is not None:
            break  # finished the budget before the kill
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done += 1
        snapshots.append(_finished(_trials(run_dir)))
    proc = _start(run_dir, zoo, optimizer, budget)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and f"done {budget}" in out, out
    return done, snapshots


def test_sigkill_resume_keeps_trials_and_repeats_the_uninterrupted_run(tiny_zoo: Path, tmp_path: Path) -> None:
    budget = 60
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    drive(reference_dir, tiny_zoo, "nevergrad:CMA", budget)  # in-process: same code, one start saved
    kills, snapshots = _run_with_kills(killed_dir, tiny_zoo, "nevergrad:CMA", budget, kills=10, seed=7)
    assert kills == 10, "the run finished before 10 kills; raise the budget"

    final = _finished(_trials(killed_dir))
    reference = _finished(_trials(reference_dir))
    by_candidate = {t.user_attrs["candidate"]: t for t in final}
    # no candidate evaluated to completion twice, none lost
    assert sorted(t.user_attrs["candidate"] for t in final) == list(range(budget))
    assert all(t.state == TrialState.COMPLETE for t in final)
    # every trial completed before a kill is still there, unchanged
    for snapshot in snapshots:
        for t in snapshot:
            kept = by_candidate[t.user_attrs["candidate"]]
            assert kept.params == t.params and kept.values == t.values
    # a deterministic optimizer: the same trial sequence, hence the same front
    for ref in reference:
        got = by_candidate[ref.user_attrs["candidate"]]
        assert got.params == ref.params
        assert got.user_attrs["objectives"] == ref.user_attrs["objectives"]
    assert _front(final) == _front(reference)


def _front(trials: list) -> list[tuple[int, tuple[float, ...]]]:
    """(candidate, values) of the non-dominated trials (both objectives minimized)."""
    mask = pareto_mask([t.values for t in trials], ["minimize", "minimize"])
    return sorted((t.user_attrs["candidate"], tuple(t.values)) for t, keep in zip(trials, mask) if keep)


def test_sigkill_resume_of_an_optuna_sampler_requeues_running_trials(tiny_zoo: Path, tmp_path: Path) -> None:
    budget = 20
    kills, snapshots = _run_with_kills(tmp_path / "run", tiny_zoo, "optuna:tpe", budget, kills=2, seed=3)
    assert kills == 2
    trials = _trials(tmp_path / "run")
    finished = _finished(trials)
    assert len(finished) == budget
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    study = optuna.load_study(study_name="evomerge", storage=storage_for(tmp_path / "run")[0])
    interrupted = [r for r in read_records(study) if r.state == "interrupted"]
    # every interrupted trial was re-queued once; a copy killed in turn was re-queued again (a chain)
    requeued = [t for t in trials if "requeued_from" in t.user_attrs]
    assert sorted(t.user_attrs["requeued_from"] for t in requeued) == sorted(t.number for t in interrupted)
    for t in requeued:  # the re-queued trial ran the interrupted one's params (those it had), once
        assert trials[t.user_attrs["requeued_from"]].params.items() <= t.params.items()
    copy_of = {t.user_attrs["requeued_from"]: t.number for t in requeued}
    finished_numbers = {t.number for t in finished}
    for r in interrupted:  # the end of each chain finished
        end = r.number
        while end in copy_of:
            end = copy_of[end]
        assert end in finished_numbers
    numbers = {t.number for t in finished}
    for snapshot in snapshots:
        assert {t.number for t in snapshot} <= numbers
