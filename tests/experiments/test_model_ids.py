"""Models named by Hugging Face id resolve from a local HF cache, offline; a missing one is one line.

The cache is built here in the hub's own layout (``models--org--name/snapshots/<rev>/`` and
``refs/main``) from the tiny zoo, and the run reads it through huggingface_hub with
``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing at it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from evomerge.experiments._hub import ModelId, ModelIdError, parse_model_id, resolve_model_id
from evomerge.experiments._spec_io import SpecError, load_spec

from .conftest import evomerge

MAIN = "1" * 40
PINNED = "2" * 40


def _cache_model(cache: Path, repo: str, folder: Path, revision: str, *, ref: str | None = "main") -> Path:
    """Copy ``folder`` into ``cache`` as the hub lays out a downloaded snapshot."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / revision
    shutil.copytree(folder, snapshot)
    if ref is not None:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(revision, encoding="utf-8")
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_zoo: Path) -> Path:
    cache = tmp_path / "hf" / "hub"
    _cache_model(cache, "toy-org/tiny-base", tiny_zoo / "base", MAIN)
    _cache_model(cache, "toy-org/tiny-rev", tiny_zoo / "experts" / "rev", MAIN)
    _cache_model(cache, "toy-org/tiny-sort", tiny_zoo / "experts" / "sort", PINNED, ref=None)
    return cache


def test_ids_parse_and_paths_do_not() -> None:
    assert parse_model_id("Qwen/Qwen2.5-7B") == ModelId("Qwen/Qwen2.5-7B")
    assert parse_model_id("meta-llama/Llama-3.2-1B@v1.0") == ModelId("meta-llama/Llama-3.2-1B", "v1.0")
    for path in ("./models/base", "/abs/base", "~/m/base", "base", "a/b/c"):
        assert parse_model_id(path) is None, path


def test_resolves_main_and_a_pinned_commit_offline(hub_cache: Path) -> None:
    main = resolve_model_id(ModelId("toy-org/tiny-base"), cache_dir=hub_cache, offline=True)
    assert main == hub_cache / "models--toy-org--tiny-base" / "snapshots" / MAIN
    pinned = resolve_model_id(ModelId("toy-org/tiny-sort", PINNED), cache_dir=hub_cache, offline=True)
    assert pinned.name == PINNED and (pinned / "config.json").is_file()


def test_missing_id_offline_names_the_id_and_the_fix(hub_cache: Path) -> None:
    with pytest.raises(ModelIdError) as info:
        resolve_model_id(ModelId("toy-org/absent", "v2"), cache_dir=hub_cache, offline=True)
    message = str(info.value)
    assert "\n" not in message and "'toy-org/absent@v2'" in message
    assert "hf download toy-org/absent --revision v2" in message and "HF_HUB_OFFLINE" in message
    # A commit the cache lacks is missing too, even when the repo is there.
    with pytest.raises(ModelIdError):
        resolve_model_id(ModelId("toy-org/tiny-sort"), cache_dir=hub_cache, offline=True)  # no refs/main


def _spec(tmp_path: Path, models: dict, name: str = "ids") -> Path:
    spec = {
        "name": name,
        "models": models,
        "space": {"method": "task_arithmetic"},
        "objectives": [{"name": "rev", "metric": "answer_loss", "data": "rev.jsonl", "size": 4}],
        "scorer": {"batch_size": 8, "max_new_tokens": 4},
        "optimizer": {"library": "baseline", "name": "random"},
        "budget": {"evaluations": 2},
        "outputs": {"report": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def test_spec_keeps_ids_and_a_local_path_still_wins(tmp_path: Path, tiny_zoo: Path) -> None:
    shutil.copy(tiny_zoo / "data" / "rev" / "calib.jsonl", tmp_path / "rev.jsonl")
    (tmp_path / "toy-org" / "local").mkdir(parents=True)
    spec = load_spec(_spec(tmp_path, {"base": "toy-org/tiny-base@main", "experts": {"rev": "toy-org/local"}}))
    assert spec.models.base == "toy-org/tiny-base@main"
    assert spec.models.experts["rev"] == str((tmp_path / "toy-org" / "local").resolve())
    with pytest.raises(SpecError, match=r"models\.base: '\./nowhere' does not exist .*not a Hugging Face id"):
        load_spec(_spec(tmp_path, {"base": "./nowhere", "experts": {"rev": "toy-org/local"}}))


def test_run_by_id_from_the_cache_offline(tmp_path: Path, tiny_zoo: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`evomerge run` on a spec naming base and experts by id (one pinned), network off."""
    shutil.copy(tiny_zoo / "data" / "rev" / "calib.jsonl", tmp_path / "rev.jsonl")
    models = {"base": "toy-org/tiny-base", "experts": {"rev": "toy-org/tiny-rev", "sort": f"toy-org/tiny-sort@{PINNED}"}}
    spec = _spec(tmp_path, models)
    for key, value in {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(key, value)  # the CLI subprocess reads them
    evomerge("run", str(spec), "--quiet", cwd=tmp_path)
    resolved = yaml.safe_load((tmp_path / "runs" / "ids" / "spec.yaml").read_text())
    assert resolved["models"]["base"] == str(hub_cache / "models--toy-org--tiny-base" / "snapshots" / MAIN)
    assert resolved["models"]["experts"]["sort"].endswith(f"models--toy-org--tiny-sort/snapshots/{PINNED}")
    trials = json.loads((tmp_path / "runs" / "ids" / "results" / "search" / "trials.json").read_text())
    assert len(trials["trials"]) == 2
    bad = _spec(tmp_path, {**models, "base": "toy-org/not-cached"}, name="bad")
    proc = evomerge("run", str(bad), "--quiet", cwd=tmp_path, check=2)
    [line] = proc.stderr.strip().splitlines()
    assert "models.base: 'toy-org/not-cached' is neither a local folder nor in the Hugging Face cache" in line
    assert "hf download toy-org/not-cached" in line
    assert not (tmp_path / "runs" / "bad").exists()
