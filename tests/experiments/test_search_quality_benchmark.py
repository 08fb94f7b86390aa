"""The search-quality benchmark's quick form runs and prints sane tables (figures: docs/search.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from evomerge.experiments.benchmarks import search_quality

pytestmark = pytest.mark.slow

_NUMBER = r"-?\d+\.\d+"


def _row(out: str, name: str) -> list[str]:
    lines = [line for line in out.splitlines() if line.startswith(name)]
    assert lines, f"no row {name!r} in:\n{out}"
    return re.split(r"\s{2,}", lines[0].strip())


def _mean(cell: str) -> float:
    return float(re.match(_NUMBER, cell).group())  # type: ignore[union-attr]


def test_quick_form_prints_both_tables_with_sane_figures(tiny_zoo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    search_quality.main(["--quick", "--zoo", str(tiny_zoo), "--optimizers", "random", "--sh-optimizers", "random"])
    out = capsys.readouterr().out
    for name, evals in (("random x6", 6), ("random x18", 18)):
        cells = _row(out, name)
        assert int(cells[1]) == evals and int(cells[2]) == 2  # evaluations, seeds
        assert int(cells[3]) > evals * 4 * 4  # items scored: evaluations x 4 skills x 4 items, plus the re-scoring
        hv, pick, rescored = (_mean(c) for c in cells[4:7])
        assert 0.0 <= hv <= 1.0 and 0.0 <= pick <= 1.0 and 0.0 <= rescored <= 1.0
        assert re.fullmatch(rf"{_NUMBER} \[{_NUMBER}, {_NUMBER}\]", cells[5])  # mean [95% interval]
    plain, graded = _row(out, "random x6"), _row(out, "random +SH x6")
    # equal total scoring cost: successive halving stops once the items of 6 plain evaluations are
    # spent, overshooting by at most one candidate on the top rung (8 items x 4 skills)
    assert int(plain[3]) <= int(graded[3]) <= int(plain[3]) + 8 * 4
    assert 0.0 <= _mean(graded[5]) <= 1.0 and "random +SH x6" in out.split("held-out difference to random")[1]
    for name in ("uniform grid", "best single expert"):
        assert 0.0 <= _mean(_row(out, name)[5]) <= 1.0  # held-out of its pick (no hypervolume: one recipe)
    assert 0.0 <= _mean(_row(out, "uniform average of the pool")[4]) <= 1.0
    for name in ("full two-stage", "stage 2 only"):
        cells = _row(out, name)
        assert int(cells[2]) == 2
        pick, noise, clean = (_mean(c) for c in cells[4:7])
        assert 0.0 <= pick <= 1.0 and 0.0 <= noise <= 1.5 and 0.0 <= clean <= 1.5
