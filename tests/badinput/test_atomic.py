"""Atomic outputs: a killed export, report or CSV/JSON export never leaves something that looks
complete. A real process writing real exports over and over is SIGKILLed at random moments; after
each kill every output is absent, the previous complete version, or the complete new one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from evomerge.merge import atomic_dir, write_atomic

WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from evomerge.merge import MergeEngine, MergeRecipe, GroupRule, ExpertParams, write_atomic
    zoo, out = Path(sys.argv[1]), Path(sys.argv[2])
    engine = MergeEngine.load(zoo / "base", {"rev": zoo / "experts" / "rev"}, progress=False)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        recipe = MergeRecipe(rules=[GroupRule(method="task_arithmetic", experts={"rev": ExpertParams(weight=0.1 * (i % 9))})])
        engine.export(recipe, out / "model")
        write_atomic(out / "report.html", "<html>" + "x" * 200000 * (1 + i % 3) + "</html>", durable=False)
        print("cycle", flush=True)
    """
)


def _complete_model(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "recipe.json", "README.md"} <= names, names
    json.loads((folder / "config.json").read_text())
    json.loads((folder / "recipe.json").read_text())
    assert load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_during_export_and_report_leaves_old_or_complete_outputs(tiny_zoo: Path, tmp_path: Path) -> None:
    rng = random.Random(11)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    seen_model = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tiny_zoo), str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
        # time one whole export + report cycle, then kill at a random moment of a later one: the
        # kills land inside the writes whatever the machine's speed
        t0 = time.monotonic()
        assert proc.stdout.readline().startswith("cycle")
        cycle = time.monotonic() - t0
        time.sleep(rng.uniform(0.0, 1.2 * cycle))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
        assert set(visible) <= {"model", "report.html"}, visible
        if (tmp_path / "model").exists():
            _complete_model(tmp_path / "model")
            seen_model += 1
        if (tmp_path / "report.html").exists():
            text = (tmp_path / "report.html").read_text()
            assert text.startswith("<html>") and text.endswith("</html>")
    assert seen_model == 6  # every kill came after at least one complete export


def test_failed_folder_build_leaves_the_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "export"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("new, half")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no leftover of the failed build


def test_replacing_a_folder_swaps_it_whole(tmp_path: Path) -> None:
    out = tmp_path / "export"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
        (tmp / "stale.txt").write_text("only in the old export")
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"] and (out / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_failed_file_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "trials.json"
    write_atomic(path, "old")

    class Boom:
        def __str__(self) -> str:
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        from evomerge.merge import atomic_file

        with atomic_file(path) as f:
            f.write("new, half")
            f.write(str(Boom()))
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["trials.json"]


def test_export_refuses_a_folder_of_other_files_and_replaces_an_earlier_export(tiny_zoo: Path, tmp_path: Path) -> None:
    from evomerge.merge import ExpertParams, GroupRule, MergeEngine, MergeError, MergeRecipe

    engine = MergeEngine.load(tiny_zoo / "base", {"rev": tiny_zoo / "experts" / "rev"}, progress=False)
    recipe = MergeRecipe(rules=[GroupRule(method="task_arithmetic", experts={"rev": ExpertParams(weight=0.5)})])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("important")
    with pytest.raises(MergeError, match="other files"):
        engine.export(recipe, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing written beside it either
    out = tmp_path / "export"
    engine.export(recipe, out)
    engine.export(recipe, out)  # an earlier export (its recipe.json) is replaced
    _complete_model(out)


def test_outputs_get_the_umasks_permissions_not_the_temporary_files(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "report.html", "<html></html>")
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
