"""End-to-end helpers: the `evomerge` command run in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

EVOMERGE = str(Path(sys.executable).parent / "evomerge")
SKILLS = ("rev", "sort", "shift", "add")


@pytest.fixture(scope="session")
def zoo_copy(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny zoo: runs and their exports must see the same models even if
    the shared cache is rebuilt meanwhile (another test session, a new builder version)."""
    return Path(shutil.copytree(tiny_zoo, tmp_path_factory.mktemp("zoo") / "tiny"))


def evomerge(*args: str, cwd: Path, timeout: float = 240, check: int | None = 0) -> subprocess.CompletedProcess:
    """Run the CLI; ``check`` is the expected exit status (None: any)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([EVOMERGE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def tiny_spec(tmp_path: Path, zoo: Path, name: str = "tiny", evaluations: int = 6, **changes) -> Path:
    """A small multi-objective TIES search on the tiny zoo (answer loss: informative even untrained)."""
    spec = {
        "name": name,
        "models": {"zoo": {"size": "tiny", "path": str(zoo)}},
        "space": {"method": "ties", "params": ["weight", "density"], "granularity": "layer"},
        "objectives": [
            {"name": s, "metric": "answer_loss", "data": f"zoo:data/{s}/calib.jsonl", "size": 8} for s in SKILLS[:2]
        ] + [{"name": "kept", "metric": "kept_fraction"}],
        "scorer": {"batch_size": 16, "max_new_tokens": 6},
        "optimizer": {"library": "optuna", "name": "nsga2", "options": {"population_size": 4}},
        "budget": {"evaluations": evaluations},
        **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def front_json(run_dir: Path, cwd: Path) -> list[dict]:
    return json.loads(evomerge("front", str(run_dir), "--format", "json", cwd=cwd).stdout)


def rendered_sections(page: Path) -> dict[str, str]:
    """The report's sections as a browser renders them: ``section id -> its visible text``, read
    from the DOM headless Chromium builds from the file (scripts/test.sh installs Debian's
    ``chromium``)."""
    from html.parser import HTMLParser

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "no chromium on PATH: scripts/test.sh installs Debian's (apt-get install -y chromium)"
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "<body" in proc.stdout, proc.stderr[-2000:]

    class Sections(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.open: list[str] = []
            self.text: dict[str, list[str]] = {}

        def handle_starttag(self, tag: str, attrs: list) -> None:
            if tag == "section":
                self.open.append(dict(attrs).get("id", ""))
                self.text.setdefault(self.open[-1], [])

        def handle_endtag(self, tag: str) -> None:
            if tag == "section" and self.open:
                self.open.pop()

        def handle_data(self, data: str) -> None:
            if self.open:
                self.text[self.open[-1]].append(data)

    parser = Sections()
    parser.feed(proc.stdout)
    return {key: " ".join(" ".join(parts).split()) for key, parts in parser.text.items()}
