"""Magnitude tables: per (expert, tensor) statistics of |delta|, built once before a search.

Why: TIES, Breadcrumbs and top-k prune a task vector by magnitude rank. mergekit sorts the tensor for
every merge; in a search the task vector never changes, only the density does, so we sort once and turn
every later pruning into a threshold compare (`|x| >= threshold`), i.e. one elementwise pass.

Exactness. Let `a_0 <= ... <= a_{N-1}` be the sorted magnitudes (fp32) of a tensor with N entries.

* `N <= resolution`: all N sorted magnitudes are stored, every order statistic is exact, and
  `threshold(d)` is exactly the k-th largest magnitude mergekit keeps (`k = max(1, int(d * N))`).
* `N > resolution`: the order statistics at the R+1 positions `round(j * (N-1) / R)`, j = 0..R, are stored
  (R = resolution). A position between two stored ones is linearly interpolated in value, so the
  threshold lies between two stored order statistics at most `ceil((N-1)/R)` ranks apart.
  **Density error bound:** the kept fraction differs from mergekit's `k/N` by at most
  `1/R + 1/N` (about 2.4e-4 for the default R = 4096), ties aside.

* `N > sample` (default 2**18): the order statistics are estimated from a uniform random sample of
  `sample` entries drawn with a fixed seed (reproducible, independent of the trial). The kept fraction
  at a threshold estimated for density p is then a binomial estimate: its error has standard deviation
  `sqrt(p (1 - p) / sample)` (<= 1e-3 at the default; 4.5 sigma = 4.4e-3 at p = 0.5), on top of the
  interpolation error `1/R`. This replaced a full sort of every tensor (minutes for 0.5B x 3 experts).

Ties. mergekit keeps exactly k entries and breaks magnitude ties by `argsort` order (unspecified for
equal keys). A threshold keeps *every* entry equal to the threshold, so with ties at the boundary we
keep a few more entries than mergekit. For continuous fp32 task vectors ties are measure-zero; for
bf16/fp16 task vectors they are common, and the kept fraction may exceed the density by the size of the
tie group at the threshold.

The table lives on the CPU (a few KiB), so looking up a threshold never synchronizes a GPU.
The L1 norm (mergekit's DARE/DELLA rescale numerator) is kept on the tensor's device.
DELLA's per-row magnitude ranks need one int16/int32 per entry; they are built lazily on first DELLA
use (or eagerly with `build(..., della=True)`) and cached.
"""

from __future__ import annotations

import functools
import math
import struct
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ._ranks import BandSelection, RankTable, TopSelection, select_band, select_top
from ._rescale import WindowL1
from ._scratch import scratch

SAMPLE = 1 << 18
"""Default sample size for tensors larger than it (density error ~ sqrt(p(1-p)/SAMPLE) <= 1e-3)."""
_SAMPLE_SEED = 0x5EED
_INDEX_CACHE: dict[tuple[int, int, str], torch.Tensor] = {}


def _sample_indices(numel: int, sample: int, device: torch.device) -> torch.Tensor:
    """Fixed-seed uniform indices (with replacement) into `numel` entries; cached per (numel, sample, device)."""
    key = (numel, sample, str(device))
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        rng = np.random.Generator(np.random.PCG64(_SAMPLE_SEED))
        idx = torch.from_numpy(rng.integers(0, numel, sample, dtype=np.int64)).to(device)
        if len(_INDEX_CACHE) > 64:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = idx
    return idx


@functools.lru_cache(maxsize=256)
def _positions(numel: int, resolution: int) -> torch.Tensor:
    """The stored order-statistic positions `round(j * (N-1) / R)`, j = 0..R: one shared tensor per
    (N, R), not one per table (a model has a few distinct tensor sizes and thousands of tables)."""
    return torch.linspace(0, numel - 1, resolution + 1, dtype=torch.float64).round().long()


@functools.lru_cache(maxsize=8)
def _sample_positions(sample: int, resolution: int) -> np.ndarray:
    """Where the R+1 stored order statistics sit in a sorted sample of `sample` entries."""
    return np.linspace(0, sample - 1, resolution + 1).round().astype(np.int64)


def _work(device: torch.device, numel: int, slot: str, dtype: torch.dtype) -> torch.Tensor:
    """A work buffer for table building: pooled (`_scratch`) up to SAMPLE entries, the most a sampled
    build touches, so the pool stays small; fresh above (exact tables of whole large tensors)."""
    if numel <= SAMPLE:
        return scratch(device, numel, slot, dtype)
    return torch.empty(numel, dtype=dtype, device=device)


def _l1(flat: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """sum |x| as a 0-dim fp32 tensor on x's device, summed in fp64 (an fp32 sum loses ~1e-4 relative
    over millions of entries) chunk by chunk through one reused fp64 buffer (`_scratch`), so neither a
    whole fp64 copy nor per-chunk temporaries are allocated."""
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    buf = scratch(flat.device, min(chunk, flat.numel()), "tables.l1", torch.float64)
    for start in range(0, flat.numel(), chunk):
        piece = flat[start : start + chunk]
        total += buf[: piece.numel()].copy_(piece).abs_().sum()
    return total.float()


SortKind = Literal["desc", "asc", "rows"]
"""A one-time sort of a task vector (`MagnitudeTable.build_sort`)."""


class MagnitudeTable:
    """Sorted-magnitude statistics of one task vector (see module docstring for the error bound)."""

    __slots__ = ("numel", "resolution", "exact", "values", "positions", "l1", "sampled", "identity", "_row_ranks",
                 "_row_len", "_lookup", "_windows", "_ranks")

    def __init__(
        self,
        numel: int,
        resolution: int,
        values: torch.Tensor,
        positions: torch.Tensor | None,
        l1: torch.Tensor,
    ) -> None:
        self.numel = numel
        self.resolution = resolution
        self.exact = positions is None
        self.values = values
        """Ascending fp32 magnitudes on the CPU: all of them (exact) or the order statistics at `positions`."""
        self.positions = positions
        self.l1 = l1
        """0-dim fp32 tensor on the delta's device: sum(|delta|), computed exactly as mergekit does."""
        self.sampled = 0
        """Sample size the order statistics were estimated from; 0 = computed from all entries."""
        self.identity: str | None = None
        """Which task vector this describes ("expert\x1ftensor"), set by the engine: DARE derives the
        field of its window masks from it and the run seed (`_draws.field_key`), so the field, and
        with it the kept-L1 table (`window_l1`), stays the same across the trials of a run."""
        self._windows: dict[tuple[int, int], WindowL1] = {}
        self._ranks: RankTable | None = None
        self._row_ranks: torch.Tensor | None = None
        self._row_len = 0
        # numpy views of values / positions: a threshold lookup per (tensor, expert) and candidate
        # indexes them a few times, and numpy scalar indexing costs ~0.1 us against torch's ~2 us.
        self._lookup = (values.numpy(), None if positions is None else positions.numpy())

    @classmethod
    def build(cls, delta: torch.Tensor, resolution: int = 4096, *, della: bool = False,
              sample: int | None = SAMPLE, identity: str | None = None) -> "MagnitudeTable":
        """Order statistics of |delta|, once per (expert, tensor) before a search.

        `numel <= resolution`: all magnitudes, sorted (exact). `numel <= sample` (or `sample=None`): one
        sort, `resolution + 1` exact order statistics. Larger: the order statistics are estimated from a
        fixed-seed uniform sample of `sample` entries (see the module docstring for the error bound), a
        gather plus a small sort instead of sorting N entries: ~5 ms per tensor instead of seconds.
        The L1 norm is always exact (fp32 chunk sums accumulated in fp64 for large tensors).
        `della=True` also precomputes the per-row ranks DELLA needs (otherwise built on first use).
        `identity` names the task vector (see the attribute).
        """
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        with torch.no_grad():
            flat = delta.detach().reshape(-1)
            numel = flat.numel()
            if numel <= resolution or (sample is None or numel <= sample):
                magnitudes = _work(flat.device, numel, "tables.magnitudes", torch.float32).copy_(flat).abs_()
                l1 = magnitudes.sum()
                ordered = _work(flat.device, numel, "tables.sorted", torch.float32)
                torch.sort(magnitudes, out=(ordered, _work(flat.device, numel, "tables.order", torch.int64)))
                if numel <= resolution:
                    positions = None
                    values = ordered.to("cpu", copy=True)
                else:
                    positions = _positions(numel, resolution)
                    values = ordered[positions.to(ordered.device)].cpu()
                sampled = 0
            else:
                l1 = _l1(flat)
                picked = torch.index_select(flat, 0, _sample_indices(numel, sample, flat.device),
                                            out=_work(flat.device, sample, "tables.picked", flat.dtype))
                if flat.device.type == "cpu":  # sorted in place in a reused buffer (see `_scratch`)
                    ordered = _work(flat.device, sample, "tables.magnitudes", torch.float32).copy_(picked).abs_().numpy()
                    ordered.sort()
                else:
                    ordered = np.sort(picked.abs().float().cpu().numpy())
                positions = _positions(numel, resolution)
                values = torch.from_numpy(ordered[_sample_positions(sample, resolution)])
                sampled = sample
        table = cls(numel, resolution, values, positions, l1)
        table.sampled = sampled
        table.identity = identity
        if della:
            table.row_ranks(delta)
        return table

    # -- order statistics -------------------------------------------------------------------------
    def order_statistic(self, position: int) -> float:
        """The `position`-th smallest magnitude (0-based), exact or interpolated."""
        if not 0 <= position < self.numel:
            raise IndexError(f"position {position} out of range for {self.numel} entries")
        values, positions = self._lookup
        if positions is None:
            return float(values[position])
        # Stored positions are round(j * (N - 1) / R): locate the bracketing j without a search.
        step = (self.numel - 1) / self.resolution
        j = min(int(position / step), self.resolution)
        while j > 0 and positions[j] > position:
            j -= 1
        while j < self.resolution and positions[j + 1] <= position:
            j += 1
        lo_pos = int(positions[j])
        lo_val = float(values[j])
        if lo_pos == position or j == self.resolution:
            return lo_val
        hi_pos = int(positions[j + 1])
        hi_val = float(values[j + 1])
        return lo_val + (hi_val - lo_val) * (position - lo_pos) / (hi_pos - lo_pos)

    def threshold(self, density: float) -> float:
        """Magnitude threshold: `|x| >= threshold` keeps the top `max(1, int(density * N))` entries.

        density >= 1 -> 0.0 (keep all); density <= 0 -> inf (keep none), as mergekit's `magnitude`.
        """
        if density >= 1 or self.numel == 0:
            return 0.0
        if density <= 0:
            return math.inf
        k = max(1, int(density * self.numel))
        return self.order_statistic(self.numel - k)

    def band(self, density: float, gamma: float) -> tuple[float, float] | None:
        """Breadcrumbs band `(lo, hi)`: keep `lo <= |x| <= hi`, None = keep nothing.

        mergekit's `magnitude_outliers`: drop the `int(gamma * N)` largest, keep the next `int(density * N)`,
        shrinking the outlier cut when density + gamma > 1. Callers handle density >= 1 (keep all,
        no outlier removal, as in mergekit).
        """
        target = int(density * self.numel)
        if target <= 0:
            return None
        n_top = int(gamma * self.numel)
        n_bot = max(0, self.numel - target - n_top)
        return self.order_statistic(n_bot), self.order_statistic(n_bot + target - 1)

    # -- exact selections (mergekit's count and tie-breaking; `_ranks`) ---------------------------
    def ranks(self, delta: torch.Tensor) -> RankTable:
        """The exact rank table of `delta` (the task vector this table describes), built on first use."""
        if self._ranks is None:
            with torch.no_grad():
                self._ranks = RankTable(delta)
        return self._ranks

    def select_top(self, delta: torch.Tensor, density: float) -> TopSelection | None:
        """mergekit's `magnitude` selection at `density` (0 < density < 1); None keeps nothing."""
        if self.numel == 0 or density <= 0:
            return None
        return select_top(self.ranks(delta), max(1, int(density * self.numel)))

    def select_band(self, delta: torch.Tensor, density: float, gamma: float) -> BandSelection | None:
        """mergekit's `magnitude_outliers` selection (density < 1); None keeps nothing."""
        target = int(density * self.numel)
        if target <= 0:
            return None
        n_top = int(gamma * self.numel)
        n_bot = max(0, self.numel - target - n_top)
        return select_band(self.ranks(delta), n_bot, target)

    # -- DARE --------------------------------------------------------------------------------------
    def window_l1(self, delta: torch.Tensor, key: tuple[int, int]) -> WindowL1:
        """The kept-L1 table of DARE windows on field `key` (built on first use, the last two fields
        cached: a run has one seed). Every size gets one: a small tensor's kept-L1 pass cost more per
        candidate than its arithmetic (docs/merge-engine.md, "DARE-TIES at every size")."""
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= 2:
                del self._windows[next(iter(self._windows))]
            window = self._windows[key] = WindowL1(delta, key, float(self.l1))
        return window

    # -- DELLA ------------------------------------------------------------------------------------
    def row_ranks(self, delta: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Ascending magnitude rank of every entry within its row, and the row length.

        Rows are taken along dim 1 (dim 0 after viewing a 1-D tensor as one row), as in mergekit's
        `della_magprune`. Stored as int16 when the row length allows (2 bytes per entry), cached.
        """
        if self._row_ranks is None:
            with torch.no_grad():
                view = delta.detach() if delta.dim() >= 2 else delta.detach().reshape(1, -1)
                row_len = view.shape[1]
                dtype = torch.int16 if row_len <= 32767 else torch.int32
                if view.dim() > 2:  # (no such tensor in a causal LM) ranks along dim 1, by the second sort
                    self._row_ranks, self._row_len = torch.argsort(view.abs(), dim=1).argsort(dim=1).to(dtype), row_len
                    return self._row_ranks, self._row_len
                rows = view.shape[0]
                ranks = torch.empty((rows, row_len), dtype=dtype, device=view.device)
                # the inverse of each row's sort order, scattered (argsort of the order, as mergekit
                # ranks, without the second sort), a block of rows at a time: int64 orders of ~4M entries
                block = max(1, (1 << 22) // max(row_len, 1))
                positions = torch.arange(row_len, dtype=dtype, device=view.device).expand(min(block, rows), row_len)
                for r0 in range(0, rows, block):
                    r1 = min(rows, r0 + block)
                    order = torch.argsort(view[r0:r1].abs(), dim=1)
                    ranks[r0:r1].scatter_(1, order, positions[: r1 - r0])
                self._row_ranks = ranks
                self._row_len = row_len
        return self._row_ranks, self._row_len

    # -- one-time sorts (built together before a search: `MergeEngine.build_sorts`) --------------
    def sort_bytes(self, delta: torch.Tensor, kind: SortKind) -> int:
        """Bytes the sort `kind` of `delta` will hold for the run once built; 0 when it is built."""
        if kind == "rows":
            if self._row_ranks is not None:
                return 0
            row_len = delta.shape[1] if delta.dim() >= 2 else delta.numel()
            return self.numel * (2 if row_len <= 32767 else 4)
        order = None if self._ranks is None else self._ranks.built(kind == "desc")
        return 0 if order is not None else self.numel * 4

    def build_sort(self, delta: torch.Tensor, kind: SortKind, spill: Path | None = None) -> None:
        """Build the sort `kind` of `delta` (this table's task vector) now: mergekit's top-k order
        ("desc") or Breadcrumbs' order ("asc") for exact pruning, kept in a memory-mapped file in
        `spill` when given, or DELLA's row ranks ("rows"). Safe to call from several threads for
        different tables, and for one table's two directions once `ranks` is built (torch's sorts
        release the GIL)."""
        if kind == "rows":
            self.row_ranks(delta)
        else:
            self.ranks(delta).order(kind == "desc", spill)

    def __repr__(self) -> str:
        kind = "exact" if self.exact else f"quantiles@{self.resolution}" + (f" of {self.sampled} samples" if self.sampled else "")
        return f"MagnitudeTable(numel={self.numel}, {kind})"


_NUMPY_FLOAT = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


def _strict_below(threshold: float, dtype: torch.dtype) -> float:
    """Largest value of `dtype` strictly below `threshold`, so `|x| > result` <=> `|x| >= threshold`.

    numpy where it has the dtype (the same round-to-nearest conversion, ~1 us instead of ~6 us: this
    runs per tensor, expert and candidate); bit arithmetic for bfloat16 (`_bf16_strict_below`); torch
    for the rest."""
    kind = _NUMPY_FLOAT.get(dtype)
    if kind is not None:
        return float(np.nextafter(kind(threshold), kind(0)))
    if dtype == torch.bfloat16:
        below = _bf16_strict_below(threshold)
        if below is not None:
            return below
    t = torch.tensor(threshold, dtype=dtype)
    return float(torch.nextafter(t, torch.zeros((), dtype=dtype)))


def _bf16_strict_below(threshold: float) -> float | None:
    """torch's `nextafter(tensor(threshold, bfloat16), 0)` for finite positive thresholds, in bit
    arithmetic (~2 us instead of ~15 us of tensor calls; it ran 3 times per tensor and candidate).
    torch rounds the Python float to fp32, then to bf16 (round to nearest even on the dropped 16
    bits); stepping toward zero is one less in the bit pattern. None: not finite positive in fp32."""
    try:
        bits = struct.unpack("<I", struct.pack("<f", threshold))[0]
    except OverflowError:
        return None
    if not 0 < bits < 0x7F800000:
        return None
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # may carry into inf: one below is bf16's max
    if rounded == 0:  # rounds to +0, and nextafter(0, 0) is 0
        return 0.0
    return struct.unpack("<f", struct.pack("<I", (rounded - 1) << 16))[0]


def prune_magnitude(delta: torch.Tensor, threshold: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """`delta` with entries of magnitude below `threshold` set to 0 (one fused pass via hardshrink).

    Returns `delta` itself (no copy) when nothing is pruned; otherwise writes into `out` if given.
    """
    if threshold <= 0:
        return delta
    if math.isinf(threshold):
        result = out if out is not None else torch.empty_like(delta)
        return result.zero_()
    if delta.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        # hardshrink keeps |x| > lambd; lambd is the next representable value below the threshold.
        lambd = _strict_below(threshold, delta.dtype)
        if out is None:
            return torch.hardshrink(delta, lambd)
        return torch.hardshrink(delta, lambd, out=out)
    keep = delta.abs() >= threshold
    if out is None:
        return delta * keep
    return torch.mul(delta, keep, out=out)


def prune_band(delta: torch.Tensor, lo: float, hi: float, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Keep `lo <= |x| <= hi` (Breadcrumbs): hardshrink(lo) - hardshrink(hi), exact (x - x == 0, x - 0 == x)."""
    low = prune_magnitude(delta, lo, out=out)
    if low is delta:  # lo == 0: nothing below the band
        low = out.copy_(delta)
    high = torch.hardshrink(delta, hi, out=scratch)
    return low.sub_(high)


def prune_topk_(tensor: torch.Tensor, table: MagnitudeTable | None, density: float) -> torch.Tensor:
    """In place: keep exactly mergekit's top `max(1, int(density * N))` entries of `tensor` by magnitude
    (its tie-breaking included), zero the rest; returns `tensor`.

    The asymmetric-LoRA Evo-Merging variant prunes each adapter's A matrix with this (B untouched) and
    then merges adapters with `topk` at density 1: see docs/merge-methods.md.
    `table` must describe `tensor`'s current values (None builds one: a sort, slow path).
    """
    if density >= 1 or tensor.numel() == 0:
        return tensor
    if table is None:
        table = MagnitudeTable.build(tensor, resolution=1)
    selection = table.select_top(tensor, density)
    if selection is None:
        return tensor.zero_()
    if selection.threshold <= 0:
        return tensor
    flat = tensor.view(-1)
    kept = flat[selection.fix] if selection.fix is not None and not selection.drop else None
    lambd = _strict_below(selection.threshold, tensor.dtype)
    # hardshrink has no in-place variant; masked_fill_ with a fresh bool mask is the in-place route.
    tensor.masked_fill_(tensor.abs() <= lambd, 0)
    if selection.fix is not None:
        flat[selection.fix] = 0 if selection.drop else kept
    return tensor
