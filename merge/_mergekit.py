"""Recipe -> mergekit YAML, wherever mergekit 0.1.x can express the recipe exactly.

mergekit has one `merge_method` per config; per-tensor variation goes through parameter
*conditions*: a list of `{filter, value}` where the first filter that is a substring of the tensor
name wins. A recipe's rules select tensors by (layer, kind), so each slot group becomes one filter
(the group's common dotted prefix when it selects exactly that group, else the tensor names).
What cannot be expressed raises `MergeError` listing every reason: several methods in one recipe,
methods mergekit lacks (topk), adapter-space LoRA merging, DARE's 'paper' rescale, a rule setting a
parameter the mergekit method does not take, or a method-specific way to keep base tensors missing.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping

import yaml

from ._errors import MergeError
from ._layout import ModelLayout, TensorSlot
from ._recipe import ExpertParams, GroupRule, MergeRecipe

MERGEKIT_PARAMETERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # mergekit method: (shared parameters, per-model parameters); checked against mergekit's registry in tests.
    **{name: (frozenset({"int8_mask", "normalize", "rescale", "lambda"}), frozenset({"weight", "density"}))
       for name in ("task_arithmetic", "ties", "dare_ties", "dare_linear")},
    **{name: (frozenset({"int8_mask", "normalize", "rescale", "lambda"}), frozenset({"weight", "density", "gamma"}))
       for name in ("breadcrumbs", "breadcrumbs_ties")},
    **{name: (frozenset({"int8_mask", "normalize", "rescale", "lambda"}), frozenset({"weight", "density", "epsilon"}))
       for name in ("della", "della_linear")},
    "linear": (frozenset({"normalize"}), frozenset({"weight"})),
    "slerp": (frozenset({"t"}), frozenset()),
    "nuslerp": (frozenset({"nuslerp_flatten", "nuslerp_row_wise"}), frozenset({"weight"})),
    "model_stock": (frozenset({"filter_wise"}), frozenset()),
}
"""The parameters mergekit accepts per method (methods outside this table are not exported)."""

_PER_MODEL = ("weight", "density", "gamma", "epsilon")
_GTA = {n for n, (shared, _) in MERGEKIT_PARAMETERS.items() if "lambda" in shared}


def slot_filters(layout: ModelLayout) -> dict[TensorSlot, list[str]]:
    """Per slot the mergekit filter strings that select exactly its tensors (substring match)."""
    groups: dict[TensorSlot, list[str]] = defaultdict(list)
    for name, slot in layout.slots.items():
        groups[slot].append(name)
    filters: dict[TensorSlot, list[str]] = {}
    for slot, names in groups.items():
        others = [n for n in layout.slots if layout.slots[n] != slot]
        parts = [n.split(".") for n in names]
        common: list[str] = []
        for column in zip(*parts):
            if len(set(column)) > 1:
                break
            common.append(column[0])
        prefix = ".".join(common) + "." if common and len(common) < len(parts[0]) else None
        if prefix and not any(prefix in n for n in others):
            filters[slot] = [prefix]
        else:
            filters[slot] = list(names)
    return filters


def recipe_to_mergekit(
    recipe: MergeRecipe, layout: ModelLayout, base: str, experts: Mapping[str, str], *,
    lora_experts: frozenset[str] = frozenset(), dtype: str | None = None,
) -> str:
    """mergekit YAML for `recipe`; `experts` maps names to paths (LoRA: adapter paths, written as base+adapter).

    `dtype` is the model's dtype: the YAML asks mergekit for fp32 arithmetic (`dtype: float32`) and,
    for 16-bit models, output in the model dtype (`out_dtype`), which is how evomerge computes."""
    from .methods import get_method

    governing = {slot: recipe.rule_for(slot.layer, slot.kind) for slot in set(layout.slots.values())}
    used = [r for r in recipe.rules if any(g is r for g in governing.values())]
    reasons: list[str] = []
    if recipe.lora_mode == "adapter":
        reasons.append("lora_mode='adapter' merges LoRA factors (A' and B') in adapter space, which mergekit does not do")
    names = sorted({r.method for r in used})
    if len(names) > 1:
        reasons.append(f"rules use different methods ({', '.join(names)}); mergekit applies one merge_method per config")
    method = get_method(names[0]) if names else None
    mk = method.mergekit_name if method is not None else None
    if method is not None and (mk is None or mk not in MERGEKIT_PARAMETERS):
        reasons.append(f"method {method.name!r} has no mergekit equivalent")
    if reasons or method is None or mk is None:
        raise MergeError("recipe cannot be written as mergekit YAML: " + "; ".join(reasons or ["no rule selects any tensor"]))
    shared, per_model = MERGEKIT_PARAMETERS[mk]
    uses = set(method.uses)
    if "rescale" in uses and recipe.rescale == "paper":
        reasons.append("rescale='paper' (1/density) has no mergekit equivalent (mergekit restores the L1 norm)")
    if "lambda" in uses and recipe.lambda_ != 1.0 and "lambda" not in shared:
        reasons.append(f"mergekit's {mk} has no lambda parameter (recipe lambda={recipe.lambda_})")
    if "t" in uses and "t" not in shared and any(r.t is not None for r in used):
        reasons.append(f"mergekit's {mk} has no t parameter")
    expert_names = sorted({e for r in used for e in r.experts})
    _, high = method.expert_count
    if high is not None and len(expert_names) > high:
        reasons.append(f"{method.name} takes {high} expert(s) and mergekit one set of models, but the rules use {expert_names}")
    if mk == "model_stock" and len({frozenset(r.experts) for r in used}) > 1:
        reasons.append("model_stock rules merge different experts; mergekit's model_stock merges one set of models everywhere")
    keeps_base = any(g is None for g in governing.values())
    if keeps_base and mk not in _GTA and mk not in ("linear", "slerp"):
        reasons.append(f"some tensors keep the base weights, which mergekit's {mk} cannot express")
    if reasons:
        raise MergeError("recipe cannot be written as mergekit YAML: " + "; ".join(reasons))

    filters = slot_filters(layout)

    def conditions(value_of: Any) -> Any:
        """A scalar when every slot agrees, else a condition list (filters + a final catch-all)."""
        values = {slot: value_of(governing[slot]) for slot in filters}
        distinct = set(values.values())
        if len(distinct) == 1:
            return distinct.pop()
        out = [{"filter": f, "value": v} for slot, v in values.items() for f in filters[slot]]
        out.append({"value": value_of(None)})
        return out

    def model_ref(expert: str) -> str:
        return f"{base}+{experts[expert]}" if expert in lora_experts else str(experts[expert])

    def expert_value(expert: str, field: str) -> Any:
        def value(rule: GroupRule | None) -> Any:
            if rule is None or expert not in rule.experts:
                return 0.0 if field == "weight" else getattr(ExpertParams(), field)
            return getattr(rule.experts[expert], field)
        return value

    models: list[dict[str, Any]] = []
    for expert in expert_names:
        params = {f: conditions(expert_value(expert, f)) for f in _PER_MODEL if f in per_model and (f in uses or f == "weight")}
        models.append({"model": model_ref(expert), **({"parameters": params} if params else {})})
    config: dict[str, Any] = {"merge_method": mk, "base_model": str(base)}
    parameters: dict[str, Any] = {}
    if "normalize" in shared:
        parameters["normalize"] = recipe.normalize
    if "lambda" in shared:
        parameters["lambda"] = recipe.lambda_
    if "rescale" in shared and "rescale" in uses:
        parameters["rescale"] = True
    if mk == "linear":
        # mergekit's linear averages models, not task vectors: the base enters with weight 1 exactly
        # where no rule applies, so those tensors come out as the base. `base_model` stays although
        # linear merges no base: it makes the base the donor of config.json and the tokenizer, which
        # mergekit otherwise takes from the first of an unordered set of the models.
        models.insert(0, {"model": str(base), "parameters": {"weight": conditions(lambda r: 1.0 if r is None else 0.0)}})
    if mk == "slerp":
        models.insert(0, {"model": str(base)})
        parameters["t"] = conditions(lambda r: 0.0 if r is None else (r.t if r.t is not None else 0.5))
    config["models"] = models
    if parameters:
        config["parameters"] = parameters
    if dtype:
        # evomerge merges in fp32 and rounds once to the model dtype; mergekit's `dtype` is its compute
        # dtype (inputs are cast to it), `out_dtype` what it writes. `dtype: bfloat16` alone would
        # make mergekit sum, elect and divide in bf16.
        config["dtype"] = "float32" if dtype in ("float32", "bfloat16", "float16") else dtype
        if config["dtype"] != dtype:
            config["out_dtype"] = dtype
    return yaml.safe_dump(config, sort_keys=False)
