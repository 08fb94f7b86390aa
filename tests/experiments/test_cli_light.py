"""A command that fails on bad input answers before torch, transformers or optuna's samplers are
imported: the bad-input corpus and a user's typo both cost a fraction of a second, not 5 s of CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROBE = textwrap.dedent(
    """
    import sys
    from evomerge.experiments.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
    heavy = sorted(m for m in ("torch", "transformers", "nevergrad", "matplotlib") if m in sys.modules)
    print(code, ",".join(heavy) or "-")
    """
)


@pytest.mark.parametrize("args", [
    ["--help"],
    ["status", "no-such-run"],
    ["report", "no-such-run"],
    ["run", "no-such-spec.yaml"],
    ["run", "bad.yaml"],
    ["zoo", "build", "--size", "nope"],
], ids=lambda a: " ".join(a))
def test_a_failing_command_imports_nothing_heavy(args: list[str], tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "name: x\nmodels: {base: /nope}\nspace: {method: ties}\n"
        "objectives: [{name: a, metric: kept_fraction}]\nbudget: {evaluations: -1}\n"
    )
    out = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    code, heavy = out.stdout.split()[-2:]
    assert code == ("0" if args == ["--help"] else "2"), out.stderr
    assert heavy == "-", f"{' '.join(args)} imported {heavy}"
