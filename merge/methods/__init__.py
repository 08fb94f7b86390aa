"""Merge methods: pure tensor math computing the merged task vector (merged - base) of one tensor.

Every method is mergekit 0.1.5-compatible where mergekit has it (see docs/merge-methods.md) and is
called per tensor and per candidate, so magnitude ranks come from precomputed `MagnitudeTable`s and
random masks from `mask_generator`:

    >>> from evomerge.merge.methods import get_method, MethodOptions, MagnitudeTable
    >>> method = get_method("ties")
    >>> tables = [MagnitudeTable.build(d) for d in deltas]          # once per search
    >>> method.merge(out, deltas, params, base=base, options=MethodOptions(), tables=tables, generator=None)
"""

from __future__ import annotations

from .._lazy import lazy_members

# Loaded on first use (`merge._lazy`): submodule -> the public names it provides.
__getattr__, __all__ = lazy_members(__name__, {
    "._base": ["MergeMethod"],
    "._gta": ["release_workspace"],
    "._magnitude": ["MagnitudeTable", "prune_topk_"],
    "._names": ["METHOD_NAMES"],
    "._options": ["MethodOptions"],
    "._registry": ["METHODS", "get_method", "mask_generator", "mask_seed", "mergekit_seed"],
})
