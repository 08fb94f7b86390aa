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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._errors import MergeError

ModuleKind = Literal["attention", "mlp", "norm", "embedding", "head", "other"]
"""Module kind of a tensor. `embedding` = input embeddings, `head` = output projection (lm_head)."""

Section = Literal["embed", "final_norm", "head"]
"""Tensors outside the decoder layers; selected in `GroupRule.layers` next to layer indices."""

RescalePolicy = Literal["mergekit", "paper"]
"""DARE rescale after random dropping: mergekit's (restore the tensor's L1 norm) or the paper's (1/density)."""

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
