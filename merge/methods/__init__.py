"""Merge methods: pure tensor math computing the merged task vector (merged - base) of one tensor.

Every method is mergekit 0.1.5-compatible where mergekit has it (see docs/merge-methods.md) and is
called per tensor and per candidate, so magnitude ranks come from precomputed `MagnitudeTable`s and
random masks from `mask_generator`:

    >>> from evomerge.merge.methods import get_method, MethodOptions, MagnitudeTable
    >>> method = get_method("ties")
    >>> tables = [MagnitudeTable.build(d) for d in deltas]          # once per search
    >>> method.merge(out, deltas, params, base=base, options=MethodOptions(), tables=tables, generator=None)
"""

from ._base import MergeMethod
from ._gta import release_workspace
from ._magnitude import MagnitudeTable, prune_topk_
from ._options import MethodOptions
from ._registry import METHODS, get_method, mask_generator, mask_seed, mergekit_seed

__all__ = [
    "METHODS",
    "MagnitudeTable",
    "MergeMethod",
    "MethodOptions",
    "get_method",
    "mask_generator",
    "mask_seed",
    "mergekit_seed",
    "prune_topk_",
    "release_workspace",
]
