"""mergekit YAML -> `MergeRecipe`: a merge users already have, as a starting point or a baseline.

The inverse of `_mergekit.recipe_to_mergekit`, for the ``models:`` form of mergekit configs (one
``merge_method``, a ``base_model``, per-model and shared ``parameters``). A parameter's value at
a tensor follows mergekit's rules (`mergekit.config.evaluate_setting`): a scalar; a list of
numbers is a gradient interpolated over the layers (``t = layer / (num_layers - 1)``, ``t = 0``
outside the decoder layers); a list of ``{filter, value}`` conditions takes the first whose filter
is a substring of the tensor name (no filter: the default). A per-model value wins over a shared one.

A recipe holds one value per tensor *slot* (layer x module kind), so tensors of one slot with
different values (a filter on ``q_proj`` only) are averaged; every such approximation is reported
in the returned notes, never silently dropped. What evomerge cannot express at all (``slices``,
a method it lacks) raises `MergeError` with one line.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Mapping

from ._errors import MergeError
from ._layout import ModelLayout
from ._plan import describe_count, expert_count_ok
from ._recipe import ExpertParams, GroupRule, MergeRecipe

MERGEKIT_DEFAULTS: dict[str, dict[str, bool]] = {
    # mergekit method: defaults of its shared boolean options; checked against mergekit's registry in tests.
    "task_arithmetic": {"normalize": False, "rescale": False},
    "ties": {"normalize": True, "rescale": False},
    "dare_ties": {"normalize": False, "rescale": True},
    "dare_linear": {"normalize": False, "rescale": True},
    "breadcrumbs": {"normalize": False, "rescale": False},
    "breadcrumbs_ties": {"normalize": False, "rescale": False},
    "della": {"normalize": True, "rescale": True},
    "della_linear": {"normalize": False, "rescale": True},
    "linear": {"normalize": True},
    "slerp": {},
    "nuslerp": {"nuslerp_flatten": True, "nuslerp_row_wise": False},
    "model_stock": {"filter_wise": False},
}
"""Methods read from mergekit YAML (those `recipe_to_mergekit` writes), with mergekit's defaults."""

PER_MODEL_DEFAULTS = {"density": 1.0, "gamma": 0.01, "epsilon": 0.15}
"""mergekit's defaults of the per-model parameters (``weight`` has none: it is required)."""


def evaluate_setting(tensor: str, setting: Any, t: float) -> float | None:
    """A numeric mergekit parameter's value at ``tensor`` (see the module docstring); None if unset."""
    if setting is None:
        return None
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, bool):
        return float(setting)
    if isinstance(setting, (int, float)):
        if not math.isfinite(setting):
            raise MergeError(f"mergekit parameter value {setting!r} is not a finite number")
        return float(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            if not all(math.isfinite(v) for v in setting):
                raise MergeError(f"mergekit parameter gradient {setting!r} holds a value that is not a finite number")
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * float(setting[i0]) + frac * float(setting[i1])
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond:
                raise MergeError(f"mergekit parameter {setting!r}: a list holds numbers (a gradient) or {{filter, value}} conditions")
            flt = cond.get("filter")
            if flt is None or flt == "*" or flt in tensor:
                return evaluate_setting(tensor, cond["value"], t)
        return None
    raise MergeError(f"mergekit parameter value {setting!r} is not a number, a gradient list or conditions")


def _method(config: Mapping[str, Any]) -> str:
    from .methods import METHODS

    if "slices" in config:
        raise MergeError("mergekit 'slices' configs (layer ranges, passthrough stacking) have no evomerge equivalent; use 'models:'")
    name = config.get("merge_method")
    ours = {m.mergekit_name: n for n, m in METHODS.items() if m.mergekit_name in MERGEKIT_DEFAULTS}
    if name not in ours:
        raise MergeError(f"mergekit merge_method {name!r} is not one of {', '.join(sorted(ours))}")
    if not isinstance(config.get("models"), list) or not config["models"]:
        raise MergeError("mergekit config has no 'models' list")
    if name in ("nuslerp", "model_stock") and not config.get("base_model"):
        raise MergeError(f"mergekit {name} without 'base_model' merges whole models; evomerge's {name} merges task vectors: "
                         "add the base model as 'base_model'")
    return ours[name]


def model_refs(config: Mapping[str, Any]) -> list[str]:
    """The model references of a mergekit config's ``models`` (``base+adapter`` as written)."""
    _method(config)
    refs = []
    for entry in config["models"]:
        ref = entry.get("model") if isinstance(entry, dict) else None
        if not isinstance(ref, str):
            raise MergeError(f"mergekit models entry {entry!r} has no 'model' path")
        refs.append(ref)
    return refs


def _slot_t(layer: Any, num_layers: int) -> float:
    """mergekit's gradient position: ``layer / (num_layers - 1)``; 0 outside the decoder layers."""
    if not isinstance(layer, int):
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def recipe_from_mergekit(
    config: Mapping[str, Any], layout: ModelLayout, expert_of: Callable[[str], str | None],
    is_base: Callable[[str], bool] | None = None,
) -> tuple[MergeRecipe, list[str]]:
    """The recipe of a mergekit config over ``layout``, and notes on what it approximates.

    ``expert_of`` maps a model reference of the config to an expert name (None: not an expert);
    ``is_base`` tells the base model among the others (besides the config's ``base_model``). A
    ``linear`` config that lists the base with a weight averages it in: `_linear_with_base`.
    """
    method = _method(config)
    from .methods import get_method

    mk = get_method(method).mergekit_name
    shared = dict(config.get("parameters") or {})
    notes: list[str] = []
    per_model: dict[str, dict[str, Any]] = {}
    base_params: dict[str, Any] | None = None
    for ref, entry in zip(model_refs(config), config["models"]):
        expert = expert_of(ref)
        params = dict(entry.get("parameters") or {})
        if expert is None and (ref == config.get("base_model") or (is_base is not None and is_base(ref))):
            base_params = params  # mergekit lists the base among models; its task vector is zero
            continue
        if expert is None:
            if method == "linear" and any(evaluate_setting(n, params.get("weight", shared.get("weight", 0)), 0) for n in layout.slots):
                notes.append(f"model {ref!r} is neither the base nor an expert: its linear weight is dropped")
            elif method not in ("linear", "slerp"):
                notes.append(f"model {ref!r} is not one of the spec's experts: left out")
            continue
        per_model[expert] = params
    if not per_model:
        raise MergeError("mergekit config names none of the spec's experts among its models")
    named_base = config.get("base_model")
    if isinstance(named_base, str) and is_base is not None and expert_of(named_base) is None and not is_base(named_base):
        notes.append(f"base_model {named_base!r} is not the spec's base: the merge is of the task vectors over the spec's base")
    count = get_method(method).expert_count
    if not expert_count_ok(count, len(per_model)):
        raise MergeError(f"mergekit {mk} merges {describe_count(count)} model(s) besides the base; "
                         f"the config lists {len(per_model)} of the spec's experts")
    if method == "linear" and base_params is not None:
        base_weight = _base_weights(layout, base_params, shared)
        if any(base_weight.values()):
            return _linear_with_base(layout, per_model, shared, base_weight, notes)
    kinds = [k for k in ("weight", "density", "gamma", "epsilon") if k in get_method(method).uses]
    if method == "slerp":
        kinds = []
    # Per slot: the values of its tensors, per (expert, kind), and the slerp t.
    values: dict[Any, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, slot in layout.slots.items():
        t = _slot_t(slot.layer, layout.num_layers)
        cell = values[(slot.layer, slot.kind)]
        for expert, params in per_model.items():
            for kind in kinds:
                value = evaluate_setting(name, params.get(kind, shared.get(kind)), t)
                if value is None:
                    if kind == "weight":
                        raise MergeError(f"mergekit model of expert {expert!r} has no 'weight' (mergekit requires one)")
                    value = PER_MODEL_DEFAULTS[kind]
                cell[(expert, kind)].append(value)
        if method == "slerp":
            value = evaluate_setting(name, shared.get("t"), t)
            if value is None:
                raise MergeError("mergekit slerp config has no 't' parameter")
            cell[("", "t")].append(value)
    rules, spread = _slot_rules(method, values, per_model, kinds)
    if spread:
        notes.append(f"values that differ between tensors of one layer and module kind are averaged: {', '.join(sorted(set(spread)))}")
    defaults = MERGEKIT_DEFAULTS[mk]
    normalize = bool(shared.get("normalize", defaults.get("normalize", True)))
    rescale = shared.get("rescale", defaults.get("rescale", False))
    if "rescale" in get_method(method).uses:
        if not rescale:
            notes.append("rescale: false is not expressible: evomerge rescales as mergekit's rescale: true")
    elif rescale and "rescale" in defaults:  # mergekit's magnitude pruning (ties, breadcrumbs, task_arithmetic)
        notes.append(f"rescale: true is not expressible for {method}: evomerge prunes without mergekit's L1 rescale of the kept entries")
    for key in ("nuslerp_flatten", "nuslerp_row_wise", "filter_wise"):
        if key in defaults and bool(shared.get(key, defaults[key])) != defaults[key]:
            notes.append(f"{key}: {shared[key]} is not expressible: evomerge's {method} is mergekit's with {key}: {defaults[key]}")
    lam = float(shared.get("lambda", 1.0))
    known = {"normalize", "rescale", "lambda", "int8_mask", "t", *kinds, *defaults}
    for key in sorted(set(shared) - known):
        notes.append(f"shared parameter {key!r} ignored")
    return MergeRecipe(rules=rules, normalize=normalize, lambda_=lam), notes


def _base_weights(layout: ModelLayout, base_params: Mapping[str, Any], shared: Mapping[str, Any]) -> dict[str, float]:
    """Per tensor the linear weight of the base listed among a config's models."""
    weights: dict[str, float] = {}
    for name, slot in layout.slots.items():
        value = evaluate_setting(name, base_params.get("weight", shared.get("weight")), _slot_t(slot.layer, layout.num_layers))
        if value is None:
            raise MergeError("mergekit linear lists the base model without a 'weight' (mergekit requires one)")
        weights[name] = value
    return weights


def _linear_with_base(
    layout: ModelLayout, per_model: Mapping[str, Mapping[str, Any]],
    shared: Mapping[str, Any], base_weight: Mapping[str, float], notes: list[str],
) -> tuple[MergeRecipe, list[str]]:
    """A ``linear`` config that averages the base in, as the same merge in task-vector form.

    mergekit computes ``(w_b·base + Σ w_i x_i) / W`` with ``W = w_b + Σ w_i``; as ``x_i = base + d_i``
    that is ``base + Σ (w_i / W) d_i``: task arithmetic with weights ``w_i / W``. Without
    ``normalize`` the result ``W·base + Σ w_i d_i`` has a base term no evomerge method writes,
    so the base's weight is dropped with a note (evomerge's linear then gives ``Σ w_i x_i``).
    """
    normalize = bool(shared.get("normalize", MERGEKIT_DEFAULTS["linear"]["normalize"]))
    values: dict[Any, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, slot in layout.slots.items():
        t = _slot_t(slot.layer, layout.num_layers)
        weights = {}
        for expert, params in per_model.items():
            value = evaluate_setting(name, params.get("weight", shared.get("weight")), t)
            if value is None:
                raise MergeError(f"mergekit model of expert {expert!r} has no 'weight' (mergekit requires one)")
            weights[expert] = value
        total = base_weight[name] + sum(weights.values())
        divisor = total if normalize and abs(total) >= 1e-8 else 1.0
        for expert, value in weights.items():
            values[(slot.layer, slot.kind)][(expert, "weight")].append(value / divisor)
    if not normalize:
        notes.append("the base model's linear weight is dropped: without normalize mergekit's linear scales the base "
                     "by the sum of all weights, which no evomerge method writes")
        method = "linear"
    else:
        notes.append("linear averaging the base model in is read as task_arithmetic with weights w / (w_base + sum of weights), "
                     "the same merge")
        method = "task_arithmetic"
    rules, spread = _slot_rules(method, values, per_model, ["weight"])
    if spread:
        notes.append(f"values that differ between tensors of one layer and module kind are averaged: {', '.join(sorted(set(spread)))}")
    for key in sorted(set(shared) - {"normalize", "weight"}):
        notes.append(f"shared parameter {key!r} ignored")
    return MergeRecipe(rules=rules, normalize=False), notes


def _slot_rules(
    method: str, values: Mapping[Any, Mapping[tuple[str, str], list[float]]], per_model: Mapping[str, Any], kinds: list[str],
) -> tuple[list[GroupRule], list[str]]:
    """One rule per (layer, module kind) slot holding its tensors' mean values, and the values averaged."""
    from .methods import get_method

    rules: list[GroupRule] = []
    spread: list[str] = []
    for (layer, kind), cell in values.items():
        mean = {key: sum(v) / len(v) for key, v in cell.items()}
        spread += [f"{k}[{e}]" if e else k for (e, k), v in cell.items() if max(v) - min(v) > 1e-9]
        try:
            experts = {e: ExpertParams(**{k: mean[(e, k)] for k in kinds}) for e in per_model}
            get_method(method).check_params(list(experts.values()))
        except ValueError as exc:  # pydantic: a density or gamma outside [0, 1]; DELLA's epsilon range
            averaged = " (evomerge sets one value per layer and module kind: these are the averages of its tensors')" \
                if any(max(v) - min(v) > 1e-9 for v in cell.values()) else ""
            raise MergeError(f"mergekit parameters at layer {layer} {kind}: {' '.join(str(exc).split())[:200]}{averaged}") from None
        rule = GroupRule(layers=None if layer is None else [layer], kinds=[kind], method=method,
                         experts=experts, t=mean.get(("", "t")))
        # A rule without layers selects its kind everywhere: it goes first, so per-layer rules win.
        if layer is None:
            rules.insert(0, rule)
        else:
            rules.append(rule)
    return rules, spread
