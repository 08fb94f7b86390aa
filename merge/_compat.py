"""Compatibility check between the base and each expert, run once before any search.

A search that merges mismatched checkpoints would fail on its first trial or, worse, merge
garbage; checking architecture, tensor names and shapes up front turns that into one error that
names the model, the tensor and both shapes. Vocabulary-size differences (added tokens) are the
one mismatch with a documented way out: `vocab_policy="truncate"`.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from ._errors import MergeError
from ._layout import classify_kind

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
