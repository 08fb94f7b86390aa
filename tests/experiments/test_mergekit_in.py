"""mergekit YAML as the search's first point (``init``) and as named baselines (``baselines``)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .conftest import evomerge


def _spec(tmp_path: Path, zoo: Path, **extra) -> Path:
    spec = {
        "name": "mk",
        "models": {"base": str(zoo / "base"), "experts": {"rev": str(zoo / "experts" / "rev"), "sort": str(zoo / "experts" / "sort")}},
        "space": {"method": "ties", "granularity": "layer"},
        "objectives": [
            {"name": "rev", "metric": "answer_loss", "data": str(zoo / "data" / "rev" / "calib.jsonl"), "size": 4},
            {"name": "kept", "metric": "kept_fraction"},
        ],
        "scorer": {"batch_size": 8, "max_new_tokens": 4},
        "optimizer": {"library": "optuna", "name": "tpe"},
        "budget": {"evaluations": 2},
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _mergekit(tmp_path: Path, zoo: Path, name: str, **changes) -> Path:
    """A mergekit config as a user writes it: paths relative to the YAML, a gradient over the layers."""
    if not (tmp_path / "zoo").exists():
        (tmp_path / "zoo").symlink_to(zoo)
    config = {
        "merge_method": "ties",
        "base_model": "zoo/base",
        "models": [
            {"model": "zoo/base"},
            {"model": "zoo/experts/rev", "parameters": {"weight": [0.2, 3.0], "density": 0.6}},
            {"model": "zoo/experts/sort", "parameters": {"weight": 0.5, "density": 0.4}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
        **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_init_is_the_first_trial_and_baselines_are_scored(tmp_path: Path, zoo_copy: Path) -> None:
    layers = json.loads((zoo_copy / "base" / "config.json").read_text())["num_hidden_layers"]
    init = _mergekit(tmp_path, zoo_copy, "start")
    # the base (no base_model key: found by its path) averaged in half and half with rev
    weights = {"zoo/base": 1.0, "zoo/experts/rev": 1.0, "zoo/experts/sort": 0.0}
    _mergekit(tmp_path, zoo_copy, "avg", merge_method="linear", base_model=None,
              models=[{"model": m, "parameters": {"weight": w}} for m, w in weights.items()])
    spec = _spec(tmp_path, zoo_copy, init="start.yaml", baselines={"mine": "start.yaml", "avg": "avg.yaml"})
    proc = evomerge("run", str(spec), "--quiet", cwd=tmp_path)
    assert "warning: baseline avg: linear averaging the base model in is read as task_arithmetic" in proc.stderr, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: init")]
    assert layers == 2
    # mergekit's gradient: t = layer / (layers - 1), and t = 0 outside the layers. L0 (+ embed): 0.2;
    # L1 (attention, mlp, norm at 3.0, plus final_norm and head at t = 0) = 9.4 / 5 = 1.88 -> 1.5.
    assert any("clipped to the bounds: L1.weight[rev] = 1.88 -> 1.5" in w for w in warnings), proc.stderr
    assert not any("zoo/base" in w for w in warnings)  # the base among models is no misfit
    trials = json.loads((tmp_path / "runs" / "mk" / "results" / "search" / "trials.json").read_text())["trials"]
    first = min(trials, key=lambda t: t["number"])["genome"]
    assert abs(first["L0.weight[rev]"] - 0.2) < 1e-9 and first["L1.weight[rev]"] == 1.5, first
    for layer in range(layers):
        assert abs(first[f"L{layer}.density[sort]"] - 0.4) < 1e-9 and abs(first[f"L{layer}.weight[sort]"] - 0.5) < 1e-9
    comparison = json.loads((tmp_path / "runs" / "mk" / "comparison.json").read_text())
    assert set(comparison["references"]) >= {"base", "expert:rev", "expert:sort", "mergekit:mine", "mergekit:avg"}
    assert set(comparison["references"]["mergekit:mine"]) == {"rev", "kept"}
    assert "mergekit:mine" in (tmp_path / "runs" / "mk" / "report.html").read_text()


def test_unreadable_baseline_is_one_line_and_writes_nothing(tmp_path: Path, zoo_copy: Path) -> None:
    bad = _mergekit(tmp_path, zoo_copy, "bad", merge_method="sce")
    spec = _spec(tmp_path, zoo_copy, baselines={"bad": bad.name})
    proc = evomerge("run", str(spec), "--quiet", cwd=tmp_path, check=2)
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("evomerge: baselines.bad: ") and "merge_method 'sce' is not one of" in line
    assert not (tmp_path / "runs").exists()
