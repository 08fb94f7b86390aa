"""``evomerge import mergekit-evolve CONFIG``: a mergekit-evolve config as an evomerge spec.

mergekit-evolve (``mergekit/evo``) searches a genome of per-layer-group merge parameters with
CMA-ES against lm-eval tasks. Its config maps onto an evomerge spec field by field:

=========================================  ===================================================
mergekit-evolve                             evomerge spec
=========================================  ===================================================
``genome.base_model``, ``genome.models``    ``models.base``, ``models.experts`` (ids stay ids;
                                            ``base+lora`` becomes the adapter)
``genome.merge_method``                     ``space.method``
``genome.layer_granularity`` (0: global)    ``space.granularity`` (k, ``layer`` for 1)
``genome.smooth``                           ``space.smoothing`` (one control point per group)
``genome.filters``                          ``space.modules`` (attention / mlp / norm groups)
``genome.normalize``                        ``space.normalize`` (same default: ties, dare_ties,
                                            linear normalize)
``genome.allow_negative_weights``           ``space.bounds.weight`` ([-1.5, 1.5], else [0, 1.5])
initial genotype (1/n weights, density 1)   ``space.init``
``tasks`` (name, weight, ``acc,none``)      one ``lm_eval`` objective per task; the weights as
                                            ``optimizer.weights`` (CMA-ES minimizes their sum)
``limit``, ``num_fewshot``                  each task's ``lm_eval.limit`` / ``num_fewshot``
``--max-fevals`` (CLI)                      ``budget.evaluations``
=========================================  ===================================================

``apply_chat_template``, ``fewshot_as_multiturn`` carry over to each ``lm_eval`` section. What has
no counterpart (``tokenizer_source``, ``shuffle``, ``random_init``, filters naming no module kind) is listed as a note: printed, and written as comments at the top of
the spec, so nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from evomerge.merge import write_atomic

from ._errors import UserError
from ._hub import parse_model_id
from ._preflight import writable_parent
from ._spec_io import read_yaml, validate_spec

EVOLVE_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")
"""mergekit-evolve's genome methods (``METHOD_PARAM_MAPS`` in mergekit/evo/genome.py)."""
_TOP_KEYS = {"genome", "tasks", "limit", "num_fewshot", "shuffle", "random_init", "apply_chat_template", "fewshot_as_multiturn"}
_GENOME_KEYS = {"models", "merge_method", "base_model", "tokenizer_source", "layer_granularity", "normalize",
                "allow_negative_weights", "filters", "smooth"}
_FILTER_KINDS = {"self_attn": "attention", "attn": "attention", "attention": "attention", "mlp": "mlp",
                 "feed_forward": "mlp", "norm": "norm", "layernorm": "norm", "embed": "embedding", "lm_head": "head"}
"""Substrings of mergekit tensor filters and the evomerge module kind they select."""


def _model(ref: str, config_dir: Path) -> str:
    """A model reference as the spec takes it: a local path made absolute, an id unchanged."""
    local = (config_dir / Path(ref).expanduser()).resolve()
    if local.exists() or parse_model_id(ref) is None:
        return str(local)
    return ref


def _name(ref: str, taken: set[str]) -> str:
    """An expert name from a reference: its last path part, made spec-safe and unique."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", ref.split("@")[0].rstrip("/").split("/")[-1]) or "expert"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    taken.add(name)
    return name


def _modules(filters: list[str], notes: list[str]) -> list[list[str]] | str:
    """evomerge module groups for mergekit's tensor filters (one group each, the rest last)."""
    groups: list[list[str]] = []
    for flt in filters:
        kind = next((k for key, k in _FILTER_KINDS.items() if key in flt), None)
        if kind is None:
            notes.append(f"genome.filters: {flt!r} names no module kind (attention, mlp, norm, embed, lm_head); its tensors join the rest")
        elif not any(kind in g for g in groups):
            groups.append([kind])
    if not groups:
        return "all"
    rest = [k for k in ("attention", "mlp", "norm", "embedding", "head", "other") if not any(k in g for g in groups)]
    return groups + ([rest] if rest else [])


def _num_layers(base: str) -> int | None:
    """The base's layer count from its config.json (local folder), for smoothing; None if unknown."""
    path = Path(base) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    return config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")


def _objective_name(task: str, taken: set[str]) -> str:
    return _name(task.replace("/", "_"), taken)


def evolve_to_spec(path: Path, *, name: str | None = None, evaluations: int = 100, wall_clock: float | None = None,
                   include_path: Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """The evomerge spec mapping for the mergekit-evolve config at ``path``, and notes on what differs."""
    label = str(path)
    config = read_yaml(path, label)
    notes: list[str] = []
    for key in sorted(set(config) - _TOP_KEYS):
        notes.append(f"{key!r} is not a mergekit-evolve setting: ignored")
    genome = config.get("genome")
    if not isinstance(genome, dict):
        raise UserError(f"{label}: genome: required section is missing (models, merge_method, base_model, ...)")
    for key in sorted(set(genome) - _GENOME_KEYS):
        notes.append(f"genome.{key} is not a mergekit-evolve genome setting: ignored")
    method = genome.get("merge_method")
    if method not in EVOLVE_METHODS:
        raise UserError(f"{label}: genome.merge_method: {method!r} is not one of {', '.join(EVOLVE_METHODS)}")
    models = genome.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise UserError(f"{label}: genome.models: expected a list of model references (paths or hub ids)")
    base = genome.get("base_model")
    if not isinstance(base, str):
        raise UserError(f"{label}: genome.base_model: evomerge merges task vectors against a base; add base_model (the models' common base)")
    tasks = config.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise UserError(f"{label}: tasks: expected a list of lm-eval tasks (names, or {{name, weight, metric}})")

    config_dir = path.resolve().parent
    taken: set[str] = set()
    experts: dict[str, str] = {}
    for ref in models:
        if ref == base:
            continue  # a zero task vector: mergekit-evolve lets it take part, evomerge needs no parameter for it
        model, _, lora = ref.partition("+")
        if lora and model != base:
            notes.append(f"genome.models: {ref!r}: the LoRA is merged as an adapter of the base {base!r}, not of {model!r}")
        target = lora or model
        experts[_name(target, taken)] = _model(target, config_dir)

    granularity = _whole(genome.get("layer_granularity") or 0, f"{label}: genome.layer_granularity")
    space: dict[str, Any] = {"method": method, "granularity": "global" if granularity == 0 else ("layer" if granularity == 1 else granularity)}
    if genome.get("smooth"):
        layers = _num_layers(_model(base, config_dir))
        if granularity == 0 or layers is None or layers // granularity < 2:
            notes.append("genome.smooth: needs layer groups and the base's layer count; searched without smoothing")
        else:
            space.update(granularity="layer", smoothing=layers // granularity)
    if genome.get("filters"):
        space["modules"] = _modules(list(genome["filters"]), notes)
    normalize = genome.get("normalize")
    space["normalize"] = method in ("ties", "dare_ties", "linear") if normalize is None else _flag(normalize, f"{label}: genome.normalize")
    if method != "slerp":
        space["bounds"] = {"weight": [-1.5, 1.5] if genome.get("allow_negative_weights") else [0.0, 1.5]}
        space["init"] = {"weight": round(1.0 / len(models), 6), **({"density": 1.0} if method in ("ties", "dare_ties") else {})}
    else:
        notes.append("slerp: mergekit-evolve interpolates between the two heaviest models per layer group; evomerge's slerp searches t towards one expert")

    objectives, weights = [], {}
    names: set[str] = set()
    for task in tasks:
        task = {"name": task} if isinstance(task, str) else dict(task)
        if not isinstance(task.get("name"), str):
            raise UserError(f"{label}: tasks: {task!r} has no name")
        metric, _, filter_name = str(task.get("metric", "acc,none")).partition(",")
        lm_eval: dict[str, Any] = {"task": task["name"], "metric": metric, "filter": filter_name or "none"}
        for key in ("num_fewshot", "limit"):
            if config.get(key) is not None:
                lm_eval[key] = config[key]
        if include_path is not None:
            lm_eval["include_path"] = str(include_path)
        for key in ("apply_chat_template", "fewshot_as_multiturn"):
            lm_eval[key] = _flag(config.get(key, True), f"{label}: {key}")
        objective = _objective_name(task["name"], names)
        objectives.append({"name": objective, "lm_eval": lm_eval})
        weights[objective] = _number(task.get("weight", 1.0), f"{label}: tasks[{task['name']!r}].weight")
    for key, why in (("shuffle", "documents are taken in lm-eval's order"), ("random_init", "the search starts from the initial genotype")):
        if config.get(key):
            notes.append(f"{key}: not carried over ({why})")
    if genome.get("tokenizer_source"):
        notes.append("genome.tokenizer_source: evomerge keeps the base's tokenizer")
    spec = {
        "name": name or re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem),
        "description": f"imported from the mergekit-evolve config {path.name}",
        "models": {"base": _model(base, config_dir), "experts": experts},
        "space": space,
        "objectives": objectives,
        "optimizer": {"library": "nevergrad", "name": "CMA", "weights": weights},
        "budget": {"evaluations": evaluations, **({"wall_clock": wall_clock} if wall_clock else {})},
    }
    return spec, notes


def write_imported_spec(config: Path, out: Path, *, name: str | None, evaluations: int, wall_clock: float | None = None,
                        include_path: Path | None = None) -> list[str]:
    """Convert, validate (a spec that would not load is an error here, not at run time), write; the notes."""
    writable_parent(out, "--out")
    spec, notes = evolve_to_spec(config, name=name, evaluations=evaluations, wall_clock=wall_clock, include_path=include_path)
    validate_spec(spec, root=out.resolve().parent, label=str(out))
    header = "".join(f"# note: {n}\n" for n in notes)
    text = f"# evomerge spec imported from {config} (evomerge import mergekit-evolve)\n{header}"
    write_atomic(out, text + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return notes


def _number(value: Any, where: str) -> float:
    """A finite number from the mergekit config, or a one-line error naming its field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: {value!r} is not a number")
    return float(value)


def _whole(value: Any, where: str) -> int:
    """A count from the mergekit config (``int('x')`` would be a traceback, ``int(2.7)`` a silent 2)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{where}: {value!r} is not a whole number >= 0")
    return value


def _flag(value: Any, where: str) -> bool:
    """true/false only: Python's ``bool('no')`` is True."""
    if not isinstance(value, bool):
        raise UserError(f"{where}: {value!r} is not true or false")
    return value
