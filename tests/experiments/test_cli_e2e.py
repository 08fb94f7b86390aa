"""The `evomerge` CLI end to end on the tiny zoo, in subprocesses, as a user drives it."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from evomerge.experiments._runlog import EventLog, read_events
from evomerge.experiments._spec_io import preset_names
from evomerge.search import storage_for

from .conftest import EVOMERGE, evomerge, front_json, rendered_sections, tiny_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(zoo_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One complete run (with the grid baseline and held-out sets): (cwd, run folder)."""
    cwd = tmp_path_factory.mktemp("run")
    objectives = [
        {"name": "rev", "metric": "answer_loss", "data": "zoo:data/rev/calib.jsonl", "size": 8,
         "holdout": "zoo:data/rev/test.jsonl"},
        {"name": "sort", "metric": "answer_loss", "data": "zoo:data/sort/calib.jsonl", "size": 8},
        {"name": "kept", "metric": "kept_fraction"},
    ]
    spec = tiny_spec(cwd, zoo_copy, baseline=True, objectives=objectives)
    proc = evomerge("run", str(spec), "--quiet", cwd=cwd)
    (cwd / "run.stdout").write_text(proc.stdout, encoding="utf-8")
    return cwd, cwd / "runs" / "tiny"


def test_run_writes_the_run_folder_and_inspection_commands_read_it(finished_run: tuple[Path, Path]) -> None:
    cwd, run = finished_run
    for name in ("spec.yaml", "state.json", "ledger.log", "comparison.json", "report.html",
                 "results/search/front.csv", "results/search/front.png", "results/search/hypervolume.png",
                 "results/grid/trials.json", "grid.optimizer.json"):
        assert (run / name).exists(), name
    assert json.loads((run / "state.json").read_text())["status"] == "done"
    status = evomerge("status", str(run), cwd=cwd).stdout
    assert "done" in status and "6 / 6 (0 failed)" in status and "ETA" not in status
    assert "stopped by" in status and "evaluations budget: 6 of 6 evaluations done" in status
    ledger = optuna.load_study(study_name="search", storage=storage_for(run / "ledger.log")[0])
    point = ", ".join(f"{n}={v:.4g}" for n, v in zip(["rev", "sort", "kept"], ledger.user_attrs["reference_point"]))
    assert f"(reference point {point})" in status  # the hypervolume says what it is measured from
    assert ledger.metric_names == ["rev", "sort", "kept"] and ledger.user_attrs["run"] == "tiny"  # optuna-dashboard's labels
    # losses are averaged with losses only: no "mean task score" of an accuracy and a negated loss
    assert "best mean task loss" in status and "mean task score" not in status
    table = evomerge("front", str(run), cwd=cwd).stdout
    assert table.splitlines()[0].split() == ["trial", "rev", "sort", "kept", "mean", "loss"]
    members = front_json(run, cwd)
    assert members and all(set(m["values"]) == {"rev", "sort", "kept"} for m in members)
    assert all(m["means"]["loss"] == pytest.approx((m["values"]["rev"] + m["values"]["sort"]) / 2) for m in members)
    comparison = json.loads((run / "comparison.json").read_text())
    assert comparison["objectives"] == ["rev"]
    assert {"base", "expert:rev", "expert:sort"} <= set(comparison["scores"])
    assert any(k.startswith("uniform grid best") for k in comparison["scores"])
    _assert_pick_rescored(run, comparison, {m["trial"] for m in members})
    html = (run / "report.html").read_text()
    assert html.startswith("<!doctype html>") and html.count("data:image/png;base64,") >= 3
    assert "<script" not in html and 'src="http' not in html
    sections = rendered_sections(run / "report.html")
    assert list(sections) == ["summary", "comparison", "references", "front", "timings", "memory", "profile", "spec"]
    assert "stopped by evaluations budget: 6 of 6" in sections["summary"]
    assert sections["comparison"].startswith("Merged vs. experts vs. uniform grid (held-out sets)")
    assert "merge" in sections["timings"] and "inference" in sections["timings"]


def test_an_overnight_log_has_a_line_and_an_event_per_trial(finished_run: tuple[Path, Path]) -> None:
    """Off a terminal (a log file), one line per finished trial and no progress bar; events.jsonl
    has the run's start, each stage's start and end, every trial and the stop with its reason."""
    cwd, run = finished_run
    lines = (cwd / "run.stdout").read_text(encoding="utf-8").splitlines()
    # the minutes before the first trial on a real checkpoint are said, in order, before the run folder
    start_up = [next(i for i, ln in enumerate(lines) if ln.startswith(prefix)) for prefix in
                ("loading the base model and ", "loaded in ", "warm-up: one-time sorts ", "run folder: ")]
    assert start_up == sorted(start_up), lines
    for stage, count in (("search", 6), ("grid", 20)):
        trials = [ln for ln in lines if ln.startswith(f"[{stage}] trial ")]
        assert len(trials) == count, lines
        assert all(" merge " in ln and " swap " in ln and " inference " in ln and " total " in ln for ln in trials)
    assert any(ln.startswith("[search] trial 5 (6/6): rev=") for ln in lines)
    assert any(ln.startswith("stage search: stopped by evaluations after 6 trials") for ln in lines)
    assert not any("\r" in ln or "it/s" in ln for ln in lines)
    events = read_events(run / "events.jsonl")
    assert [e["event"] for e in events if e["event"] != "trial"] == ["run_start", "stage_start", "stage_end", "stage_start", "stage_end", "stop"]
    start = events[0]
    assert start["spec_hash"] == hashlib.sha256((run / "spec.yaml").read_bytes()).hexdigest() and start["seed"] == 0
    trials = [e for e in events if e["event"] == "trial"]
    assert [(e["stage"], e["trial"]) for e in trials] == [("search", n) for n in range(6)] + [("grid", n) for n in range(20)]
    assert all(set(e["values"]) == {"rev", "sort", "kept"} and {"merge", "swap", "inference", "total"} <= set(e["timings"])
               and e["memory"]["rss_mib"] > 0 for e in trials)
    assert events[-1]["reason"] == "evaluations" and events[-1]["status"] == "done"
    # a crash may cut the last line: readers skip it, and the next process starts on a fresh line
    cut = cwd / "cut.jsonl"
    cut.write_text((run / "events.jsonl").read_text(encoding="utf-8")[:-20], encoding="utf-8")
    assert read_events(cut) == events[:-1]
    EventLog(cut).emit("run_start", resumed=True)
    assert read_events(cut)[-1]["event"] == "run_start" and len(read_events(cut)) == len(events)


def _assert_pick_rescored(run: Path, comparison: dict, front: set[int]) -> None:
    """The default `rescore: {top: 5}`: the front's best members scored again on every calibration
    item (16 per skill against the search's 8), the pick the best of them by that score, kept in
    comparison.json and in the study; a pick other than the search's own shows as its own row."""
    import optuna

    rescored = comparison["rescored"]
    assert rescored["items"] == 2 * 16
    trials = {int(n): v for n, v in rescored["trials"].items()}
    assert set(trials) <= front and len(trials) == min(5, len(front))
    assert rescored["pick"] == min(trials, key=lambda n: ((trials[n]["rev"] + trials[n]["sort"]) / 2, n))  # answer losses
    searched = next(int(k.split("trial ")[1].rstrip(")")) for k in comparison["scores"] if k.startswith("searched best mean"))
    assert any(k.startswith("searched pick re-scored") for k in comparison["scores"]) == (rescored["pick"] != searched)
    assert comparison["pick"] in comparison["scores"] and comparison["pick"].endswith(f"(trial {rescored['pick']})")
    storage, _ = storage_for(run / "ledger.log")
    assert optuna.load_study(study_name="search", storage=storage).user_attrs["rescored"] == rescored


def test_export_of_a_front_member_reloads_and_scores_as_recorded(finished_run: tuple[Path, Path], tmp_path: Path) -> None:
    from evomerge.merge import ExpertParams, GroupRule, MergeEngine, MergeRecipe
    from evomerge.objectives import CalibrationSet, Objective, TransformersScorer

    cwd, run = finished_run
    member = front_json(run, cwd)[0]
    out = tmp_path / "merged"
    evomerge("export", str(run), "--trial", str(member["trial"]), "--out", str(out), cwd=cwd)
    assert (out / "config.json").exists() and (out / "recipe.json").exists()

    import yaml

    spec = yaml.safe_load((run / "spec.yaml").read_text())
    # The exported folder alone, as the model: base = export, recipe = "base unchanged".
    engine = MergeEngine.load(out, {"self": out}, progress=False)
    objectives = [
        Objective(name=o["name"], metric=o["metric"], calibration=CalibrationSet.load(o["data"], name=o["name"], size=o["size"], seed=spec["seed"]))
        for o in spec["objectives"] if o.get("data")
    ]
    scorer = TransformersScorer(engine, objectives, batch_size=spec["scorer"]["batch_size"],
                                max_new_tokens=spec["scorer"]["max_new_tokens"])
    keep = MergeRecipe(rules=[GroupRule(method="task_arithmetic", experts={"self": ExpertParams(weight=0.0)})])
    evaluation = scorer.evaluate(keep)
    assert not evaluation.failed, evaluation.reason
    for o in objectives:
        assert evaluation.values[o.name] == pytest.approx(member["values"][o.name], rel=1e-4, abs=1e-5)


def test_bad_spec_exits_2_with_one_line_naming_the_field(zoo_copy: Path, tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, zoo_copy, optimizer={"library": "nevergrad", "name": "CMAA"})
    proc = evomerge("run", str(spec), cwd=tmp_path, check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"evomerge: {spec}: optimizer.name: 'CMAA' is not one of CMA, DE")
    assert not (tmp_path / "runs").exists()

    spec = tiny_spec(tmp_path, zoo_copy, name="missing")
    spec.write_text(spec.read_text().replace("zoo:data/rev/calib.jsonl", "nowhere.jsonl"))
    proc = evomerge("run", str(spec), cwd=tmp_path, check=2)
    assert proc.stderr.count("\n") == 1 and "objectives[0].data: 'nowhere.jsonl' does not exist" in proc.stderr

    spec = tiny_spec(tmp_path, zoo_copy, name="unknown", budgett={"evaluations": 2})
    proc = evomerge("run", str(spec), cwd=tmp_path, check=2)
    assert "spec: unknown key" not in proc.stderr and "budgett: unknown key; allowed: name," in proc.stderr
    assert not (tmp_path / "runs").exists()


def _finished_trials(run: Path) -> int:
    """Finished trials of every stage, read from the journal while the run appends to it."""
    if not (run / "ledger.log").exists():
        return 0
    storage, _ = storage_for(run / "ledger.log")
    return sum(
        t.state.is_finished()
        for study in storage.get_all_studies()
        for t in storage.get_all_trials(study._study_id, deepcopy=False)
    )


def test_sigterm_stops_cleanly_and_resume_finishes_the_budget(zoo_copy: Path, tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, zoo_copy, name="long", evaluations=30, fidelity={"rungs": [4, 8], "eta": 2},
                     optimizer={"library": "nevergrad", "name": "CMA", "weights": {"rev": 1.0, "sort": 1.0}})
    run = tmp_path / "runs" / "long"
    proc = subprocess.Popen([EVOMERGE, "run", str(spec), "--quiet"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while _finished_trials(run) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "evomerge resume" in err
    assert json.loads((run / "state.json").read_text())["status"] == "interrupted"
    stopped_at = _finished_trials(run)
    assert 3 <= stopped_at < 30
    status = evomerge("status", str(run), cwd=tmp_path).stdout
    assert "interrupted" in status and re.search(r"stopped by +signal SIGTERM: stopped after \d+ of 30 evaluations; `evomerge resume", status)
    assert "ETA" not in status
    assert read_events(run / "events.jsonl")[-1] | {"time": 0} == {
        "event": "stop", "time": 0, "status": "interrupted", "reason": "signal", "stage": "search", "detail": "SIGTERM"}

    evomerge("resume", str(run), "--quiet", cwd=tmp_path)
    status = evomerge("status", str(run), cwd=tmp_path).stdout
    assert "30 / 30" in status and "done" in status and "evaluations budget: 30 of 30" in status
    assert re.search(r"fidelity +30 on 4 items, \d+ on 8 items \(eta 2\); \d+ calibration items scored", status), status
    starts = [e for e in read_events(run / "events.jsonl") if e["event"] == "run_start"]
    assert [e["resumed"] for e in starts] == [False, True]
    trials = json.loads((run / "results" / "search" / "trials.json").read_text())["trials"]
    finished = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(finished) == 30
    # multi-fidelity (issue 16 item 4): the resumed run continued the rung statistics, and the
    # front holds only candidates scored on the top rung
    assert [t["fidelity"]["peers"][0] for t in finished] == list(range(1, 31))
    assert {t["fidelity"]["rung"] for t in finished} == {0, 1}
    assert all(t["fidelity"]["full"] for t in trials if t["on_front"])


def test_batch_records_a_broken_spec_skips_it_and_resumes(zoo_copy: Path, tmp_path: Path) -> None:
    # good1 stops by its wall clock; good2 searches task-arithmetic weights only, so `kept` never changes
    good1 = tiny_spec(tmp_path, zoo_copy, name="good1", budget={"evaluations": 1000, "wall_clock": 1})
    broken = tiny_spec(tmp_path, zoo_copy, name="broken", scorer={"backend": "onnx"})
    objectives = [{"name": "rev", "metric": "answer_loss", "data": "zoo:data/rev/calib.jsonl", "size": 8,
                   "holdout": "zoo:data/rev/test.jsonl"}, {"name": "kept", "metric": "kept_fraction"}]
    good2 = tiny_spec(tmp_path, zoo_copy, name="good2", evaluations=2, objectives=objectives,
                      space={"method": "task_arithmetic", "params": ["weight"], "granularity": "layer"})
    batch_dir = tmp_path / "batch"
    proc = evomerge("batch", str(good1), str(broken), str(good2), "--batch-dir", str(batch_dir), cwd=tmp_path, check=1)
    assert "batch summary:" in proc.stdout
    state = {Path(e["spec"]).stem: e for e in json.loads((batch_dir / "batch.json").read_text())["entries"]}
    assert state["good1"]["status"] == "done" and state["good2"]["status"] == "done"
    assert state["broken"]["status"] == "failed" and state["broken"]["exit_code"] == 2
    assert "scorer.backend: 'onnx' is not one of transformers, vllm" in state["broken"]["reason"]
    # the overnight log: a line per trial (no progress bar) and, at the end, what stopped the run
    log = Path(state["good1"]["log"]).read_text(encoding="utf-8")
    assert "[search] trial 0 (1/1000): rev=" in log and "\r" not in log
    assert re.search(r"stopped by +wall clock: 1s spent, after \d+ of 1000 evaluations", log)
    assert json.loads((Path(state["good1"]["run_dir"]) / "state.json").read_text())["stop"]["reason"] == "wall_clock"
    sections = rendered_sections(Path(state["good2"]["run_dir"]) / "report.html")
    assert sections["comparison"].startswith("Merged vs. experts (held-out sets)")  # no grid: none named
    assert re.fullmatch(r"Objectives that never changed kept = [\d.]+ in all 2 completed trials", sections["constant-objectives"])

    again = evomerge("batch", str(good1), str(broken), str(good2), "--batch-dir", str(batch_dir), cwd=tmp_path, check=1)
    assert again.stdout.count("earlier, skipped") == 3


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_runs_on_the_tiny_zoo(preset: str, zoo_copy: Path, tmp_path: Path) -> None:
    run = tmp_path / preset
    evomerge("run", "--preset", preset, "--run-dir", str(run), "--quiet", "--set", "models.zoo.size=tiny", "--set", f"models.zoo.path={zoo_copy}",
             "--set", "budget.evaluations=2", "--set", "budget.wall_clock=120", cwd=tmp_path)
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "done"
    assert (run / "report.html").exists()
    stage = state["stages_done"][-1]
    assert json.loads((run / "results" / stage / "front.json").read_text())["trials"]
    searched = [s for s in state["stages_done"] if s != "grid"]  # the grid baseline is no stage of the search
    if len(searched) > 1:
        _assert_next_stage_starts_at_the_best(run, *searched[:2])


def _assert_next_stage_starts_at_the_best(run: Path, first: str, second: str) -> None:
    """The second stage's first trial is the first stage's best trial (lowest scalarized loss)
    again: the same merge recipe and the same objective values (Evo-Merging's stage 2 continues
    from stage 1's best point, issue 16)."""
    import optuna

    storage, _ = storage_for(run / "ledger.log")
    done = [t for t in optuna.load_study(study_name=first, storage=storage).get_trials()
            if t.state == optuna.trial.TrialState.COMPLETE]
    best = min(done, key=lambda t: (t.values[0], t.number))
    start = optuna.load_study(study_name=second, storage=storage).get_trials()[0]
    assert json.loads(start.user_attrs["recipe"])["rules"] == json.loads(best.user_attrs["recipe"])["rules"]
    task = lambda t: {k: v for k, v in t.user_attrs["objectives"].items() if k != "l1"}  # noqa: E731
    assert task(start) == task(best)


def test_an_export_that_cannot_be_written_fails_in_one_line_and_leaves_nothing(finished_run: tuple[Path, Path], tmp_path: Path) -> None:
    """A disk that fills midway (here: a file size limit on the real process) stops the export with
    one line and status 1, and no folder or hidden leftover is left (CI once ran out of disk here)."""
    import resource

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, 16_384))

    cwd, run = finished_run
    member = front_json(run, cwd)[0]
    out = tmp_path / "merged"
    proc = subprocess.run([EVOMERGE, "export", str(run), "--trial", str(member["trial"]), "--out", str(out)],
                          cwd=cwd, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert proc.returncode == 1, proc.stderr
    # (the size limit also fails torch.compile's cache writes, which warns and falls back to eager)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"evomerge: cannot write the export {out}: "), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_with_workers_ends_like_a_single_process_run(zoo_copy: Path, tmp_path: Path) -> None:
    """`run --workers 2`: two worker processes share the budget, then the launching process ends the
    run as `run` does: the uniform grid baseline, the held-out comparison, the report, status done
    (before, it stopped at the CSV exports: no report, `status` said "unknown")."""
    objectives = [
        {"name": "rev", "metric": "answer_loss", "data": "zoo:data/rev/calib.jsonl", "size": 8,
         "holdout": "zoo:data/rev/test.jsonl"},
        {"name": "kept", "metric": "kept_fraction"},
    ]
    spec = tiny_spec(tmp_path, zoo_copy, name="crew", evaluations=4, baseline=True, objectives=objectives)
    proc = evomerge("run", str(spec), "--quiet", "--workers", "2", cwd=tmp_path)
    run = tmp_path / "runs" / "crew"
    assert "workers exited with [0, 0]" in proc.stdout
    assert json.loads((run / "state.json").read_text())["status"] == "done"
    for name in ("report.html", "comparison.json", "results/search/trials.json", "results/grid/trials.json"):
        assert (run / name).exists(), name
    comparison = json.loads((run / "comparison.json").read_text())
    assert comparison["pick"] in comparison["scores"]
    shares = [int(n) for n in re.findall(r"^worker \S+-w[01]: (\d+) trials", proc.stdout, flags=re.M)]
    assert len(shares) == 2 and sum(shares) == 4, proc.stdout  # (the first to warm up may take them all)
    status = evomerge("status", str(run), cwd=tmp_path).stdout
    assert "done" in status and "4 / 4 (0 failed)" in status


@pytest.mark.parametrize("damage", ["missing", "empty"])
def test_resuming_a_finished_run_without_its_ledger_keeps_its_results(damage: str, finished_run: tuple[Path, Path], tmp_path: Path) -> None:
    """A finished run whose ledger.log is gone was re-finished from zero trials, writing an empty
    comparison and report over its results; now one line, exit 2, nothing written."""
    _, run = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    if damage == "missing":
        (copy / "ledger.log").unlink()
    else:
        (copy / "ledger.log").write_bytes(b"")
    before = {f.name: f.read_bytes() for f in copy.iterdir() if f.is_file()}
    proc = evomerge("resume", str(copy), cwd=tmp_path, check=2)
    [line] = proc.stderr.strip().splitlines()
    assert line == (f"evomerge: {copy / 'ledger.log'}: missing or empty, but state.json records finished stages; "
                    "restore the ledger from a backup, or start the run again in a new run folder")
    assert {f.name: f.read_bytes() for f in copy.iterdir() if f.is_file()} == before


def test_a_broken_batch_state_file_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    batch = tmp_path / "batch"
    batch.mkdir()
    (batch / "batch.json").write_text("{not json", encoding="utf-8")
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\n", encoding="utf-8")
    proc = evomerge("batch", str(spec), "--batch-dir", str(batch), cwd=tmp_path, check=2)
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"evomerge: {batch / 'batch.json'}: not a batch state file (JSONDecodeError: ") and "delete it" in line
    assert sorted(p.name for p in batch.iterdir()) == ["batch.json"]


def test_a_stop_during_start_up_says_so_and_writes_nothing(zoo_copy: Path, tmp_path: Path) -> None:
    """SIGTERM while the models load: exit 143 with one line saying nothing was written (a
    scheduler's log showed a run that ended without a word)."""
    spec = tiny_spec(tmp_path, zoo_copy, name="early", evaluations=2)
    proc = subprocess.Popen([EVOMERGE, "run", str(spec)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("loading the base model"), first
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == ("stopped during start-up (exit 143), before any trial; nothing was written; "
                                            "start it again with the same command")
    assert not (tmp_path / "runs").exists()
