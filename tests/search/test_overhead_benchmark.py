"""The overhead benchmark script runs and reports its ratios (numbers themselves: see docs/search.md)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from evomerge.experiments.benchmarks import search_overhead


def test_search_overhead_script_prints_a_ratio_per_optimizer(tiny_zoo: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["search_overhead", "--size", "tiny", "--trials", "3", "--calib-size", "4",
                                      "--eval-seconds", "0.3", "--optimizers", "random", "optuna:tpe"])
    search_overhead.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("random", "optuna"))]
    assert len(rows) == 2
    for row in rows:
        eval_s, mean_ms, steady_ms, max_ms, cpu_ms, ratio = (float(v) for v in re.findall(r"([\d.]+)%?", row.split(maxsplit=1)[1]))
        assert eval_s >= 0.3 and 0 < mean_ms <= max_ms and 0 < steady_ms <= max_ms
        assert 0 < cpu_ms and ratio == pytest.approx(100 * cpu_ms / 1000 / 0.3, rel=0.1, abs=0.02)
