"""`SearchSpace`: a merge recipe template as a flat, bounded genome, and back.

Optimizers see only a vector ``x`` with box bounds; everything about layers, module kinds, experts
and methods lives here, so any optimizer (nevergrad, optuna, a grid) explores any space. This is
nevergrad's split between parametrization and optimizer; the space is pure (no torch), so it can be
rebuilt from the ledger's metadata on any machine.

The structure (layer groups, module groups, sections, cells, smoothing, held parameters, parameter
names) and the method choice (``methods``: a categorical ``method`` parameter, every other one
conditional on it, drawn define-by-run and refused by box optimizers) are described in
docs/search.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Protocol, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from evomerge.merge import ExpertParams, GroupRule, MergeRecipe

ParamKind = Literal["weight", "density", "t", "gamma", "epsilon"]
PARAM_KINDS: tuple[ParamKind, ...] = ("weight", "density", "t", "gamma", "epsilon")
_PARAM_NAME = re.compile(r"^[^.\[\]]+(\.[^.\[\]]+)*\.(weight|density|t|gamma|epsilon)(\[[^\]]+\])?$")
"""A parameter name: ``<group>[.<module>].<kind>[expert]``."""
PER_EXPERT_KINDS: tuple[ParamKind, ...] = ("weight", "density", "gamma", "epsilon")
"""Kinds with one value per expert; ``t`` is one value per cell."""

ALL_MODULE_KINDS: tuple[str, ...] = ("attention", "mlp", "norm", "embedding", "head", "other")
SPLIT_MODULES: tuple[tuple[str, ...], ...] = (("attention",), ("mlp",), ("norm",), ("embedding", "head", "other"))

SIGN_AWARE = (-1.5, 1.5)
"""Weights of task-vector methods may be negative (subtracting a skill) and above 1 (amplifying)."""

METHOD_KINDS: dict[str, tuple[ParamKind, ...]] = {
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "dare_linear": ("weight", "density"),
    "breadcrumbs": ("weight", "density"),
    "breadcrumbs_ties": ("weight", "density"),
    "della": ("weight", "density"),
    "della_linear": ("weight", "density"),
    "slerp": ("t",),
    "nuslerp": ("weight",),
    "model_stock": (),
    "topk": ("weight", "density"),
}
"""Kinds a method reads, searched by default. A method not listed needs ``params`` in the template."""

DEFAULT_BOUNDS: dict[ParamKind, tuple[float, float, float]] = {
    "weight": (SIGN_AWARE[0], SIGN_AWARE[1], 0.5),
    "density": (0.05, 1.0, 0.5),
    "t": (0.0, 1.0, 0.5),
    "gamma": (0.0, 0.2, 0.01),
    "epsilon": (0.0, 0.3, 0.15),
}
"""(low, high, init) per kind. Density starts at 0.05: density 0 drops the whole task vector."""

CHOICE_EXTRA_KINDS: dict[str, tuple[ParamKind, ...]] = {
    "della": ("epsilon",),
    "della_linear": ("epsilon",),
    "breadcrumbs": ("gamma",),
    "breadcrumbs_ties": ("gamma",),
}
"""Kinds a method reads beyond `METHOD_KINDS`, searched when the method is one choice among several
(a single-method space searches them only when ``params`` names them)."""

CHOICE_METHODS: tuple[str, ...] = (
    "task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties",
)
"""Methods ``methods`` may list: task-vector methods whose weights share one range (`SIGN_AWARE`),
so one weight parameter means the same under each of them."""

CONVEX_METHODS = ("linear", "nuslerp")
"""Methods whose weights are mixing proportions: their default weight bounds are [0, 1]."""

LEGAL_RANGE: dict[ParamKind, tuple[float, float]] = {
    "density": (0.0, 1.0),
    "t": (0.0, 1.0),
    "gamma": (0.0, 1.0),
    "epsilon": (0.0, 1.0),
}
"""What `ExpertParams` accepts; bounds outside these would decode to invalid recipes."""

EPSILON_SHARE = 0.99
"""DELLA's keep probabilities span ``density ± epsilon`` and must stay inside (0, 1), a constraint
between two parameters that a box cannot express; decoding caps epsilon at this share of the
distance from density to the nearer end (`feasible_epsilon`), so no drawn genome is an invalid
recipe and no evaluation is lost to one."""


def feasible_epsilon(density: float, epsilon: float) -> float:
    """``epsilon`` capped so that ``density ± epsilon`` stays inside (0, 1) (`EPSILON_SHARE`);
    unchanged where DELLA draws nothing (density 0 or 1) or where it already fits. Idempotent, so
    an encoded recipe decodes to itself."""
    if not 0.0 < density < 1.0:
        return epsilon
    return min(epsilon, EPSILON_SHARE * min(density, 1.0 - density))


class SlotLike(Protocol):
    layer: int | str | None
    kind: str


class LayoutLike(Protocol):
    """What the space needs from `evomerge.merge.ModelLayout`."""

    num_layers: int
    slots: Mapping[str, SlotLike]


def choice_kinds(method: str, params: Sequence[ParamKind] | None = None) -> tuple[ParamKind, ...]:
    """Kinds ``method`` searches as one choice of a method choice: its defaults and extras, or of
    ``params`` (the template's kinds) those it reads; the engine refuses options a method ignores."""
    reads = METHOD_KINDS[method] + CHOICE_EXTRA_KINDS.get(method, ())
    return reads if params is None else tuple(k for k in params if k in reads)


class SpaceTemplate(BaseModel):
    """What to search: the method (or a choice of methods), which parameter kinds, their bounds,
    and the group structure."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    method: str
    """The method; with ``methods``, the first trial's (default: the first listed)."""
    methods: list[str] | None = None
    """Methods to choose from (a categorical parameter ``method``, module docstring); None: ``method`` only."""
    params: list[ParamKind] | None = None
    """Searched kinds; None = the method's defaults (`METHOD_KINDS`)."""
    bounds: dict[ParamKind, tuple[float, float]] = Field(default_factory=dict)
    """(low, high) per kind, overriding `DEFAULT_BOUNDS`."""
    init: dict[str, float] = Field(default_factory=dict)
    """Starting value (the genome's ``x0``) per kind, or per parameter name (e.g. a fitted mergekit
    config, `SearchSpace.fit`), overriding the default; a name wins over its kind."""
    fixed: dict[str, float] = Field(default_factory=dict)
    """Held values, keyed by kind (``"density"``) or by parameter name; excluded from the genome."""
    granularity: Union[Literal["global", "layer"], PositiveInt] = "global"
    modules: Union[Literal["all", "split"], list[list[str]]] = "all"
    sections: Literal["attach", "group"] = "attach"
    smoothing: int | None = None
    """Number of control points per parameter across layer groups (>= 2), or None."""
    normalize: bool = True
    lambda_: float = Field(1.0, alias="lambda")
    rescale: Literal["mergekit", "paper"] = "mergekit"
    draws: Literal["fast", "mergekit"] = "fast"
    """DARE/DELLA masks: counter-based (fast) or mergekit's torch.bernoulli stream (parity checks)."""
    pruning: Literal["exact", "approximate"] = "exact"
    """Magnitude pruning: mergekit's entries exactly, or approximate thresholds (docs/merge-methods.md)."""
    lora_mode: Literal["materialized", "adapter"] = "materialized"

    @field_validator("modules")
    @classmethod
    def _known_kinds(cls, modules: Any) -> Any:
        if isinstance(modules, list):
            seen = [k for group in modules for k in group]
            unknown = sorted(set(seen) - set(ALL_MODULE_KINDS))
            if unknown:
                raise ValueError(f"unknown module kinds {unknown}; allowed: {list(ALL_MODULE_KINDS)}")
            if len(seen) != len(set(seen)) or any(not g for g in modules):
                raise ValueError("module groups must be non-empty and disjoint")
        return modules

    @model_validator(mode="before")
    @classmethod
    def _start_method(cls, data: Any) -> Any:
        """With ``methods`` and no ``method``, the first listed method starts."""
        if isinstance(data, dict) and data.get("methods") and "method" not in data:
            return {**data, "method": data["methods"][0]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "SpaceTemplate":
        if self.methods is not None:
            bad = [m for m in self.methods if m not in CHOICE_METHODS]
            if bad:
                raise ValueError(f"methods: {bad} cannot be chosen among others; choose from {', '.join(CHOICE_METHODS)}")
            if len(self.methods) < 2 or len(set(self.methods)) != len(self.methods):
                raise ValueError(f"methods: {self.methods} must list two or more distinct methods (one method: set `method`)")
            if self.method not in self.methods:
                raise ValueError(f"method {self.method!r} (the first trial's) is not one of methods {self.methods}")
        elif self.params is None and self.method not in METHOD_KINDS:
            raise ValueError(f"method {self.method!r} has no default parameter kinds; set `params`")
        elif self.params is not None and self.method in METHOD_KINDS:
            reads = METHOD_KINDS[self.method] + CHOICE_EXTRA_KINDS.get(self.method, ())
            ignored = [k for k in self.params if k not in reads]
            if ignored:  # the engine would refuse every recipe, at the first trial that sets it
                raise ValueError(f"params: method {self.method!r} does not read {', '.join(ignored)}; "
                                 f"remove it (it reads {', '.join(reads) or 'no parameter'})")
        searched = self.searched_kinds
        for key, value in self.fixed.items():
            if key in PARAM_KINDS and key not in searched:  # a held kind replaces a searched one; alone it would be ignored
                raise ValueError(f"fixed: {key!r} is not among the searched kinds ({', '.join(searched)}); "
                                 f"add it to params as well (fixed holds it out of the genome)")
            legal = LEGAL_RANGE.get(kind_of(key))  # type: ignore[arg-type]
            if legal is not None and not legal[0] <= value <= legal[1]:
                raise ValueError(f"fixed: {key} {value} must lie in {list(legal)}")
        # an unsearched kind the method reads is held at its init (clipped to its bounds); one no
        # method here reads is a typo or a stale line, not a request
        reads = set(searched).union(*(choice_kinds(m) for m in self.methods or [self.method] if m in METHOD_KINDS))
        for field, keys in (("bounds", self.bounds), ("init", self.init)):
            unread = [k for k in keys if k in PARAM_KINDS and k not in reads]
            if unread:
                raise ValueError(f"{field}: {', '.join(map(repr, unread))} is read by no method of this space "
                                 f"(they read {', '.join(sorted(reads)) or 'nothing'}); remove it")
        for kind, (low, high) in self.bounds.items():
            legal = LEGAL_RANGE.get(kind)
            if not low < high:
                raise ValueError(f"bounds for {kind!r}: low {low} must be below high {high}")
            if legal is not None and (low < legal[0] or high > legal[1]):
                raise ValueError(f"bounds for {kind!r} must lie in {list(legal)}, got {[low, high]}")
        if self.smoothing is not None:
            if self.smoothing < 2:
                raise ValueError("smoothing needs at least 2 control points")
            if self.granularity == "global":
                raise ValueError("smoothing interpolates across layer groups; granularity 'global' has one")
        return self

    @property
    def searched_kinds(self) -> tuple[ParamKind, ...]:
        if self.methods is not None:
            return choice_kinds(self.method, self.params)
        return tuple(self.params) if self.params is not None else METHOD_KINDS[self.method]

    def for_method(self, method: str) -> "SpaceTemplate":
        """The single-method template of one choice: its kinds, and the ``init``/``fixed`` entries
        (by kind or by name) of the kinds it reads."""
        kinds = choice_kinds(method, self.params)
        keep = lambda d: {k: v for k, v in d.items() if kind_of(k) in kinds}  # noqa: E731
        return self.model_copy(update={
            "method": method, "methods": None, "params": list(kinds), "init": keep(self.init), "fixed": keep(self.fixed),
        })

    def kind_bounds(self, kind: ParamKind) -> tuple[float, float, float]:
        """(low, high, init) of a kind after the template's overrides."""
        low, high, init = DEFAULT_BOUNDS[kind]
        if kind == "weight" and self.method in CONVEX_METHODS:
            low, high, init = 0.0, 1.0, 0.5
        if kind in self.bounds:
            low, high = self.bounds[kind]
        init = float(np.clip(self.init.get(kind, init), low, high))
        return low, high, init

    @field_validator("init")
    @classmethod
    def _init_keys(cls, init: dict[str, float]) -> dict[str, float]:
        bad = [k for k in init if k not in PARAM_KINDS and not _PARAM_NAME.match(k)]
        if bad:
            raise ValueError(f"init keys are kinds ({', '.join(PARAM_KINDS)}) or parameter names; got {bad}")
        return init


@dataclass(frozen=True)
class _Cell:
    """One rule of the decoded recipe: a layer group x a module group."""

    label: str
    layers: tuple[Union[int, str], ...]
    kinds: tuple[str, ...] | None  # None: every kind
    slots: tuple[tuple[Union[int, str], str], ...]  # (layer, kind) of the tensors it covers
    module: str  # module-group label ("" when modules="all")
    position: float | None  # index of its layer group for smoothing; None for the section group


@dataclass(frozen=True)
class _Param:
    name: str
    kind: ParamKind
    low: float
    high: float
    init: float


class SearchSpace:
    """Genome <-> `MergeRecipe` for one template, layout and expert list.

    >>> space = SearchSpace(engine.layout, engine.expert_names, SpaceTemplate(method="ties", granularity=2))
    >>> recipe = space.decode(space.x0, seed=0, trial=0)
    >>> np.allclose(space.encode(recipe), space.x0)
    True
    """

    def __init__(self, layout: LayoutLike, experts: Sequence[str], template: SpaceTemplate) -> None:
        if not experts:
            raise ValueError("a search space needs at least one expert")
        self.layout = layout
        self.experts: tuple[str, ...] = tuple(experts)
        self.template = template
        self._subs = {m: SearchSpace(layout, experts, template.for_method(m)) for m in template.methods or ()}
        if self._subs:
            _refuse_unknown_names(template, {p.name for sub in self._subs.values() for p in sub._all_params})
            return
        self._cells = self._build_cells()
        if not self._cells:
            raise ValueError("the layout has no tensors to merge")
        self._all_params, self._terms = self._build_params()
        self._held = self._held_values()
        self._free = [i for i, p in enumerate(self._all_params) if p.name not in self._held]
        self._free_params = [self._all_params[i] for i in self._free]

    # ----------------------------------------------------------------- structure
    def _layer_groups(self) -> list[tuple[str, list[Union[int, str]]]]:
        n = self.layout.num_layers
        g = self.template.granularity
        if g == "global":
            groups: list[tuple[str, list[Union[int, str]]]] = [("all", list(range(n)))]
        else:
            k = 1 if g == "layer" else int(g)
            groups = []
            for start in range(0, n, k):
                stop = min(start + k, n) - 1
                label = f"L{start}" if stop == start else f"L{start}-{stop}"
                groups.append((label, list(range(start, stop + 1))))
        present = {s.layer for s in self.layout.slots.values() if isinstance(s.layer, str)}
        sections = [s for s in ("embed", "final_norm", "head") if s in present]
        if sections and (self.template.sections == "group" or not groups):
            groups.append(("S", list(sections)))
        else:  # attached: embed to the first layer group, final_norm and head to the last
            for section in sections:
                (groups[0] if section == "embed" else groups[-1])[1].append(section)
        return groups

    def _module_groups(self) -> list[tuple[str, tuple[str, ...] | None]]:
        modules = self.template.modules
        if modules == "all":
            return [("", None)]
        lists = [list(g) for g in (SPLIT_MODULES if modules == "split" else modules)]
        named = {k for g in lists for k in g}
        lists[-1].extend(k for k in ALL_MODULE_KINDS if k not in named)
        return [("+".join(g), tuple(g)) for g in lists]

    def _build_cells(self) -> list[_Cell]:
        slots = {(s.layer, s.kind) for s in self.layout.slots.values() if s.layer is not None}
        cells = []
        layer_groups = self._layer_groups()
        n_positional = sum(1 for label, _ in layer_groups if label != "S")
        for gi, (label, layers) in enumerate(layer_groups):
            layer_set = set(layers)
            for module, kinds in self._module_groups():
                covered = tuple(
                    sorted(
                        ((lay, kind) for lay, kind in slots if lay in layer_set and (kinds is None or kind in kinds)),
                        key=lambda lk: (str(type(lk[0])), lk[0], lk[1]),
                    )
                )
                if not covered:
                    continue
                position = float(gi) if label != "S" and n_positional > 1 else (0.0 if label != "S" else None)
                cells.append(_Cell(label, tuple(layers), kinds, covered, module, position))
        return cells

    def _param_name(self, group_label: str, module: str, kind: ParamKind, expert: str | None) -> str:
        parts = [group_label] + ([module] if module else []) + [kind]
        return ".".join(parts) + (f"[{expert}]" if expert is not None else "")

    def _build_params(self) -> tuple[list[_Param], dict[tuple[int, ParamKind, str | None], list[tuple[int, float]]]]:
        """All parameters (held ones included) and, per (cell, kind, expert), its linear recipe
        ``value = sum(coef * param)`` (one term, or two under smoothing)."""
        params: list[_Param] = []
        index: dict[str, int] = {}
        terms: dict[tuple[int, ParamKind, str | None], list[tuple[int, float]]] = {}
        n_cp = self.template.smoothing
        n_groups = len({c.label for c in self._cells if c.position is not None})
        if n_cp is not None and n_cp > n_groups:
            raise ValueError(f"smoothing={n_cp} control points exceed the {n_groups} layer groups")
        # control points spread over the layer groups where each module group has tensors
        ranks: dict[str, dict[float, int]] = {}
        for cell in self._cells:
            if cell.position is not None:
                ranks.setdefault(cell.module, {})[cell.position] = 0
        for module, positions in ranks.items():
            ranks[module] = {pos: r for r, pos in enumerate(sorted(positions))}

        def param(name: str, kind: ParamKind) -> int:
            if name not in index:
                low, high, init = self.template.kind_bounds(kind)
                init = float(np.clip(self.template.init.get(name, init), low, high))
                index[name] = len(params)
                params.append(_Param(name, kind, low, high, init))
            return index[name]

        for ci, cell in enumerate(self._cells):
            rank = ranks.get(cell.module, {})
            smooth = n_cp is not None and cell.position is not None and len(rank) >= n_cp
            for kind in self.template.searched_kinds:
                for expert in self.experts if kind in PER_EXPERT_KINDS else (None,):
                    if not smooth:
                        terms[(ci, kind, expert)] = [(param(self._param_name(cell.label, cell.module, kind, expert), kind), 1.0)]
                        continue
                    assert n_cp is not None and cell.position is not None
                    u = rank[cell.position] * (n_cp - 1) / max(len(rank) - 1, 1)
                    lo = min(int(np.floor(u)), n_cp - 2)
                    frac = u - lo
                    names = [self._param_name(f"cp{c}", cell.module, kind, expert) for c in (lo, lo + 1)]
                    terms[(ci, kind, expert)] = [(param(names[0], kind), 1.0 - frac), (param(names[1], kind), frac)]
        return params, terms

    def _held_values(self) -> dict[str, float]:
        fixed = self.template.fixed
        _refuse_unknown_names(self.template, {p.name for p in self._all_params})
        held = {}
        for p in self._all_params:
            if p.name in fixed:
                held[p.name] = float(fixed[p.name])
            elif p.kind in fixed:
                held[p.name] = float(fixed[p.kind])
        return held

    # ----------------------------------------------------------------- method choice
    @property
    def categorical(self) -> bool:
        """Whether the method is a searched choice (``template.methods``): then there is no flat
        genome, and trials carry define-by-run params (`decode_params`)."""
        return bool(self._subs)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods trials may use."""
        return tuple(self._subs) if self._subs else (self.template.method,)

    def sub(self, method: str) -> "SearchSpace":
        """The single-method space of one choice (this space itself when there is no choice)."""
        if not self._subs and method == self.template.method:
            return self
        if method not in self._subs:
            raise ValueError(f"method {method!r} is not one of this space's methods {list(self.methods)}")
        return self._subs[method]

    def start_params(self) -> dict[str, Any]:
        """The first trial's params: the starting genome, with ``method`` (the template's) under a choice."""
        if not self._subs:
            return self.describe(self.x0)
        start = self._subs[self.template.method]
        return {"method": self.template.method, **start.describe(start.x0)}

    def decode_params(self, params: Mapping[str, Any], *, seed: int = 0, trial: int = 0) -> MergeRecipe:
        """The recipe of a trial's params (as optuna stores them): the genome's names, plus under a
        choice ``method`` and only the parameters of that method, so the ledger alone rebuilds it."""
        if not self._subs:
            return self.decode(self.from_params(params), seed=seed, trial=trial)
        method = params.get("method")
        if not isinstance(method, str) or method not in self._subs:
            raise ValueError(f"params' method {method!r} is not one of {list(self._subs)}")
        sub = self._subs[method]
        foreign = sorted(set(params) - {"method"} - set(sub.names))
        if foreign:
            raise ValueError(f"params {foreign[:3]} are not parameters of method {method!r}")
        return sub.decode(sub.from_params(params), seed=seed, trial=trial)

    def _flat(self, what: str) -> None:
        if self._subs:
            raise ValueError(f"{what}: a space choosing among methods {list(self._subs)} has no flat genome; "
                             "its trials are params (`decode_params`), drawn by samplers that handle categorical choices")

    # ----------------------------------------------------------------- public view
    @property
    def dim(self) -> int:
        """Length of the genome (under a method choice: ``method`` and every method's parameters)."""
        return len(self.names) if self._subs else len(self._free)

    @property
    def names(self) -> list[str]:
        """Human-readable name of each genome coordinate (under a method choice: ``method`` and
        each parameter some method reads, once)."""
        if self._subs:
            return list(dict.fromkeys(["method", *(n for sub in self._subs.values() for n in sub.names)]))
        return [p.name for p in self._free_params]

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) arrays of the genome's box."""
        self._flat("bounds")
        return (np.array([p.low for p in self._free_params]), np.array([p.high for p in self._free_params]))

    @property
    def x0(self) -> np.ndarray:
        """Starting genome (the template's or the method's initial values)."""
        self._flat("x0")
        return np.array([p.init for p in self._free_params])

    @property
    def held(self) -> dict[str, float]:
        """Parameters held fixed (name -> value), not part of the genome."""
        if self._subs:
            return {k: v for sub in self._subs.values() for k, v in sub.held.items()}
        return dict(self._held)

    def fingerprint(self) -> str:
        """Short hash of everything that gives genome coordinates their meaning; the ledger keeps
        it so a resume with a different space fails loudly instead of mixing incompatible trials."""
        payload: dict[str, Any] = {"template": self.template.model_dump(mode="json", by_alias=True)}
        if self._subs:
            payload["methods"] = {m: sub.fingerprint() for m, sub in self._subs.items()}
        else:
            payload["experts"] = list(self.experts)
            payload["names"] = [p.name for p in self._all_params]
            payload["cells"] = [(c.label, list(map(str, c.layers)), c.kinds) for c in self._cells]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (template, experts, names, bounds) for the ledger and exports;
        under a method choice, each method's under ``methods``."""
        out: dict[str, Any] = {
            "template": self.template.model_dump(mode="json", by_alias=True), "experts": list(self.experts), "names": self.names,
        }
        if self._subs:
            out["methods"] = {m: {k: v for k, v in sub.to_dict().items() if k not in ("template", "experts")}
                              for m, sub in self._subs.items()}
        else:
            low, high = self.bounds
            out["low"], out["high"] = low.tolist(), high.tolist()
        return {**out, "held": self.held, "fingerprint": self.fingerprint()}

    # ----------------------------------------------------------------- genome <-> recipe
    def _full(self, x: Sequence[float]) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise ValueError(f"genome has shape {x.shape}, expected ({self.dim},)")
        if not np.all(np.isfinite(x)):
            raise ValueError("genome has non-finite values")
        low, high = self.bounds
        full = np.array([p.init for p in self._all_params])
        full[self._free] = np.clip(x, low, high)  # optimizers may step a hair outside the box
        for i, p in enumerate(self._all_params):
            if p.name in self._held:
                full[i] = self._held[p.name]
        return full

    def _value(self, full: np.ndarray, key: tuple[int, ParamKind, str | None]) -> float:
        return float(sum(coef * full[i] for i, coef in self._terms[key]))

    def decode(self, x: Sequence[float], *, seed: int = 0, trial: int = 0) -> MergeRecipe:
        """The recipe a genome stands for; ``seed`` and ``trial`` seed its random masks."""
        self._flat("decode")
        full = self._full(x)
        kinds = self.template.searched_kinds
        covers_all = len(self._cells) == 1
        rules = []
        for ci, cell in enumerate(self._cells):
            experts = {}
            for expert in self.experts:
                values = {k: self._value(full, (ci, k, expert)) for k in kinds if k in PER_EXPERT_KINDS}
                if "epsilon" in values:
                    values["epsilon"] = feasible_epsilon(values.get("density", ExpertParams().density), values["epsilon"])
                experts[expert] = ExpertParams(**values)
            t = self._value(full, (ci, "t", None)) if "t" in kinds else None
            rules.append(GroupRule(
                layers=None if covers_all else list(cell.layers), kinds=None if cell.kinds is None else list(cell.kinds),
                method=self.template.method, experts=experts, t=t,
            ))
        tpl = self.template
        return MergeRecipe(
            rules=rules, normalize=tpl.normalize, lambda_=tpl.lambda_, rescale=tpl.rescale,
            draws=tpl.draws, pruning=tpl.pruning, lora_mode=tpl.lora_mode, seed=seed, trial=trial,
        )

    def encode(self, recipe: MergeRecipe, *, atol: float = 1e-9) -> np.ndarray:
        """The genome of a recipe this space can express, whatever its rule layout (each tensor
        slot's values read through `MergeRecipe.rule_for`; docs/search.md); ValueError otherwise."""
        if self._subs:  # the genome of the recipe's method's space
            methods = {rule.method for rule in recipe.rules}
            if len(methods) != 1:
                raise ValueError(f"recipe merges with {sorted(methods)}: a method choice encodes one method per recipe")
            return self.sub(methods.pop()).encode(recipe, atol=atol)
        tpl = self.template
        for field_name in ("normalize", "lambda_", "rescale", "draws", "pruning", "lora_mode"):
            if getattr(recipe, field_name) != getattr(tpl, field_name):
                raise ValueError(f"recipe {field_name}={getattr(recipe, field_name)!r} differs from the template's")
        cell_values: dict[tuple[int, ParamKind, str | None], float] = {}
        for ci, cell in enumerate(self._cells):
            for layer, kind in cell.slots:
                rule = recipe.rule_for(layer, kind)  # type: ignore[arg-type]
                if rule is None or rule.method != tpl.method:
                    raise ValueError(f"tensor slot ({layer}, {kind}) is not merged with {tpl.method!r}")
                for k in tpl.searched_kinds:
                    for expert in self.experts if k in PER_EXPERT_KINDS else (None,):
                        if expert is not None:
                            if expert not in rule.experts:
                                raise ValueError(f"expert {expert!r} missing at ({layer}, {kind})")
                            value = float(getattr(rule.experts[expert], k))
                        else:
                            if rule.t is None:
                                raise ValueError(f"rule at ({layer}, {kind}) has no t")
                            value = float(rule.t)
                        key = (ci, k, expert)
                        if key in cell_values and abs(cell_values[key] - value) > atol:
                            raise ValueError(f"{k} differs inside cell {cell.label}.{cell.module}: not expressible")
                        cell_values[key] = value
        full, residual = self._lstsq(cell_values)
        if residual > 1e-6:
            raise ValueError("per-layer values do not lie on the space's piecewise-linear curves: not expressible")
        for i, p in enumerate(self._all_params):
            if p.name in self._held and abs(full[i] - self._held[p.name]) > 1e-6:
                raise ValueError(f"{p.name} = {full[i]} but the space holds it at {self._held[p.name]}")
            if not p.low - 1e-9 <= full[i] <= p.high + 1e-9:
                raise ValueError(f"{p.name} = {full[i]} lies outside [{p.low}, {p.high}]")
        low, high = self.bounds
        return np.clip(full[self._free], low, high)

    def fit(self, recipe: MergeRecipe) -> tuple[np.ndarray, list[str]]:
        """The genome nearest to ``recipe``, and notes on what did not fit: for recipes made
        elsewhere (a mergekit config as the search's first point), which `encode` would refuse.
        Per cell and parameter the recipe's values over the cell's tensor slots are averaged (a
        slot no rule merges, or whose rule lacks an expert: weight 0, the base, and the kind's
        starting value otherwise); smoothing curves are fitted by least squares; held values stay;
        the result is clipped to the bounds. Each of these, and a different method or global
        option, gives one note naming the parameters concerned."""
        self._flat("fit")
        tpl = self.template
        notes: list[str] = []
        for field_name in ("normalize", "lambda_", "rescale", "lora_mode"):
            ours, theirs = getattr(tpl, field_name), getattr(recipe, field_name)
            if ours != theirs:
                notes.append(f"{field_name.rstrip('_')}={theirs!r} differs from the space's {ours!r}: the space's is kept")
        samples: dict[tuple[int, ParamKind, str | None], list[float]] = defaultdict(list)
        methods: set[str] = set()
        for ci, cell in enumerate(self._cells):
            for layer, kind in cell.slots:
                rule = recipe.rule_for(layer, kind)  # type: ignore[arg-type]
                if rule is not None:
                    methods.add(rule.method)
                for k in tpl.searched_kinds:
                    for expert in self.experts if k in PER_EXPERT_KINDS else (None,):
                        samples[(ci, k, expert)].append(_rule_value(rule, k, expert, tpl.kind_bounds(k)[2]))
        if methods - {tpl.method}:
            notes.append(f"method {', '.join(sorted(methods - {tpl.method}))} differs from the space's {tpl.method!r}: coefficients carried over")
        averaged = sorted({self._key_label(key) for key, v in samples.items() if max(v) - min(v) > 1e-9})
        if averaged:
            notes.append(f"averaged over layers/modules the space groups together: {_listed(averaged)}")
        full, residual = self._lstsq({key: float(np.mean(v)) for key, v in samples.items()})
        if residual > 1e-6:
            notes.append(f"per-layer values fitted to the smoothing curves by least squares (max error {residual:.3g})")
        for i, p in enumerate(self._all_params):
            if p.name in self._held:
                if abs(full[i] - self._held[p.name]) > 1e-6:
                    notes.append(f"{p.name} = {full[i]:.4g} but the space holds it at {self._held[p.name]:g}")
                full[i] = self._held[p.name]
        genome = full[self._free]
        low, high = self.bounds
        clipped = [f"{n} = {v:.4g} -> {np.clip(v, lo, hi):g}" for n, v, lo, hi in zip(self.names, genome, low, high) if not lo <= v <= hi]
        if clipped:
            notes.append(f"clipped to the bounds: {_listed(clipped)}")
        return np.clip(genome, low, high), notes

    def _key_label(self, key: tuple[int, ParamKind, str | None]) -> str:
        cell = self._cells[key[0]]
        return self._param_name(cell.label, cell.module, key[1], key[2])

    def _lstsq(self, cell_values: Mapping[tuple[int, ParamKind, str | None], float]) -> tuple[np.ndarray, float]:
        """All parameters from per-cell values (least squares under smoothing) and the largest error."""
        n = len(self._all_params)
        rows: list[np.ndarray] = []
        rhs: list[float] = []
        for key, terms in self._terms.items():
            row = np.zeros(n)
            for i, coef in terms:
                row[i] += coef
            rows.append(row)
            rhs.append(cell_values[key])
        a, b = np.array(rows), np.array(rhs)
        full, *_ = np.linalg.lstsq(a, b, rcond=None)
        return full, float(np.max(np.abs(a @ full - b), initial=0.0))

    def describe(self, x: Sequence[float]) -> dict[str, float]:
        """Genome as {name: value}, the form optuna stores as trial params."""
        self._flat("describe")
        return dict(zip(self.names, map(float, x)))

    def from_params(self, params: Mapping[str, float]) -> np.ndarray:
        """Genome from {name: value} (an optuna trial's params)."""
        self._flat("from_params")
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"params lack {missing[:3]}{'...' if len(missing) > 3 else ''}")
        return np.array([float(params[n]) for n in self.names])


def _refuse_unknown_names(template: SpaceTemplate, names: set[str]) -> None:
    """Refuse ``fixed``/``init`` keys that are neither a kind nor one of the space's ``names``."""
    for field_name in ("fixed", "init"):
        unknown = [k for k in getattr(template, field_name) if k not in PARAM_KINDS and k not in names]
        if unknown:
            raise ValueError(f"{field_name}: unknown parameter names {unknown}; see SearchSpace.names")


def kind_of(key: str) -> str:
    """The kind of an ``init``/``fixed`` key: the key itself, or a parameter name's kind."""
    match = _PARAM_NAME.match(key)
    return key if match is None else match.group(2)


def _rule_value(rule: GroupRule | None, kind: ParamKind, expert: str | None, start: float) -> float:
    """A kind's value under ``rule`` for `SearchSpace.fit`: an unmerged slot or an absent expert
    has weight 0 (the base's own weights) and the kind's starting value otherwise."""
    if kind == "t":
        return start if rule is None or rule.t is None else float(rule.t)
    if rule is None or expert not in rule.experts:
        return 0.0 if kind == "weight" else start
    return float(getattr(rule.experts[expert], kind))


def _listed(items: Sequence[str], most: int = 6) -> str:
    """The first ``most`` items and how many more, for one-line notes."""
    return ", ".join(items[:most]) + (f" (+{len(items) - most} more)" if len(items) > most else "")
