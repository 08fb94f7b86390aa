"""`evomerge run` on the hand-written spec qwen2.5-search.yaml, on the Qwen2.5-shaped fixture.

The spec is the file shown in docs/experiments.md, used unchanged: it is copied next to the
fixture (linked as ``qwen2.5/``, the relative path the spec names) and run as a user runs it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.experiments.zoo import build_real_shape

pytestmark = pytest.mark.slow
SPEC = Path(__file__).with_name("qwen2.5-search.yaml")
EVOMERGE = str(Path(sys.executable).parent / "evomerge")


def _evomerge(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([EVOMERGE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def test_cli_search_on_the_qwen25_shaped_fixture(tmp_path: Path) -> None:
    (tmp_path / "qwen2.5").symlink_to(build_real_shape("qwen2.5"), target_is_directory=True)
    spec = Path(shutil.copy(SPEC, tmp_path / SPEC.name))
    _evomerge("run", str(spec), "--quiet", cwd=tmp_path, timeout=900)
    run = tmp_path / "runs" / "qwen2.5-shaped"
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "done"
    trials = json.loads((run / "results" / "search" / "trials.json").read_text())["trials"]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(done) >= 5, trials
    losses = {round(t["objectives"]["rev"], 6) for t in done}
    assert len(losses) > 1  # different recipes, different merged models
    status = _evomerge("status", str(run), cwd=tmp_path, timeout=120).stdout
    assert "6 / 6 (0 failed)" in status
    member = _evomerge("front", str(run), "--format", "json", cwd=tmp_path, timeout=120).stdout
    best = json.loads(member)[0]["trial"]
    out = tmp_path / "merged"
    _evomerge("export", str(run), "--trial", str(best), "--out", str(out), cwd=tmp_path, timeout=300)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
