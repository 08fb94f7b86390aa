"""A run folder from elsewhere is safe to resume: a pickle payload planted where the optimizer state
lived (and where it lives now) is neither run nor needed; the search finishes its budget."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml

from evomerge.search import storage_for

from .conftest import EVOMERGE, World, evomerge

pytestmark = pytest.mark.slow


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _a_trial_finished(run: Path) -> bool:
    """state.json records the stage's elapsed time after every finished trial."""
    try:
        return json.loads((run / "state.json").read_text()).get("elapsed", {}).get("search") is not None
    except (OSError, ValueError):
        return False


def test_resume_with_planted_payloads_runs_nothing_and_finishes(world: World, tmp_path: Path) -> None:
    spec = world.spec()
    spec["budget"]["evaluations"] = 6
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    run = tmp_path / "runs" / "case"
    proc = subprocess.Popen([EVOMERGE, "run", "spec.yaml", "--quiet"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not _a_trial_finished(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    marker = tmp_path / "payload-ran"
    for name in ("search.optimizer.pkl", "search.optimizer.json", "grid.optimizer.pkl"):
        (run / name).write_bytes(pickle.dumps(_Payload(marker)))
    done = evomerge("resume", str(run), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    storage, _ = storage_for(run / "ledger.log")
    all_trials = optuna.load_study(study_name="search", storage=storage).get_trials()
    rerun = {t.user_attrs["requeued_from"] for t in all_trials if "requeued_from" in t.user_attrs}
    trials = [t for t in all_trials if t.state.is_finished() and t.number not in rerun]  # the ledger's rule
    assert sorted(t.user_attrs["candidate"] for t in trials) == list(range(6))
    assert json.loads((run / "state.json").read_text())["status"] == "done" and (run / "report.html").is_file()
    assert json.loads((run / "search.optimizer.json").read_bytes())["format"].startswith("evomerge.coordinator-history/")
