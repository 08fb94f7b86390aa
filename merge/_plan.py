"""Recipe -> per-tensor plan, with every recipe error caught before a single weight is written.

`apply` must never leave a live model half-merged because rule 7 names an unknown expert, so the
whole recipe is resolved and validated against the engine (experts, methods, expert counts, LoRA
mode) first; each problem becomes a one-line `RuleError` naming the rule, its culprit field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from ._errors import RuleError
from ._layout import ModelLayout
from ._recipe import ExpertParams, GroupRule, MergeRecipe


_TABLE_FIELDS = {"density", "gamma", "epsilon", "rescale"}
"""Fields whose use means a method reads magnitude tables (thresholds, DARE/DELLA's L1 norm)."""


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is merged: its rule (None = keep the base), method and participating experts."""

    name: str
    rule: GroupRule | None
    method: Any = None
    experts: tuple[str, ...] = ()
    params: tuple[ExpertParams, ...] = ()
    needs_tables: bool = False


def expert_count_ok(spec: Any, n: int) -> bool:
    """A method's `expert_count`: None (any), an int (exactly), or a (min, max|None) range."""
    if spec is None:
        return n >= 1
    if isinstance(spec, int):
        return n == spec
    low, high = spec
    return n >= (low or 0) and (high is None or n <= high)


def describe_count(spec: Any) -> str:
    """A method's expert count in words: 'exactly 2', 'at least 2', '1 to 3'."""
    if isinstance(spec, int):
        return f"exactly {spec}"
    if spec is not None and spec[0] == spec[1]:
        return f"exactly {spec[0]}"
    low, high = spec if spec is not None else (1, None)
    return f"at least {low}" if high is None else f"{low} to {high}"


def _method(rule: GroupRule, index: int) -> Any:
    from .methods import get_method

    try:
        return get_method(rule.method)
    except (KeyError, ValueError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        raise RuleError(index, "method", message) from None


def check_rules(recipe: MergeRecipe, experts: Iterable[str], lora_experts: set[str]) -> list[Any]:
    """Validate each rule; returns the method object per rule."""
    known = list(experts)
    methods = []
    for index, rule in enumerate(recipe.rules):
        method = _method(rule, index)
        unknown = [e for e in rule.experts if e not in known]
        if unknown:
            raise RuleError(index, "experts", f"unknown expert {unknown[0]!r}; the engine has experts {known}")
        spec = getattr(method, "expert_count", None)
        if not expert_count_ok(spec, len(rule.experts)):
            raise RuleError(index, "method", f"method {rule.method!r} takes {describe_count(spec)} expert(s), "
                                             f"got {len(rule.experts)} ({', '.join(rule.experts)})")
        if recipe.lora_mode == "adapter":
            full = [e for e in rule.experts if e not in lora_experts]
            if full:
                raise RuleError(index, "lora_mode", f"lora_mode='adapter' merges LoRA adapters only, but {full[0]!r} is a "
                                                    "full model; use lora_mode='materialized' to mix them")
        methods.append(method)
    return methods


def plan_recipe(recipe: MergeRecipe, layout: ModelLayout, experts: Iterable[str], lora_experts: set[str]) -> list[TensorPlan]:
    """The validated plan for every tensor of `layout`, in layout order."""
    methods = check_rules(recipe, experts, lora_experts)
    index_of = {id(rule): i for i, rule in enumerate(recipe.rules)}
    plan: list[TensorPlan] = []
    for name, slot in layout.slots.items():
        rule = recipe.rule_for(slot.layer, slot.kind)
        if rule is None or not rule.experts:
            plan.append(TensorPlan(name, None))
            continue
        method = methods[index_of[id(rule)]]
        plan.append(TensorPlan(
            name, rule, method, tuple(rule.experts), tuple(rule.experts.values()),
            needs_tables=method.is_random or bool(_TABLE_FIELDS & set(getattr(method, "uses", ()))),
        ))
    return plan
