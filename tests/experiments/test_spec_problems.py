"""A spec with several mistakes lists every one, one line each, in one go (no fix-rerun loop); a
problem only the files or the machine show is one line too, before the models load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.experiments._spec_io import SpecError, load_spec

from .conftest import evomerge, tiny_spec
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


def _one_line_before_load(spec: Path, tmp_path: Path) -> str:
    """The run's single stderr line: exit 2, no run folder, nothing loaded or searched."""
    proc = evomerge("run", str(spec), cwd=tmp_path, check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge: "), proc.stderr
    assert "run folder" not in proc.stdout and not (tmp_path / "runs").exists(), proc.stdout
    return lines[0]


def test_a_broken_holdout_file_is_reported_before_the_search(zoo_copy: Path, tmp_path: Path) -> None:
    bad = tmp_path / "held.jsonl"
    bad.write_text('{"prompt": "abc"}\n', encoding="utf-8")
    objectives = [{"name": "rev", "metric": "answer_loss", "data": "zoo:data/rev/calib.jsonl", "size": 4, "holdout": str(bad)}]
    line = _one_line_before_load(tiny_spec(tmp_path, zoo_copy, evaluations=2, objectives=objectives), tmp_path)
    assert line == f"evomerge: {bad}:1: generation item is missing answer"


def test_a_metric_for_another_kind_of_set_names_the_metric(zoo_copy: Path, tmp_path: Path) -> None:
    objectives = [{"name": "rev", "metric": "perplexity", "data": "zoo:data/rev/calib.jsonl", "size": 4}]
    line = _one_line_before_load(tiny_spec(tmp_path, zoo_copy, evaluations=2, objectives=objectives), tmp_path)
    assert line.startswith("evomerge: objectives[0].metric: objective 'rev': metric 'perplexity' needs a perplexity set, but ")
    assert line.endswith("is a generation set; use a metric for generation sets "
                         "(exact_match, contains, response_length, custom, answer_loss) or a perplexity file")


def test_a_device_torch_lacks_names_scorer_device(zoo_copy: Path, tmp_path: Path) -> None:
    import torch

    device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: absent with or without CUDA
    spec = tiny_spec(tmp_path, zoo_copy, evaluations=2, scorer={"batch_size": 16, "max_new_tokens": 6, "device": device})
    line = _one_line_before_load(spec, tmp_path)
    assert line.startswith(f"evomerge: scorer.device: '{device}' but torch ")
    assert "CUDA device" in line and ("use cpu" in line or "use one of those" in line)


def test_a_recipe_the_models_cannot_take_is_one_line_before_the_run_folder(zoo_copy: Path, tmp_path: Path) -> None:
    """`lora_mode: adapter` over full experts: every trial failed, and the run ended with status 0."""
    space = {"method": "ties", "params": ["weight", "density"], "lora_mode": "adapter"}
    line = _one_line_before_load(tiny_spec(tmp_path, zoo_copy, evaluations=2, space=space), tmp_path)
    assert line.startswith("evomerge: space.lora_mode: lora_mode='adapter' merges LoRA adapters only")
    assert "use lora_mode='materialized'" in line


def test_a_method_for_another_number_of_experts_names_the_field(zoo_copy: Path, tmp_path: Path) -> None:
    """nuslerp over the zoo's four experts: the space's field, not the rule number of a recipe the user never wrote."""
    space = {"method": "nuslerp", "params": ["weight"]}
    line = _one_line_before_load(tiny_spec(tmp_path, zoo_copy, evaluations=2, space=space), tmp_path)
    assert line.startswith("evomerge: space.method: method 'nuslerp' takes exactly 2 expert(s), got 4 ("), line
    stages = [{"name": "first", "space": {"method": "ties"}}, {"name": "second", "space": space}]
    line = _one_line_before_load(tiny_spec(tmp_path, zoo_copy, evaluations=2, stages=stages), tmp_path)
    assert line.startswith("evomerge: stages[1].space.method: method 'nuslerp' takes exactly 2"), line


def test_a_size_above_the_file_is_a_warning_and_the_run_scores_every_item(zoo_copy: Path, tmp_path: Path) -> None:
    items = len((zoo_copy / "data" / "rev" / "calib.jsonl").read_text(encoding="utf-8").splitlines())
    objectives = [{"name": "rev", "metric": "answer_loss", "data": "zoo:data/rev/calib.jsonl", "size": items + 100}]
    proc = evomerge("run", str(tiny_spec(tmp_path, zoo_copy, evaluations=1, objectives=objectives)), cwd=tmp_path)
    assert (f"warning: objectives[0].size: objective 'rev' asks for {items + 100} items and "
            f"{zoo_copy / 'data' / 'rev' / 'calib.jsonl'} has {items}: all {items} are scored") in proc.stderr, proc.stderr


@pytest.mark.parametrize("change, expected", [
    ({"space": {"method": "ties", "params": ["weight"], "fixed": {"L99.weight[rev]": 0.5}}},
     "evomerge: space: fixed: unknown parameter names ['L99.weight[rev]']"),
    ({"space": {"method": "ties", "params": []}}, "evomerge: space.params: the space has no parameter to search"),
    ({"scorer": {"batch_size": 16, "options": {"foo": 1}}},
     "evomerge: scorer.options: 'foo' is not an option of the transformers backend; allowed: "),
], ids=["fixed-unknown-name", "nothing-to-search", "unknown-scorer-option"])
def test_problems_the_loaded_models_show_are_one_line(change: dict, expected: str, zoo_copy: Path, tmp_path: Path) -> None:
    """Found after the models load, before the run folder exists: were tracebacks (and for an empty
    space, a run folder with the optimizer's ValueError)."""
    line = _one_line_before_load(tiny_spec(tmp_path, zoo_copy, evaluations=2, **change), tmp_path)
    assert line.startswith(expected), line
