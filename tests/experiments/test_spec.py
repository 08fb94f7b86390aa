"""Spec validation: every mistake is one line naming the field, the bad value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.experiments._spec_io import SpecError, load_spec, preset_names, preset_path

GOOD = {
    "name": "t",
    "models": {"zoo": {"size": "tiny"}},
    "space": {"method": "ties", "params": ["weight", "density"], "granularity": "layer"},
    "objectives": [
        {"name": "rev", "metric": "exact_match", "data": "zoo:data/rev/calib.jsonl"},
        {"name": "sparsity", "metric": "kept_fraction"},
    ],
    "optimizer": {"library": "optuna", "name": "nsga2"},
    "budget": {"evaluations": 4},
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _error(tmp_path: Path, **changes) -> str:
    data = {**GOOD, **changes}
    with pytest.raises(SpecError) as info:
        load_spec(_write(tmp_path, data), label="spec.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("spec.yaml: ")
    return message


def test_good_spec_resolves_defaults(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, {**GOOD, "budget": {"wall_clock": "2h"}}))
    assert spec.budget.wall_clock == 7200
    assert spec.storage is None
    assert spec.run_dir(tmp_path) == tmp_path.resolve() / "runs" / "t"
    [stage] = spec.resolved_stages()
    assert stage.space == spec.space and stage.optimizer == spec.optimizer


def test_relative_paths_resolve_against_the_spec_file(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "c.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    (tmp_path / "base").mkdir()
    (tmp_path / "e1").mkdir()
    data = {
        **GOOD,
        "models": {"base": "base", "experts": {"e1": "e1"}},
        "objectives": [{"name": "c", "metric": "exact_match", "data": "data/c.jsonl"}],
        "outputs": {"run_dir": "out/run"},
    }
    spec = load_spec(_write(tmp_path, data))
    assert spec.models.base == str(tmp_path.resolve() / "base")
    assert spec.objectives[0].data == str(tmp_path.resolve() / "data" / "c.jsonl")
    assert spec.run_dir() == tmp_path.resolve() / "out" / "run"


def test_unknown_key_lists_allowed_keys(tmp_path: Path) -> None:
    message = _error(tmp_path, optimizer={"library": "optuna", "nmae": "TPE"})
    assert message.startswith("spec.yaml: optimizer.nmae: unknown key; allowed: library, name,")


def test_bad_literal_names_field_value_and_choices(tmp_path: Path) -> None:
    message = _error(tmp_path, scorer={"backend": "onnx"})
    assert message == "spec.yaml: scorer.backend: 'onnx' is not one of transformers, vllm"


def test_nested_list_location(tmp_path: Path) -> None:
    objectives = [GOOD["objectives"][0], {"name": "s", "metric": "kept_fraction", "direction": "up"}]
    message = _error(tmp_path, objectives=objectives)
    assert message == "spec.yaml: objectives[1].direction: 'up' is not one of maximize, minimize"


@pytest.mark.parametrize("name", ["..", ".", "..."])
def test_names_that_become_folders_are_not_dots_alone(tmp_path: Path, name: str) -> None:
    """`name: ..` put the run folder's files in the folder that holds `runs/`; a stage named `..`
    wrote its results into the run folder itself."""
    assert _error(tmp_path, name=name).startswith(f"spec.yaml: name: '{name}': string should match pattern")
    stages = [{"name": name}]
    assert _error(tmp_path, stages=stages).startswith(f"spec.yaml: stages[0].name: '{name}': string should match pattern")
    data = {**GOOD, "name": ".hidden-run_1.0", "stages": [{"name": "v1.2"}]}
    assert load_spec(_write(tmp_path, data), label="spec.yaml").name == ".hidden-run_1.0"


def test_a_boolean_is_no_number(tmp_path: Path) -> None:
    """`evaluations: yes` is YAML's True, which pydantic would take as 1 evaluation."""
    message = _error(tmp_path, budget={"evaluations": True})
    assert message == "spec.yaml: budget.evaluations: True is a boolean (YAML reads yes/no/on/off/true/false so); write a number"
    assert "seed: False is a boolean" in _error(tmp_path, seed=False)
    assert "scorer.timeout: True is a boolean" in _error(tmp_path, scorer={"timeout": True})
    data = {**GOOD, "baseline": True, "scorer": {"timeout": 30}}  # a boolean field and numbers stay as they were
    assert load_spec(_write(tmp_path, data), label="spec.yaml").baseline is True


def test_stage_problems_are_found_before_stage_one_runs(tmp_path: Path) -> None:
    """Two stages of one name, a stage named like the grid baseline, and inheriting across other
    layer groups failed after the first stage had run (a traceback and a half-written run folder)."""
    layer = {"method": "ties", "params": ["weight", "density"], "granularity": "layer"}
    twice = [{"name": "a", "space": layer}, {"name": "a"}]
    assert "stage names must differ: a is used twice" in _error(tmp_path, stages=twice)
    assert "stage name 'grid' is the uniform grid baseline's" in _error(tmp_path, stages=[{"name": "grid", "space": layer}])
    inherit = [{"name": "a", "space": layer}, {"name": "b", "space": {**layer, "granularity": "global"}, "inherit": ["density"]}]
    assert ("stage 'b' inherits density from 'a', so its space.granularity must be the same: 'global' vs 'layer'"
            in _error(tmp_path, stages=inherit))
    inherit[1]["space"] = {**layer, "params": ["weight"]}
    assert load_spec(_write(tmp_path, {**GOOD, "stages": inherit}), label="spec.yaml").stages[1].inherit == ["density"]


def test_specs_no_trial_can_satisfy_are_refused(tmp_path: Path) -> None:
    """Each ran to exit 0: every trial failed on the pattern, the front stayed empty, or the scalar was constant."""
    regex = [{**GOOD["objectives"][0], "extract": "regex", "pattern": "(["}, GOOD["objectives"][1]]
    assert "objective 'rev': pattern '([' is not a regular expression" in _error(tmp_path, objectives=regex)
    constraint = [{"objective": "rev", "min": 0.9, "max": 0.1}]
    assert "constraint on 'rev': min 0.9 is above max 0.1" in _error(tmp_path, constraints=constraint)
    optimizer = {"library": "nevergrad", "name": "CMA", "weights": {"rev": 0.0, "sparsity": 0}}
    assert "optimizer.weights: every weight is 0" in _error(tmp_path, optimizer=optimizer)
    optimizer["weights"] = {"rev": 1.0, "sparsity": 0}
    assert load_spec(_write(tmp_path, {**GOOD, "optimizer": optimizer}), label="spec.yaml").optimizer.weights == {"rev": 1.0, "sparsity": 0}


def test_missing_file_is_named(tmp_path: Path) -> None:
    message = _error(tmp_path, models={"base": "nowhere", "experts": {"a": "."}})
    assert "models.base: 'nowhere' does not exist" in message


def test_cross_field_checks(tmp_path: Path) -> None:
    assert "set 'evaluations' and/or 'wall_clock'" in _error(tmp_path, budget={})
    assert "constraint on unknown objective 'acc'" in _error(tmp_path, constraints=[{"objective": "acc", "min": 0.1}])
    bad_space = {"method": "ties", "params": ["weight", "density"], "bounds": {"density": [0.5, 0.2]}}
    assert "low 0.5 must be below high 0.2" in _error(tmp_path, space=bad_space)
    assert "space.method: 'tie' is not one of linear, task_arithmetic, ties" in _error(tmp_path, space={"method": "tie"})
    assert "'2 weeks' is not a duration" in _error(tmp_path, budget={"wall_clock": "2 weeks"})


def test_method_choice_spec(tmp_path: Path) -> None:
    """issue 16 item 5: ``space.methods`` validates its names; the first listed method starts."""
    spec = load_spec(_write(tmp_path, {**GOOD, "space": {"methods": ["ties", "della"]}}), label="spec.yaml")
    assert spec.space is not None and (spec.space.method, spec.space.methods) == ("ties", ["ties", "della"])
    assert "['delal'] cannot be chosen among others; choose from task_arithmetic, ties" in _error(tmp_path, space={"methods": ["ties", "delal"]})
    assert "['slerp'] cannot be chosen among others" in _error(tmp_path, space={"methods": ["ties", "slerp"]})
    assert "must list two or more distinct methods" in _error(tmp_path, space={"methods": ["ties", "ties"]})


def test_yaml_problems_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: a\nname: b\n")
    with pytest.raises(SpecError, match=r"spec.yaml:2: invalid YAML \(duplicate key 'name'\)"):
        load_spec(path, label="spec.yaml")
    path.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(path, label="spec.yaml")


def test_every_preset_validates() -> None:
    names = preset_names()
    assert {"evo-merging", "lorahub", "evolutionary-ps", "mm-mo", "pareto-layerwise"} <= set(names)
    for name in names:
        assert load_spec(preset_path(name)).name == name


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(SpecError, match="'nope' is not one of .*pareto-layerwise"):
        preset_path("nope")


def test_compile_rejects_other_values(tmp_path: Path) -> None:
    message = _error(tmp_path, models={"zoo": {"size": "tiny"}, "compile": "sometimes"})
    assert "compile" in message


def test_fidelity_spec(tmp_path: Path) -> None:
    """issue 16 item 4: off by default; rungs increase, eta >= 2, the top rung fits every subset,
    and lm-eval objectives (scored whole) are refused."""
    assert load_spec(_write(tmp_path, GOOD)).fidelity is None
    spec = load_spec(_write(tmp_path, {**GOOD, "fidelity": {"rungs": [4, 16]}}))
    assert spec.fidelity is not None and (spec.fidelity.rungs, spec.fidelity.eta) == ([4, 16], 4)
    assert "fidelity.rungs: [8, 8] must increase strictly" in _error(tmp_path, fidelity={"rungs": [8, 8]})
    assert "fidelity.rungs: [8]: list should have at least 2 items" in _error(tmp_path, fidelity={"rungs": [8]})
    assert "fidelity.eta: 1: input should be greater than or equal to 2" in _error(tmp_path, fidelity={"rungs": [2, 4], "eta": 1})
    sized = [{**GOOD["objectives"][0], "size": 8}, GOOD["objectives"][1]]
    message = _error(tmp_path, objectives=sized, fidelity={"rungs": [4, 16]})
    assert "the top rung (16) exceeds objective 'rev' size 8" in message
