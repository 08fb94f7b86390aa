"""Model Breadcrumbs: drop the `gamma` largest-magnitude entries (outliers) and the smallest, keep `density`.

mergekit's `magnitude_outliers` semantics, reproduced to the entry (its tie-breaking too, `_ranks`):
`n_top = int(gamma * N)` largest entries are removed, then the next `int(density * N)` are kept; when
`density + gamma > 1` the outlier cut shrinks so that `int(density * N)` entries are still kept.
density >= 1 keeps everything (no outlier removal either); `int(density * N) == 0` keeps nothing.
The band is a pair of thresholds `lo <= |x| <= hi` plus, where an end splits a tie group, the
explicit positions of the members mergekit keeps (`TieBandSpec`).

* `breadcrumbs`: band-pruned deltas, weighted sum (mergekit `breadcrumbs`, default normalize false).
* `breadcrumbs_ties`: band-pruned deltas with TIES sign election (mergekit `breadcrumbs_ties`).

Passes per expert: 3 for the band (2 hardshrinks, 1 subtract) + the combine's (1 for breadcrumbs,
3 (+2 with normalize) for breadcrumbs_ties, see `_ties`).
"""

from __future__ import annotations

import torch

from .._recipe import ExpertParams
from ._gta import DenseSpec, GeneralizedTaskArithmetic, Scratch, Spec, Sparsified, ZeroSpec, FixList
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
    spec = band_spec(delta, p, table, options, None)
    if spec.zero:
        return None, 1.0
    flat = delta.reshape(-1)
    return spec.chunk(flat, 0, Scratch(flat)).view(delta.shape), 1.0


class BandSpec(Spec):
    """Keep `lo <= |x| <= hi` (2 hardshrinks and a subtract per chunk)."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def chunk(self, d: torch.Tensor, start: int, scratch: Scratch) -> torch.Tensor | None:
        return prune_band(d, self.lo, self.hi, out=scratch.get("prune", d.dtype), scratch=scratch.get("band_high", d.dtype))

    def keep_at(self, x: torch.Tensor, fixed: torch.Tensor | None) -> torch.Tensor:
        if self.lo > self.hi:
            return torch.zeros_like(x)
        return prune_band(x, self.lo, self.hi, out=torch.empty_like(x), scratch=torch.empty_like(x))


class TieBandSpec(BandSpec):
    """Exact Breadcrumbs band with split tie groups at its ends: keep `lo <= |x| <= hi` (strict at a
    split end; lo > hi: an empty band) and the members mergekit keeps, `fix` (`_ranks`)."""

    def __init__(self, lo: float, hi: float, fix: torch.Tensor) -> None:
        super().__init__(lo, hi)
        self.fix = fix
        self._list = FixList(fix)

    def chunk(self, d: torch.Tensor, start: int, scratch: Scratch) -> torch.Tensor | None:
        if self.lo > self.hi:
            out = scratch.get("prune", d.dtype).zero_()
        else:
            out = super().chunk(d, start, scratch)
        return self._list.restore(out, d, start)

    def keep_at(self, x: torch.Tensor, fixed: torch.Tensor | None) -> torch.Tensor:
        plain = super().keep_at(x, None)
        return plain if fixed is None else torch.where(fixed, x, plain)


def band_spec(delta: torch.Tensor, p: ExpertParams, table: MagnitudeTable | None, options: MethodOptions,
              key: tuple[int, int] | None) -> Spec:
    """`band_sparsify` resolved once per tensor: mergekit's entries exactly (`_ranks`), or with
    `options.pruning == "approximate"` a band interpolated from the table."""
    density = float(p.density)
    if density >= 1:
        return DenseSpec()
    if delta.numel() == 0:
        return ZeroSpec()
    if table is None:  # slow path: one sort per call, as mergekit
        table = MagnitudeTable.build(delta, resolution=1)
    if options.pruning == "approximate":
        band = table.band(density, float(p.gamma))
        return ZeroSpec() if band is None else BandSpec(*band)
    selection = table.select_band(delta, density, float(p.gamma))
    if selection is None:
        return ZeroSpec()
    if selection.fix is None:
        return BandSpec(selection.lo, selection.hi)
    return TieBandSpec(selection.lo, selection.hi, selection.fix)


class Breadcrumbs(GeneralizedTaskArithmetic):
    name = "breadcrumbs"
    mergekit_name = "breadcrumbs"
    spec = staticmethod(band_spec)
    sparsifier = staticmethod(band_sparsify)
    sort_kind = "asc"
    uses = frozenset({"weight", "density", "gamma", "normalize", "lambda"})
    mergekit_defaults = {"normalize": False}


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    mergekit_name = "breadcrumbs_ties"
    consensus = True
