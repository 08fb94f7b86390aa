"""Compatibility check between the base and each expert, run once before any search.

A search that merges mismatched checkpoints would fail on its first trial or, worse, merge
garbage; checking architecture, tensor names and shapes up front turns that into one error that
names the model, the tensor and both shapes. Vocabulary-size differences (added tokens) are the
one mismatch with a documented way out: `vocab_policy="truncate"`.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from ._errors import MergeError
from ._layout import LAYER_PATTERN, classify_kind, config_num_layers

VocabPolicy = Literal["error", "truncate"]
VOCAB_POLICIES: tuple[str, ...] = ("error", "truncate")


def check_architecture(base: Mapping[str, Any], expert: Mapping[str, Any], label: str) -> None:
    """Same `model_type` and `architectures`, else a `MergeError` naming both."""
    for key in ("model_type", "architectures"):
        if base.get(key) != expert.get(key):
            raise MergeError(f"{label}: {key} {expert.get(key)!r} differs from the base's {base.get(key)!r}; experts must share the base architecture")


def check_tensors(
    base: Mapping[str, tuple[int, ...]], expert: Mapping[str, tuple[int, ...]], label: str, vocab_policy: VocabPolicy,
) -> set[str]:
    """Same names and shapes; returns the vocabulary tensors whose rows the policy will align.

    Rows are the first dimension of embedding/head tensors; every other dimension must agree.
    """
    if vocab_policy not in VOCAB_POLICIES:
        raise MergeError(f"vocab_policy {vocab_policy!r} is unknown; use one of {', '.join(VOCAB_POLICIES)}")
    missing = sorted(set(base) - set(expert))
    if missing:
        raise MergeError(f"{label} lacks {len(missing)} base tensor(s), first {missing[0]}; experts must have the base's tensor names")
    extra = sorted(set(expert) - set(base))
    if extra:
        raise MergeError(f"{label} has {len(extra)} tensor(s) the base lacks, first {extra[0]}; experts must have the base's tensor names")
    aligned: set[str] = set()
    for name, shape in base.items():
        other = expert[name]
        if other == shape:
            continue
        vocab = classify_kind(name) in ("embedding", "head") and other[1:] == shape[1:]
        if vocab and vocab_policy == "truncate":
            aligned.add(name)
            continue
        hint = " (vocabulary sizes differ: pass vocab_policy='truncate' to use the base's rows)" if vocab else ""
        raise MergeError(f"shape mismatch: {label} tensor {name} has shape {tuple(other)}, base has {tuple(shape)}{hint}")
    return aligned


def _config_int(config: Mapping[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    text = config.get("text_config")
    return _config_int(text, keys) if isinstance(text, Mapping) else None


def check_config_weights(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], label: str) -> None:
    """config.json must describe the weights beside it: layer count, hidden size, vocabulary.

    The live model is built from the *base* config and every expert's weights are read by name,
    so a config that disagrees with its weights (a config copied from a larger sibling, a
    truncated re-save) would otherwise run a whole search on a model that is not what it claims.
    """
    layers = [int(m.group(1)) for m in (LAYER_PATTERN.search(n) for n in shapes) if m is not None]
    found = max(layers) + 1 if layers else 0
    declared = config_num_layers(config)
    if declared is not None and layers and found != declared:
        raise MergeError(
            f"{label}: config.json declares {declared} layers (num_hidden_layers) but its weights hold {found}; "
            "fix config.json or re-save the model with save_pretrained"
        )
    embeddings = [s for n, s in shapes.items() if n.endswith(("embed_tokens.weight", "wte.weight")) and len(s) == 2]
    if not embeddings:
        return
    rows, width = embeddings[0]
    hidden = _config_int(config, ("hidden_size", "n_embd", "d_model"))
    if hidden is not None and width != hidden:
        raise MergeError(
            f"{label}: config.json declares hidden_size {hidden} but its embedding is {rows}x{width}; "
            "fix config.json or re-save the model with save_pretrained"
        )
    vocab = _config_int(config, ("vocab_size",))
    if vocab is not None and rows != vocab:
        raise MergeError(
            f"{label}: config.json declares vocab_size {vocab} but its embedding has {rows} rows; "
            "fix config.json (resize_token_embeddings updates both) or re-save the model"
        )
