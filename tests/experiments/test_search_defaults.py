"""Issue 16's defaults: the data seed apart from the run seed, and the default scalarization (the
mean of the task objectives; costs only when weighted), with the line the CLI prints for it."""

from __future__ import annotations

from pathlib import Path

import yaml

from evomerge.experiments._build import build_objectives
from evomerge.experiments._fitness import describe_scalar, ledger_objectives, scalarization
from evomerge.experiments._rundir import RunDir
from evomerge.experiments._spec import OptimizerSpec
from evomerge.experiments._spec_io import dump_spec, validate_spec


def _spec(zoo: Path, tmp_path: Path, **changes):
    data = {
        "name": "t",
        "models": {"base": str(zoo / "base"), "experts": {s: str(zoo / "experts" / s) for s in ("rev", "sort")}},
        "space": {"method": "ties"},
        "objectives": [
            {"name": "rev", "metric": "exact_match", "data": str(zoo / "data" / "rev" / "calib.jsonl"), "size": 8},
            {"name": "sort", "metric": "exact_match", "data": str(zoo / "data" / "sort" / "calib.jsonl"), "size": 8},
            {"name": "kept", "metric": "kept_fraction"},
        ],
        "optimizer": {"library": "nevergrad", "name": "CMA"},
        "budget": {"evaluations": 4},
        **changes,
    }
    return validate_spec(data, root=tmp_path, label="spec.yaml")


def _items(spec) -> list[list[str]]:
    return [[item.prompt for item in o.calibration.items] for o in build_objectives(spec) if o.calibration is not None]


def test_the_run_seed_leaves_the_calibration_items_alone(tiny_zoo: Path, tmp_path: Path) -> None:
    base = _items(_spec(tiny_zoo, tmp_path))
    assert all(len(items) == 8 for items in base)
    assert _items(_spec(tiny_zoo, tmp_path, seed=7)) == base  # another seed: another optimizer, same data
    assert _items(_spec(tiny_zoo, tmp_path, seed=7, data_seed=3)) != base  # the data seed redraws


def test_a_run_folder_keeps_its_data_seed_and_an_older_one_its_run_seed(tiny_zoo: Path, tmp_path: Path) -> None:
    new = RunDir(tmp_path / "new")
    new.path.mkdir()
    dump_spec(_spec(tiny_zoo, tmp_path, seed=7, data_seed=3), new.spec_file)
    assert new.load_spec().data_seed == 3
    old = RunDir(tmp_path / "old")  # written before data_seed existed: its subsets came from `seed`
    old.path.mkdir()
    data = yaml.safe_load(new.spec_file.read_text())
    del data["data_seed"]
    old.spec_file.write_text(yaml.safe_dump(data))
    assert old.load_spec().data_seed == 7


def test_default_scalar_is_the_mean_of_the_task_objectives(tiny_zoo: Path, tmp_path: Path) -> None:
    spec = _spec(tiny_zoo, tmp_path)
    objectives = ledger_objectives(spec, spec.optimizer)
    assert scalarization(objectives, spec.optimizer).weights == (0.5, 0.5, 0.0)
    assert describe_scalar(objectives, spec.optimizer) == "optimizing: mean(rev, sort) (maximize); costs not weighted: kept"
    weighted = OptimizerSpec(library="nevergrad", name="CMA", weights={"rev": 1.0, "kept": 0.2}, l1_penalty=0.05)
    objectives = ledger_objectives(spec, weighted)
    assert scalarization(objectives, weighted).weights == (1.0, 0.0, 0.2, 0.05)
    assert describe_scalar(objectives, weighted) == "optimizing: 1*-rev + 0.2*kept + 0.05*l1 (minimize); not weighted: sort"
    assert describe_scalar(objectives, OptimizerSpec(library="optuna", name="tpe")) is None  # sees the vector
