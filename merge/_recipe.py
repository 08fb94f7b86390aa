"""`MergeRecipe`: what to merge, how, and with which coefficients, per layer group and module kind.

A recipe is plain data (pydantic), so it round-trips through JSON, travels to a vLLM worker through
`collective_rpc`, is stored with every trial in the ledger, and can be rebuilt bit for bit later:
random masks (DARE, DELLA) are seeded from (`seed`, `trial`, tensor name).

Resolution: for each tensor, the *last* rule whose selectors match wins (a global default rule first,
specific overrides after, like CSS). A tensor no rule matches keeps the base weights.
"""

from __future__ import annotations

import json
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ._errors import MergeError

ModuleKind = Literal["attention", "mlp", "norm", "embedding", "head", "other"]
"""Module kind of a tensor. `embedding` = input embeddings, `head` = output projection (lm_head)."""

Section = Literal["embed", "final_norm", "head"]
"""Tensors outside the decoder layers; selected in `GroupRule.layers` next to layer indices."""

RescalePolicy = Literal["mergekit", "paper"]
"""DARE rescale after random dropping: mergekit's (restore the tensor's L1 norm) or the paper's (1/density)."""

DrawPolicy = Literal["fast", "mergekit"]
"""DARE/DELLA masks: counter-based hashes (fast, chunkable) or torch.bernoulli over whole tensors,
consuming the tensor's generator exactly as mergekit 0.1.5 consumes its RNG (mask-for-mask parity)."""

PruningPolicy = Literal["exact", "approximate"]
"""Magnitude pruning: mergekit's entries exactly (rank tables) or thresholds from sampled order
statistics (no sort; error bound in docs/merge-methods.md)."""

LoraMode = Literal["materialized", "adapter"]
"""How LoRA experts merge: as dense deltas dW = scale*B@A against the base, or in adapter space
(A' = sum beta_i A_i', B' = sum beta_i B_i, the Evo-Merging / LoraHub form)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExpertParams(_Frozen):
    """Per-expert coefficients inside one rule. Methods read only the fields they use."""

    weight: float = 1.0
    """Scale of the expert's task vector; negative values are allowed (sign-aware scaling)."""
    density: float = Field(1.0, ge=0.0, le=1.0)
    """Fraction of the task vector kept (TIES/DARE/DELLA/Breadcrumbs/top-k)."""
    gamma: float = Field(0.01, ge=0.0, le=1.0)
    """Breadcrumbs: fraction of the largest-magnitude entries removed as outliers."""
    epsilon: float = Field(0.15, ge=0.0, le=1.0)
    """DELLA: spread of keep probabilities around `density` by magnitude rank."""


class GroupRule(_Frozen):
    """Merge settings for one group of tensors (a set of layers x a set of module kinds)."""

    layers: list[Union[int, Section]] | None = None
    """Layer indices and/or sections; None selects every tensor."""
    kinds: list[ModuleKind] | None = None
    """Module kinds; None selects every kind."""
    method: str
    """Registered method name (see `evomerge.merge.METHODS`)."""
    experts: dict[str, ExpertParams]
    """Expert name -> coefficients. Experts not listed do not take part in this group."""
    t: float | None = None
    """Interpolation factor for slerp / nuslerp."""

    def matches(self, layer: int | Section | None, kind: ModuleKind) -> bool:
        """Whether this rule selects a tensor at `layer` (None = no layer, e.g. rotary buffers) of `kind`."""
        if self.kinds is not None and kind not in self.kinds:
            return False
        return self.layers is None or layer in self.layers


class MergeRecipe(_Frozen):
    """A complete, reproducible merge: rules plus global options."""

    rules: list[GroupRule]
    normalize: bool = True
    """Divide by the sum of weights (mergekit's `normalize`) where the method supports it."""
    lambda_: float = Field(1.0, alias="lambda")
    """Global scale of the merged task vector (mergekit's `lambda`)."""
    rescale: RescalePolicy = "mergekit"
    draws: DrawPolicy = "fast"
    """How DARE/DELLA draw their masks (see `DrawPolicy`); a recipe reproduces only with the same choice."""
    pruning: PruningPolicy = "exact"
    """Magnitude pruning of ties, breadcrumbs*, topk (see `PruningPolicy`)."""
    lora_mode: LoraMode = "materialized"
    seed: int = 0
    """Run seed; with `trial` and the tensor name it seeds every random mask."""
    trial: int = 0

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("rules")
    @classmethod
    def _at_least_one_rule(cls, rules: list[GroupRule]) -> list[GroupRule]:
        if not rules:
            raise ValueError("a recipe needs at least one rule")
        return rules

    @model_validator(mode="after")
    def _no_ignored_options(self) -> "MergeRecipe":
        """Refuse options a rule's method would silently ignore (lambda for linear, t for ties, ...):
        a recipe that says more than it does misleads whoever reads or exports it."""
        problem = ignored_option(self)
        if problem:
            raise ValueError(problem)
        return self

    def rule_for(self, layer: int | Section | None, kind: ModuleKind) -> GroupRule | None:
        """The rule that governs a tensor: the last matching one, or None (keep the base)."""
        for rule in reversed(self.rules):
            if rule.matches(layer, kind):
                return rule
        return None

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_dict(cls, data: object) -> "MergeRecipe":
        """Validate plain data; a bad field raises a one-line `MergeError` naming rule and expert."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise MergeError(describe_validation_error(exc)) from None

    @classmethod
    def from_json(cls, text: str) -> "MergeRecipe":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MergeError(f"recipe is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data)


_DEFAULTS = ExpertParams()


def ignored_option(recipe: MergeRecipe) -> str | None:
    """The first option some rule's method ignores, as one line naming it and the fix; None if none.

    Checked: recipe `lambda` != 1 and `rescale: paper`, a rule's `t`, and per expert a `weight`,
    `density`, `gamma` or `epsilon` that differs from its default. Unknown methods are left to the
    engine's own check (it names the registered ones)."""
    from .methods import METHODS  # lazily: methods import this module

    for index, rule in enumerate(recipe.rules):
        method = METHODS.get(rule.method)
        if method is None:
            continue
        uses = method.uses
        where = f"rules[{index}] method {rule.method!r}"
        if recipe.lambda_ != 1.0 and "lambda" not in uses:
            return f"{where} ignores lambda={recipe.lambda_}; remove lambda or use a method that scales (task_arithmetic, ties, ...)"
        if recipe.rescale == "paper" and "rescale" not in uses and not _any_uses(recipe, "rescale"):
            return f"{where} ignores rescale='paper' (only DARE/DELLA rescale); remove rescale"
        if rule.t is not None and "t" not in uses:
            return f"{where} ignores t={rule.t}; remove t (only slerp and nuslerp read it)"
        for expert, params in rule.experts.items():
            for field in ("weight", "density", "gamma", "epsilon"):
                value = getattr(params, field)
                if field not in uses and value != getattr(_DEFAULTS, field):
                    return f"{where} expert {expert!r} ignores {field}={value}; remove it (the method reads {_listed(uses)})"
    return None


def _any_uses(recipe: MergeRecipe, option: str) -> bool:
    from .methods import METHODS

    return any(option in METHODS[r.method].uses for r in recipe.rules if r.method in METHODS)


def _listed(uses: frozenset[str]) -> str:
    fields = sorted(uses & {"weight", "density", "gamma", "epsilon", "t"})
    return ", ".join(fields) if fields else "no per-expert value"


def describe_validation_error(exc: ValidationError) -> str:
    """pydantic's first error as one line: `rules[0] expert 'math' density=1.5: <why>`."""
    error = exc.errors()[0]
    loc = list(error["loc"])
    where: list[str] = []
    while loc:
        part = loc.pop(0)
        if part == "rules" and loc and isinstance(loc[0], int):
            where.append(f"rules[{loc.pop(0)}]")
        elif part == "experts" and loc:
            where.append(f"expert {loc.pop(0)!r}")
        else:
            where.append(str(part))
    field = " ".join(where) or "recipe"
    value = error.get("input")
    shown = f"={value!r}" if not isinstance(value, (dict, list)) and error["type"] != "missing" else ""
    more = f" (and {exc.error_count() - 1} more error(s))" if exc.error_count() > 1 else ""
    return f"recipe {field}{shown}: {error['msg']}{more}"
