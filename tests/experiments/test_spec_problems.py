"""A spec with several mistakes lists every one, one line each, in one go (no fix-rerun loop)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.experiments._spec_io import SpecError, load_spec

from .conftest import evomerge
from .test_spec import GOOD


def _bad(tmp_path: Path) -> Path:
    data = {
        **GOOD,
        "seed": "zero",
        "space": {**GOOD["space"], "granularity": "every"},
        "optimizer": {"library": "optuna", "name": "nsga9"},
        "budget": {"evaluations": 0, "wallclock": "1h"},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


EXPECTED = [
    "spec.yaml: seed: 'zero': input should be a valid integer, unable to parse string as an integer",
    "spec.yaml: space.granularity: 'every' is not one of global, layer or a valid integer, unable to parse string as an integer",
    "spec.yaml: optimizer.name: 'nsga9' is not one of",
    "spec.yaml: budget.evaluations: 0: input should be greater than or equal to 1",
    "spec.yaml: budget.wallclock: unknown key; allowed: evaluations, wall_clock",
]


def test_every_problem_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(_bad(tmp_path), label="spec.yaml")
    lines = str(info.value).splitlines()
    assert len(lines) == len(EXPECTED), lines
    for line, want in zip(lines, EXPECTED):
        assert line.startswith(want), (line, want)


def test_the_cli_prints_them_all_and_exits_2(tmp_path: Path) -> None:
    proc = evomerge("run", str(_bad(tmp_path)), cwd=tmp_path, check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == len(EXPECTED) and all(line.startswith("evomerge: ") for line in lines), proc.stderr
    assert "budget.wallclock: unknown key" in lines[-1]
    assert not (tmp_path / "runs").exists()
