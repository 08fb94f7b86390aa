"""Spec -> live objects: merge engine, objectives, scorer, search space.

Each builder takes a *resolved* spec section (see `_resolve.resolve`) and returns the object of the
package that owns it, so this module is the only place where the spec's vocabulary meets the
packages' constructors.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ._errors import UserError
from ._spec import ExperimentSpec, ObjectiveSpec, ScorerSpec

if TYPE_CHECKING:
    from evomerge.merge import MergeEngine, MergeRecipe
    from evomerge.objectives import Objective, Scorer
    from evomerge.search import SearchSpace, SpaceTemplate

def _torch_dtype(name: str) -> Any:
    """The torch dtype for a spec dtype name; None for ``auto`` (keep the checkpoint's)."""
    import torch

    return None if name == "auto" else getattr(torch, name)


def _device(name: str) -> str:
    """``auto`` -> the first GPU when there is one, else the CPU."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_engine(spec: ExperimentSpec, *, progress: bool = True) -> "MergeEngine":
    """Load base and experts once; task vectors stay cached for the whole run."""
    from evomerge.merge import MergeEngine

    models = spec.models
    engine = MergeEngine.load(
        models.base,
        models.experts,
        device=_device(spec.scorer.device),
        dtype=_torch_dtype(spec.scorer.dtype),
        allow_pickle=models.allow_pickle,
        progress=progress,
        compile=models.compile,
    )
    engine.spill_dir = sort_spill_dir()
    return engine


def sort_spill_dir() -> Path:
    """Where exact pruning's sort orders are memory-mapped from when memory is short: the cache's
    disk (`$EVOMERGE_CACHE/sorts`), not the temp folder, which is often RAM."""
    from .zoo import cache_root

    return cache_root() / "sorts"


def build_objective(obj: ObjectiveSpec, *, seed: int, data: str | None = None, rungs: bool = False) -> "Objective":
    """One `Objective`; ``seed`` (the spec's ``data_seed``) draws its calibration subset; ``data``
    replaces the calibration file with a held-out set (scored in full); ``rungs``: the items in a
    seeded random order, so the first ``n`` are the nested subsets of multi-fidelity search."""
    from evomerge.objectives import CalibrationSet, LmEvalTask, Objective

    task = None if obj.lm_eval is None else LmEvalTask(**obj.lm_eval.model_dump())
    path = data or obj.data
    calibration = None
    if path is not None:
        # `size` bounds the per-candidate cost of the search; a held-out check scores every item.
        size = None if data is not None else obj.size
        calibration = CalibrationSet.load(
            path, name=obj.name, size=size, seed=seed, chat_template=obj.chat_template, system_prompt=obj.system_prompt
        )
        if rungs and data is None:
            calibration = calibration.shuffled(seed)
    return Objective(
        name=obj.name,
        metric=obj.metric,
        calibration=calibration,
        direction=obj.direction,
        extract=obj.extract,
        pattern=obj.pattern,
        normalization=obj.normalization,
        function=obj.function,
        lm_eval=task,
    )


def build_objectives(spec: ExperimentSpec, *, holdout: bool = False) -> list["Objective"]:
    """The spec's objectives; with ``holdout`` the metric objectives read their held-out sets."""
    if holdout:
        # lm-eval tasks have no held-out set of their own here: re-scoring them would only repeat the search's numbers.
        return [build_objective(o, seed=spec.data_seed, data=o.holdout) for o in spec.objectives
                if o.holdout or (o.data is None and o.lm_eval is None)]
    return [build_objective(o, seed=spec.data_seed, rungs=spec.fidelity is not None) for o in spec.objectives]


def build_scorer(spec: ExperimentSpec, engine: "MergeEngine", objectives: list["Objective"]) -> "Scorer":
    """The scoring backend with the spec's options (a failed candidate is a result, never a crash).

    vLLM loads base and experts into its own GPU workers, so it gets paths rather than the engine.
    """
    scorer: ScorerSpec = spec.scorer
    if scorer.backend == "vllm":
        from evomerge.objectives import VllmScorer

        _check_options(VllmScorer, scorer)
        dtype = "auto" if scorer.dtype == "auto" else scorer.dtype
        return VllmScorer(
            spec.models.base, spec.models.experts, objectives, dtype=dtype, max_new_tokens=scorer.max_new_tokens,
            timeout=scorer.timeout, seed=spec.seed, spill_dir=sort_spill_dir(), **scorer.options,
        )
    from evomerge.objectives import TransformersScorer

    _check_options(TransformersScorer, scorer)
    return TransformersScorer(
        engine, objectives, device=_device(scorer.device), dtype=_torch_dtype(scorer.dtype),
        batch_size=scorer.batch_size, max_new_tokens=scorer.max_new_tokens, timeout=scorer.timeout, **scorer.options,
    )


def _check_options(backend: type, scorer: ScorerSpec) -> None:
    """``scorer.options`` are keywords of the backend's constructor that the spec has no field for;
    an unknown one is a one-line user error, not a TypeError after the models loaded."""
    fields = {"engine", "base", "experts", "objectives", "dtype", "device", "batch_size", "max_new_tokens", "timeout",
              "seed", "spill_dir"}
    allowed = [name for name in inspect.signature(backend).parameters if name not in fields]
    unknown = sorted(set(scorer.options) - set(allowed))
    if unknown:
        raise UserError(f"scorer.options: {', '.join(map(repr, unknown))} is not an option of the {scorer.backend} "
                        f"backend; allowed: {', '.join(allowed)}")


def build_space(engine: "MergeEngine", template: "SpaceTemplate", held: Mapping[str, float] | None = None) -> "SearchSpace":
    """The genome <-> recipe map; ``held`` adds values inherited from a previous stage."""
    from evomerge.search import SearchSpace

    if held:
        template = template.model_copy(update={"fixed": {**template.fixed, **held}})
    return SearchSpace(engine.layout, engine.expert_names, template)


def start_at(space: "SearchSpace", recipe: "MergeRecipe") -> tuple["SearchSpace", list[str]]:
    """``space`` whose starting point (``x0``) is ``recipe`` fitted to it (`SearchSpace.fit`), and
    the fit's notes. The one way a search is made to start from a given merge: a mergekit ``init``
    config, or a later stage continuing from the previous stage's best trial."""
    from evomerge.search import SearchSpace

    methods = {rule.method for rule in recipe.rules}
    # under a method choice the recipe's method (when it is one of the choices) starts, fitted to its space
    method = methods.pop() if len(methods) == 1 and methods <= set(space.methods) else space.template.method
    sub = space.sub(method)
    genome, notes = sub.fit(recipe)
    init = {**space.template.init, **sub.describe(genome)}
    template = space.template.model_copy(update={"init": init, "method": method})
    return SearchSpace(space.layout, space.experts, template), notes

