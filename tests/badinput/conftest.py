"""The world the bad-input corpus runs in: a private copy of the tiny zoo, a spec that runs, and a
finished run folder that resume/export/report cases damage in their own copies."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

EVOMERGE = str(Path(sys.executable).parent / "evomerge")


def evomerge(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI as a user runs it (no warning filters: stray library noise must not reach stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([EVOMERGE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: relative path -> content hash ("dir" for folders)."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink() or not path.is_file():
            out[rel] = "dir" if path.is_dir() else "other"
        else:
            out[rel] = hashlib.sha1(path.read_bytes()).hexdigest()
    return out


@dataclass(frozen=True)
class World:
    zoo: Path
    good_run: Path

    def spec(self) -> dict:
        """A spec that runs (2 evaluations of TIES on two tiny experts, nevergrad CMA)."""
        return {
            "name": "case",
            "models": {"base": str(self.zoo / "base"),
                       "experts": {"rev": str(self.zoo / "experts" / "rev"), "sort": str(self.zoo / "experts" / "sort")}},
            "space": {"method": "ties", "params": ["weight", "density"]},
            "objectives": [
                {"name": "rev", "metric": "answer_loss", "data": str(self.zoo / "data" / "rev" / "calib.jsonl"), "size": 4},
                {"name": "kept", "metric": "kept_fraction"},
            ],
            "scorer": {"batch_size": 8, "max_new_tokens": 4},
            "optimizer": {"library": "nevergrad", "name": "CMA"},
            "budget": {"evaluations": 2},
            "outputs": {"report": True},
        }


@pytest.fixture(scope="session")
def world(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("badinput-world")
    zoo = Path(shutil.copytree(tiny_zoo, root / "zoo"))
    w = World(zoo=zoo, good_run=root / "good" / "runs" / "case")
    (root / "good").mkdir()
    spec = root / "good" / "spec.yaml"
    spec.write_text(yaml.safe_dump(w.spec()), encoding="utf-8")
    proc = evomerge("run", str(spec), "--quiet", cwd=root / "good")
    assert proc.returncode == 0, proc.stderr
    return w
