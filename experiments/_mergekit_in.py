"""mergekit YAML files in a spec: ``init`` (the search's first point) and ``baselines`` (scored beside the experts).

Users arrive with a mergekit config they already run. As ``init`` its coefficients, fitted to the
first stage's search space (`SearchSpace.fit`: per-cell means, clipped to the bounds), become the
first candidate every optimizer evaluates; as a baseline its recipe is scored like the experts, so
the report shows whether the search beat the merge the user had.

The config's models are matched to the spec's experts by path (relative to the YAML file), by
Hugging Face id (the id's cache folder), or by name (the expert's name or folder name); models
that are neither experts nor the base are left out, with a note.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import click

from ._errors import UserError
from ._hub import parse_model_id
from ._spec import ExperimentSpec
from ._spec_io import read_yaml

if TYPE_CHECKING:
    from evomerge.merge import MergeEngine, MergeRecipe
    from evomerge.search import SearchSpace

BASELINE_PREFIX = "mergekit:"
"""Label prefix of mergekit baselines among the comparison's rows (next to ``expert:<name>``)."""


def expert_matcher(config_dir: Path, experts: Mapping[str, str]) -> Callable[[str], str | None]:
    """Map a mergekit model reference to the name of the expert it denotes (None: no expert)."""
    folders = {name: Path(path).resolve() for name, path in experts.items()}

    def expert_of(ref: str) -> str | None:
        ref = ref.split("+")[-1]  # mergekit's "base+lora_adapter": the adapter is the expert
        model = parse_model_id(ref)
        local = (config_dir / Path(ref).expanduser()).resolve()
        for name, folder in folders.items():
            if local == folder or ref == name or Path(ref).name in (name, folder.name):
                return name
            if model is not None and f"models--{model.repo.replace('/', '--')}" in folder.parts:
                return name
        return None

    return expert_of


def mergekit_recipe(path: str, engine: "MergeEngine", experts: Mapping[str, str], *, field: str) -> tuple["MergeRecipe", list[str]]:
    """The recipe of the mergekit YAML at ``path`` and its notes; problems are one-line user errors."""
    from evomerge.merge import MergeError, recipe_from_mergekit

    config = read_yaml(Path(path), f"{field} ({path})")
    try:
        base = expert_matcher(Path(path).parent, {"base": str(engine.base_path)})
        return recipe_from_mergekit(config, engine.layout, expert_matcher(Path(path).parent, experts),
                                    is_base=lambda ref: base(ref) is not None)
    except MergeError as exc:
        raise UserError(f"{field}: {path}: {exc}") from None


def check_mergekit_files(spec: ExperimentSpec, engine: "MergeEngine") -> None:
    """Read ``init`` and ``baselines`` before the run folder exists; print what does not fit."""
    if spec.init is not None:
        _, notes = mergekit_recipe(spec.init, engine, spec.models.experts, field="init")
        for note in notes:
            click.echo(f"warning: init {spec.init}: {note}", err=True)
    for name, path in spec.baselines.items():
        _, notes = mergekit_recipe(path, engine, spec.models.experts, field=f"baselines.{name}")
        for note in notes:
            click.echo(f"warning: baseline {name}: {note}", err=True)


def start_from_mergekit(space: "SearchSpace", spec: ExperimentSpec, engine: "MergeEngine", *, echo: bool = False) -> "SearchSpace":
    """``space`` whose starting point (``x0``) is the ``init`` config fitted to it."""
    from ._build import start_at

    assert spec.init is not None
    recipe, _ = mergekit_recipe(spec.init, engine, spec.models.experts, field="init")
    started, notes = start_at(space, recipe)
    if echo:
        for note in notes:
            click.echo(f"warning: init {spec.init} in the search space: {note}", err=True)
    return started


def baseline_recipes(spec: ExperimentSpec, engine: "MergeEngine") -> dict[str, Any]:
    """The spec's mergekit baselines as recipes, labelled ``mergekit:<name>``."""
    return {f"{BASELINE_PREFIX}{name}": mergekit_recipe(path, engine, spec.models.experts, field=f"baselines.{name}")[0]
            for name, path in spec.baselines.items()}
