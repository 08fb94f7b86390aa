"""The overhead benchmark script runs and reports its ratios (numbers themselves: see docs/search.md)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from evomerge.experiments.benchmarks import search_overhead


def test_search_overhead_script_prints_a_ratio_per_optimizer(tiny_zoo: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["search_overhead", "--size", "tiny", "--trials", "4", "--calib-size", "4",
                                      "--optimizers", "random", "nevergrad:OnePlusOne"])
    search_overhead.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("random", "nevergrad"))]
    assert len(rows) == 2
    for row in rows:
        total, recorded = (float(v) for v in re.findall(r"([\d.]+)%", row))
        assert 0 < recorded <= total
