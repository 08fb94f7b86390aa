"""``evomerge import mergekit-evolve``: a real mergekit-evolve config becomes a spec that runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .conftest import evomerge
from .test_lm_eval_spec import TASK


def _evolve_config(tmp_path: Path, zoo: Path, **genome) -> Path:
    """A mergekit-evolve config over the zoo (checked against mergekit's own EvolMergeConfiguration)."""
    config = {
        "genome": {
            "models": [str(zoo / "base"), "zoo/experts/rev", "zoo/experts/sort"],
            "merge_method": "ties",
            "base_model": str(zoo / "base"),
            "layer_granularity": 1,
            "filters": ["self_attn", "mlp"],
            **genome,
        },
        "tasks": [{"name": "toy_rev_gen", "weight": 2.0, "metric": "exact_match,none"}],
        "limit": 8,
        "num_fewshot": 0,
        "apply_chat_template": False,  # the zoo's tokenizer has none (mergekit-evolve's default is true)
        "shuffle": True,
    }
    if not (tmp_path / "zoo").exists():
        (tmp_path / "zoo").symlink_to(zoo)
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _tasks(tmp_path: Path, zoo: Path) -> Path:
    rows = [json.loads(line) for line in (zoo / "data" / "rev" / "calib.jsonl").read_text().splitlines()[:8]]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "rev.jsonl").write_text("".join(json.dumps({"question": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    (tasks / "rev.yaml").write_text(TASK.format(data=tasks / "rev.jsonl"))
    return tasks


def test_import_then_run(tmp_path: Path, zoo_copy: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'evomerge[lm_eval]'")
    from mergekit.evo.config import EvolMergeConfiguration

    config = _evolve_config(tmp_path, zoo_copy)
    EvolMergeConfiguration.model_validate(yaml.safe_load(config.read_text()))  # the format mergekit-evolve reads
    tasks = _tasks(tmp_path, zoo_copy)
    proc = evomerge("import", "mergekit-evolve", str(config), "--out", "spec.yaml", "--max-fevals", "3",
                    "--task-search-path", str(tasks), cwd=tmp_path)
    assert "note: shuffle: not carried over" in proc.stderr
    text = (tmp_path / "spec.yaml").read_text()
    assert text.startswith("# evomerge spec imported from") and "# note: shuffle: not carried over" in text
    spec = yaml.safe_load(text)
    assert spec["models"]["base"] == str(zoo_copy / "base")
    assert spec["models"]["experts"] == {"rev": str(zoo_copy / "experts" / "rev"), "sort": str(zoo_copy / "experts" / "sort")}
    assert spec["space"] == {"method": "ties", "granularity": "layer", "modules": [["attention"], ["mlp"], ["norm", "embedding", "head", "other"]],
                             "normalize": True, "bounds": {"weight": [0.0, 1.5]}, "init": {"weight": pytest.approx(1 / 3), "density": 1.0}}
    assert spec["objectives"] == [{"name": "toy_rev_gen", "lm_eval": {"task": "toy_rev_gen", "metric": "exact_match", "filter": "none",
                                                                      "num_fewshot": 0, "limit": 8, "include_path": str(tasks),
                                                                      "apply_chat_template": False, "fewshot_as_multiturn": True}}]
    assert spec["optimizer"] == {"library": "nevergrad", "name": "CMA", "weights": {"toy_rev_gen": 2.0}}
    assert spec["budget"] == {"evaluations": 3}
    evomerge("run", "spec.yaml", "--quiet", "--set", "budget.evaluations=2", cwd=tmp_path, timeout=600)
    trials = json.loads((tmp_path / "runs" / "evolve" / "results" / "search" / "trials.json").read_text())["trials"]
    assert len(trials) == 2 and all(t["state"] == "COMPLETE" for t in trials)


def test_configs_evomerge_cannot_take_are_one_line(tmp_path: Path, zoo_copy: Path) -> None:
    config = _evolve_config(tmp_path, zoo_copy, base_model=None)
    proc = evomerge("import", "mergekit-evolve", str(config), "--out", "spec.yaml", cwd=tmp_path, check=2)
    [line] = proc.stderr.strip().splitlines()
    assert "genome.base_model: evomerge merges task vectors against a base" in line
    assert not (tmp_path / "spec.yaml").exists()
