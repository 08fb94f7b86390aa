"""lm-eval tasks in a spec: a run scores them per trial; without the extra the spec is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import evomerge

TASK = """\
task: toy_rev_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""


def _spec(tmp_path: Path, zoo: Path) -> Path:
    rows = [json.loads(line) for line in (zoo / "data" / "rev" / "calib.jsonl").read_text().splitlines()[:8]]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "rev.jsonl").write_text("".join(json.dumps({"question": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    (tasks / "rev.yaml").write_text(TASK.format(data=tasks / "rev.jsonl"))
    spec = {
        "name": "lmeval",
        "models": {"base": str(zoo / "base"), "experts": {"rev": str(zoo / "experts" / "rev"), "sort": str(zoo / "experts" / "sort")}},
        "space": {"method": "task_arithmetic"},
        "objectives": [
            {"name": "rev_em", "lm_eval": {"task": "toy_rev_gen", "num_fewshot": 0, "limit": 8, "include_path": "tasks"}},
            {"name": "kept", "metric": "kept_fraction"},
        ],
        "scorer": {"batch_size": 8},
        "optimizer": {"library": "baseline", "name": "random"},
        "budget": {"evaluations": 2},
        "outputs": {"report": False},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_run_scores_an_lm_eval_task(tmp_path: Path, zoo_copy: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'evomerge[lm_eval]'")
    evomerge("run", str(_spec(tmp_path, zoo_copy)), "--quiet", cwd=tmp_path, timeout=600)
    resolved = yaml.safe_load((tmp_path / "runs" / "lmeval" / "spec.yaml").read_text())
    assert resolved["objectives"][0]["metric"] == "lm_eval"
    trials = json.loads((tmp_path / "runs" / "lmeval" / "results" / "search" / "trials.json").read_text())["trials"]
    assert len(trials) == 2
    for t in trials:
        assert t["state"] == "COMPLETE" and 0.0 <= t["objectives"]["rev_em"] <= 1.0, t


def test_spec_without_the_extra_is_one_line(tmp_path: Path, zoo_copy: Path) -> None:
    """A Python where lm_eval cannot be imported (sys.modules entry None: Python's documented import block)."""
    spec = _spec(tmp_path, zoo_copy)
    code = "import sys; sys.modules['lm_eval'] = None; sys.argv = ['evomerge', 'run', sys.argv[1]]; from evomerge.experiments.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, str(spec)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "objectives[0].lm_eval: lm-eval tasks need the lm-eval package; install it with: pip install 'evomerge[lm_eval]'" in line
    assert not (tmp_path / "runs").exists()
