"""Model Breadcrumbs: drop the `gamma` largest-magnitude entries (outliers) and the smallest, keep `density`.

mergekit's `magnitude_outliers` semantics, reproduced exactly for exact tables:
`n_top = int(gamma * N)` largest entries are removed, then the next `int(density * N)` are kept; when
`density + gamma > 1` the outlier cut shrinks so that `int(density * N)` entries are still kept.
density >= 1 keeps everything (no outlier removal either); `int(density * N) == 0` keeps nothing.
The band is a pair of thresholds from the `MagnitudeTable`: `lo <= |x| <= hi`.

* `breadcrumbs`: band-pruned deltas, weighted sum (mergekit `breadcrumbs`, default normalize false).
* `breadcrumbs_ties`: band-pruned deltas with TIES sign election (mergekit `breadcrumbs_ties`).

Passes per expert: 3 for the band (2 hardshrinks, 1 subtract) + the combine's (1 for breadcrumbs,
3 (+2 with normalize) for breadcrumbs_ties, see `_ties`).
"""

from __future__ import annotations

import torch

from .._recipe import ExpertParams
from ._gta import DenseSpec, GeneralizedTaskArithmetic, Scratch, Spec, Sparsified, ZeroSpec
from ._magnitude import MagnitudeTable, prune_band
from ._options import MethodOptions


def band_sparsify(
    delta: torch.Tensor,
    p: ExpertParams,
    table: MagnitudeTable | None,
    options: MethodOptions,
    generator: torch.Generator | None,
    scratch: Scratch,
    index: int,
) -> Sparsified:
    density = float(p.density)
    if density >= 1:
        return delta, 1.0
    if delta.numel() == 0:
        return None, 1.0
    if table is None:
        table = MagnitudeTable.build(delta, resolution=max(1, delta.numel()))
    band = table.band(density, float(p.gamma))
    if band is None:
        return None, 1.0
    lo, hi = band
    out = scratch.get("prune", delta.dtype)
    return prune_band(delta, lo, hi, out=out, scratch=scratch.get("band_high", delta.dtype)), 1.0


class BandSpec(Spec):
    """Keep `lo <= |x| <= hi` (2 hardshrinks and a subtract per chunk)."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def chunk(self, d: torch.Tensor, start: int, scratch: Scratch) -> torch.Tensor | None:
        return prune_band(d, self.lo, self.hi, out=scratch.get("prune", d.dtype), scratch=scratch.get("band_high", d.dtype))


def band_spec(delta: torch.Tensor, p: ExpertParams, table: MagnitudeTable | None, options: MethodOptions,
              key: tuple[int, int] | None) -> Spec:
    """`band_sparsify` resolved once per tensor: the band comes from the table."""
    density = float(p.density)
    if density >= 1:
        return DenseSpec()
    if delta.numel() == 0:
        return ZeroSpec()
    if table is None:
        table = MagnitudeTable.build(delta, resolution=max(1, delta.numel()))
    band = table.band(density, float(p.gamma))
    if band is None:
        return ZeroSpec()
    return BandSpec(*band)


class Breadcrumbs(GeneralizedTaskArithmetic):
    name = "breadcrumbs"
    mergekit_name = "breadcrumbs"
    spec = staticmethod(band_spec)
    sparsifier = staticmethod(band_sparsify)
    uses = frozenset({"weight", "density", "gamma", "normalize", "lambda"})
    mergekit_defaults = {"normalize": False}


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    mergekit_name = "breadcrumbs_ties"
    consensus = True
