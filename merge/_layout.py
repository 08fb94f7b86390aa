"""Tensor grouping: which decoder layer and which module kind every tensor belongs to.

Search spaces and recipes address tensors by (layer, kind), never by name, so one recipe fits any
standard decoder architecture. The grouping is derived from parameter names and the config's
layer count, with the architecture knowledge kept as data (`LAYER_PATTERN`, `KIND_PATTERNS`)
rather than a hand-written tensor list per model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Union

from ._recipe import GroupRule, ModuleKind, Section

LayerRef = Union[int, Section, None]

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
"""Where the decoder layer index sits in a tensor name (`model.layers.3.`, `transformer.h.3.`)."""

KIND_PATTERNS: tuple[tuple[ModuleKind, tuple[str, ...]], ...] = (
    # Norms first: `post_attention_layernorm` and `q_norm` are norms, not attention weights.
    ("norm", (r".*norm.*", r"ln(_.*|\d*)")),
    ("embedding", (r"embed_tokens", r"wte", r"wpe", r"word_embeddings", r"tok_embeddings", r"embeddings?")),
    ("head", (r"lm_head", r"embed_out", r"output")),
    ("attention", (
        r"(self_|cross_)?attn", r".*attention.*", r"[qkvo]_proj", r"qkv(_proj)?", r"wqkv", r"w[qkvo]",
        r"c_attn", r"query_key_value", r"out_proj",
    )),
    ("mlp", (
        r"mlp", r"feed_forward", r"ffn", r"(gate|up|down|gate_up)_proj", r"c?_?fc\d*", r"w[123]",
        r"experts?", r"router", r"dense_(h_to_4h|4h_to_h)",
    )),
)
"""Module kind from the name's dotted components, scanned from the most specific (the module
owning the tensor) outwards; the first component that matches any pattern decides. Patterns are
full matches on one component, so `gate_up_proj` (Phi-3) is MLP and `qkv_proj` is attention."""

_COMPILED = tuple((kind, tuple(re.compile(p) for p in pats)) for kind, pats in KIND_PATTERNS)


@dataclass(frozen=True)
class TensorSlot:
    """Where a tensor sits: decoder layer index or section, and module kind."""

    layer: LayerRef
    kind: ModuleKind


def classify_kind(name: str) -> ModuleKind:
    """The module kind of a tensor name (`other` when no keyword matches, e.g. rotary buffers)."""
    components = name.split(".")[:-1] or name.split(".")
    for component in reversed(components):
        if component.isdigit():
            continue
        for kind, patterns in _COMPILED:
            if any(p.fullmatch(component) for p in patterns):
                return kind
    return "other"


def classify(name: str) -> TensorSlot:
    """The slot of one tensor name; tensors outside the layers map to a section or None."""
    kind = classify_kind(name)
    match = LAYER_PATTERN.search(name)
    if match is not None:
        return TensorSlot(int(match.group(1)), kind)
    section: dict[str, Section] = {"embedding": "embed", "norm": "final_norm", "head": "head"}
    return TensorSlot(section.get(kind), kind)


def config_num_layers(config: Mapping[str, object]) -> int | None:
    """The decoder layer count under any of the usual config keys (nested `text_config` too)."""
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = config.get(key)
        if isinstance(value, int):
            return value
    text = config.get("text_config")
    return config_num_layers(text) if isinstance(text, Mapping) else None


@dataclass
class ModelLayout:
    """Per tensor name its slot, plus the model's layer count."""

    num_layers: int
    slots: dict[str, TensorSlot] = field(default_factory=dict)

    @classmethod
    def from_names(cls, names: Iterable[str], config: Mapping[str, object] | None = None) -> "ModelLayout":
        """Group `names`; the layer count comes from the config and must agree with the names."""
        slots = {name: classify(name) for name in names}
        seen = [s.layer for s in slots.values() if isinstance(s.layer, int)]
        found = max(seen) + 1 if seen else 0
        declared = config_num_layers(config or {})
        if declared is not None and found > declared:
            raise ValueError(f"tensor names reach layer {found - 1} but the config declares {declared} layers")
        return cls(num_layers=declared if declared is not None else found, slots=slots)

    @property
    def kinds(self) -> set[ModuleKind]:
        """Module kinds present in this model."""
        return {slot.kind for slot in self.slots.values()}

    def names_for(self, rule: GroupRule) -> list[str]:
        """Tensor names a rule's selectors match (regardless of later rules)."""
        return [n for n, s in self.slots.items() if rule.matches(s.layer, s.kind)]

    def sections(self) -> set[Section]:
        """Sections (embed, final_norm, head) present in this model."""
        return {s.layer for s in self.slots.values() if isinstance(s.layer, str)}  # type: ignore[misc]
