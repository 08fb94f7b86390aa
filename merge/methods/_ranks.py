"""Exact magnitude ranks: mergekit 0.1.5's top-k, tie-breaking included, without a sort per candidate.

Why: mergekit's `magnitude` keeps the entries at positions `[:k]` of `torch.argsort(|d|.float(),
descending=True)` (`k = max(1, int(density * N))`), and `magnitude_outliers` (Breadcrumbs) the
positions `[n_bot : n_bot + target]` of `torch.sort(|d|.float()).indices`. On CPU torch's unstable
sort is an introsort: entries of equal magnitude come out in an order that depends on the whole
tensor (not index order), so no threshold can say which members of a tie group mergekit keeps. bf16
task vectors have only ~128 magnitudes per octave, so the boundary value is shared by hundreds or
thousands of entries for any realistic k, and fp32 task vectors of bf16-trained models are the same.

A task vector never changes during a search, so its magnitude ranks do not either: `RankTable` runs
mergekit's very sort call once per (expert, tensor, direction) and keeps the permutation (int32,
4 bytes per entry, built on first exact use). Per candidate a selection is then:

* the boundary value `v` (the magnitude at rank k) and its tie group `[p0, p1)` in sorted order,
  from a per-tensor histogram of the magnitudes' top bits (bf16/fp16: the whole value; fp32: one
  gather of the boundary bucket, ~N/2000 entries);
* if the group is kept whole (`p1 == k`): the plain threshold `|x| >= v`, exactly mergekit's set;
* else the strict threshold `|x| > v` plus the explicit positions `order[p0:k]` of the group members
  mergekit keeps, or (top-k, when fewer) `|x| >= v` minus the members it drops, `order[k:p1]`: a
  "fix" list of at most half the group, applied after the threshold.

Equal magnitudes are equal fp32 values, so the permutation is the one mergekit computes from the
same task vector whatever its dtype (mergekit sorts `w.float()` on CPU). Zero magnitudes never
matter (a kept 0 adds 0 and agrees with no elected sign), so a boundary at 0 keeps everything.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_SIXTEEN = (torch.bfloat16, torch.float16)


def _keys(flat: torch.Tensor, full: bool) -> torch.Tensor:
    """Monotone non-negative integer keys of |x| (equal keys <=> equal magnitudes when `full` or
    16-bit dtypes): the 15 magnitude bits of a 16-bit float (int16), or the fp32 pattern's top 15
    (`full`: all 31) bits (int32). Kept narrow: `torch.bincount` takes them as they are (widening a
    bf16 tensor's keys to int64 first made the histogram 5x slower)."""
    if flat.dtype in _SIXTEEN:
        return flat.view(torch.int16) & 0x7FFF
    bits = flat.float().view(torch.int32) & 0x7FFFFFFF
    return bits if full else bits >> 16


def key_value(key: int, dtype: torch.dtype) -> float:
    """The magnitude whose (full) key is `key` in `dtype` (a Python float, exact)."""
    if dtype == torch.float16:
        return float(np.array([key], dtype=np.uint16).view(np.float16)[0])
    if dtype == torch.bfloat16:
        return struct.unpack("<f", struct.pack("<I", key << 16))[0]
    return struct.unpack("<f", struct.pack("<I", key))[0]


def _mapped(tensor: torch.Tensor, folder: Path) -> torch.Tensor:
    """`tensor` (CPU) written to a file in `folder` and memory-mapped back, the file unlinked at
    once: its pages belong to the page cache, read on first touch and dropped under memory pressure
    (a candidate reads only the boundary slices of a permutation), and the file vanishes with the
    process however it ends."""
    fd, name = tempfile.mkstemp(prefix="evomerge-sort-", suffix=".bin", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            tensor.numpy().tofile(out)
        return torch.from_file(name, shared=False, size=tensor.numel(), dtype=tensor.dtype)
    finally:
        os.unlink(name)


@dataclass(frozen=True)
class Boundary:
    """A rank boundary: the value's full key and its tie group's positions `[start, stop)` in sorted order."""

    key: int
    start: int
    stop: int


class RankTable:
    """Magnitude histogram + mergekit's sort permutations of one task vector (see module docstring)."""

    __slots__ = ("numel", "dtype", "_flat", "_offset", "_counts", "_below", "_desc", "_asc")

    def __init__(self, delta: torch.Tensor) -> None:
        flat = delta.detach().reshape(-1)
        self.numel = flat.numel()
        self.dtype = flat.dtype
        self._flat = flat
        """The task vector itself (not a copy): fp32 boundary buckets are resolved by a gather."""
        keys = _keys(flat, full=False)
        lo = int(keys.min())
        self._offset = lo
        counts = torch.bincount(keys)[lo:].cpu().numpy().astype(np.int64)
        self._counts = counts
        self._below = np.concatenate([[0], np.cumsum(counts)[:-1]])
        """Entries in lower buckets: the bucket of a sorted position is one binary search in it (a
        cumulative sum per lookup was ~30 us, a third of a 1M model's per-candidate planning)."""
        self._desc: torch.Tensor | None = None
        self._asc: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Memory held beyond the task vector (histogram + built permutations)."""
        perms = sum(p.numel() * 4 for p in (self._desc, self._asc) if p is not None)
        return int(self._counts.nbytes * 2) + perms

    def built(self, descending: bool) -> torch.Tensor | None:
        """The permutation of that direction if it is built, else None."""
        return self._desc if descending else self._asc

    def order(self, descending: bool, spill: Path | None = None) -> torch.Tensor:
        """mergekit's permutation (int32, CPU): `argsort(|d|.float(), descending=True)` for top-k,
        `sort(|d|.float()).indices` for Breadcrumbs; built on first use, then cached. `spill`: keep
        it in a memory-mapped file in that folder instead of in memory (`_mapped`)."""
        perm = self._desc if descending else self._asc
        if perm is None:
            w = self._flat.abs().float().cpu()
            perm = (torch.argsort(w, descending=True) if descending else torch.sort(w, descending=False).indices)
            perm = perm.to(torch.int32)
            del w
            if spill is not None:
                perm = _mapped(perm, spill)
            if descending:
                self._desc = perm
            else:
                self._asc = perm
        return perm

    def boundary(self, position: int, descending: bool) -> Boundary:
        """The tie group containing sorted position `position` (0-based) of the given sort direction."""
        # descending position p is ascending position N-1-p: the same bucket, counted from the top
        rank = self.numel - 1 - position if descending else position
        b = int(np.searchsorted(self._below, rank, side="right")) - 1  # the last bucket starting at or before it
        count = int(self._counts[b])
        start = self.numel - int(self._below[b]) - count if descending else int(self._below[b])
        stop = start + count
        key = b + self._offset
        if self.dtype in _SIXTEEN:
            return Boundary(key, start, stop)
        # fp32: the bucket spans 2**16 values; its members are contiguous in the permutation and sorted.
        members = self.order(descending)[start:stop].to(self._flat.device, torch.long)
        full = _keys(self._flat[members], full=True).cpu().numpy()
        value = int(full[position - start])
        if descending:  # non-increasing
            first = start + int(np.count_nonzero(full > value))
            last = start + int(np.count_nonzero(full >= value))
        else:
            first = start + int(np.count_nonzero(full < value))
            last = start + int(np.count_nonzero(full <= value))
        return Boundary(value, first, last)

    def value(self, key: int) -> float:
        """The magnitude of full key `key` in this table's dtype (fp32 for fp32/fp64 tensors)."""
        return key_value(key, self.dtype if self.dtype in _SIXTEEN else torch.float32)

    def positions(self, descending: bool, start: int, stop: int) -> torch.Tensor:
        """Flat indices of sorted positions `[start, stop)` (in sort order), int64 on the tensor's device."""
        return self.order(descending)[start:stop].to(self._flat.device, torch.long)


@dataclass(frozen=True)
class TopSelection:
    """Which entries mergekit's `magnitude` keeps: `|x| >= threshold` (0.0: all), plus `fix`, the
    flat indices of boundary tie members kept beyond the threshold (None: no split)."""

    threshold: float
    fix: torch.Tensor | None = None
    drop: bool = False
    """True: `fix` lists the boundary members mergekit drops although `|x| >= threshold` (the
    threshold is then the boundary value itself): whichever side of the split group is smaller."""


@dataclass(frozen=True)
class BandSelection:
    """Which entries mergekit's `magnitude_outliers` keeps: `lo <= |x| <= hi` (an empty band when
    lo > hi), plus `fix` as in `TopSelection`."""

    lo: float
    hi: float
    fix: torch.Tensor | None = None


def select_top(table: RankTable, k: int) -> TopSelection:
    """The top-`k` selection (1 <= k < N) with mergekit's tie-breaking."""
    edge = table.boundary(k - 1, descending=True)
    if edge.key == 0:
        return TopSelection(0.0)  # the boundary is 0: every nonzero entry is kept, zeros do not matter
    if edge.stop == k:
        return TopSelection(table.value(edge.key))
    if edge.stop - k < k - edge.start:  # fewer members dropped than kept: list those
        return TopSelection(table.value(edge.key), table.positions(True, k, edge.stop), drop=True)
    return TopSelection(_next_up(table, edge.key), table.positions(True, edge.start, k))


def select_band(table: RankTable, n_bot: int, target: int) -> BandSelection | None:
    """Ascending positions `[n_bot, n_bot + target)` (target >= 1) with mergekit's tie-breaking;
    None when every kept entry is 0 (nothing to add)."""
    last = n_bot + target - 1
    low = table.boundary(n_bot, descending=False)
    high = table.boundary(last, descending=False)
    if high.key == 0:
        return None
    fixes = []
    if low.key == high.key:  # one tie group holds the whole band
        if low.start == n_bot and high.stop == last + 1:
            v = table.value(low.key)
            return BandSelection(v, v)
        return BandSelection(1.0, 0.0, table.positions(False, n_bot, last + 1))
    if low.key == 0 or low.start == n_bot:
        lo = table.value(low.key)
    else:
        lo = _next_up(table, low.key)
        fixes.append(table.positions(False, n_bot, low.stop))
    if high.stop == last + 1:
        hi = table.value(high.key)
    else:
        hi = table.value(high.key - 1)
        fixes.append(table.positions(False, high.start, last + 1))
    if not fixes:
        return BandSelection(lo, hi)
    return BandSelection(lo, hi, fixes[0] if len(fixes) == 1 else torch.cat(fixes))


def _next_up(table: RankTable, key: int) -> float:
    """The smallest magnitude above full key `key` in the table's dtype: `|x| >= it` <=> `|x| > v`."""
    return table.value(key + 1)


_MARKS = threading.local()


def _marks(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """This thread's all-zero mark buffer of at least `numel` entries (`flagged` leaves it zeroed)."""
    pool = _MARKS.__dict__.setdefault("pool", {})
    key = (str(device), dtype)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        buf = pool[key] = torch.zeros(numel, dtype=dtype, device=device)
    return buf[:numel]


def _mark(fixes: Sequence[torch.Tensor | None], numel: int) -> tuple[tuple[int, ...], torch.Tensor]:
    """Per expert its bit (0: no `fix` list), and the pooled mark array of `numel` entries with each
    expert's bit set at the flat indices of its list (each list without repeats; at most 62 lists).
    The caller zeroes what it set before it returns (`flagged`): the pool stays all zero.

    The first list of each byte of an entry (4 in int32, 8 in int64) is written by a plain
    `index_fill_` of that byte (bit 0 of byte j), the later ones OR their bit in by `index_add_`
    (each bit is new, so adding is OR): a fill costs ~3 ns per listed entry, an `index_add_` ~12
    (measured, 2 threads), and most tensors have at most 4 lists."""
    listed = [fix for fix in fixes if fix is not None]
    if len(listed) > 62:
        raise ValueError(f"exact top-k marks hold at most 62 experts per tensor, got {len(listed)}")
    marks = _marks(numel, listed[0].device, torch.int32 if len(listed) <= 31 else torch.int64)
    lanes = _lanes(marks)

    def set_bit(n: int, fix: torch.Tensor) -> int:
        lane, level = n % lanes.shape[1], n // lanes.shape[1]
        bit = 1 << (_shift(lane, lanes.shape[1]) + level)
        if level == 0:  # this byte of every entry is still zero
            lanes[:, lane].index_fill_(0, fix, 1)
        else:
            marks.index_add_(0, fix, torch.full(fix.shape, bit, dtype=marks.dtype, device=fix.device))
        return bit

    return _per_list(fixes, set_bit), marks


def _per_list(fixes: Sequence[torch.Tensor | None], write: Callable[[int, torch.Tensor], int]) -> tuple[int, ...]:
    """Per expert `write(n, fix)` for its list, the n-th list of `fixes` (0 for an expert without one)."""
    out, n = [], 0
    for fix in fixes:
        if fix is None:
            out.append(0)
            continue
        out.append(write(n, fix))
        n += 1
    return tuple(out)


def _lanes(marks: torch.Tensor) -> torch.Tensor:
    """`marks` (int32/int64) viewed as (entries, bytes): one uint8 lane per byte of each entry."""
    return marks.view(torch.uint8).view(marks.numel(), marks.element_size())


def _shift(lane: int, width: int) -> int:
    """The bit offset of byte `lane` within its `width`-byte integer."""
    return 8 * (lane if sys.byteorder == "little" else width - 1 - lane)


STAMP_LISTS = 8
"""The most `fix` lists `stamp` takes (one byte lane each of an int64 entry)."""

_STAMPS = threading.local()


def stamp(fixes: Sequence[torch.Tensor | None], numel: int) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
    """Exact top-k's split tie groups marked for a fused kernel that flips them inline (`_fused._weighted`).

    Returns per expert its byte lane's bit offset + 1 (0: no `fix` list), a pooled array of `numel`
    entries (int32 for up to 4 lists, int64 for up to `STAMP_LISTS`) and this use's stamp (a 0-d
    tensor of its dtype): expert i lists an entry iff `(entry >> (offset_i - 1)) & 255 == stamp`.
    Each list is one `index_fill_` of its byte lane with a stamp new to the pool, so nothing
    has to be cleared after the kernel (clearing the listed entries again cost as much as marking
    them: ~3.6 ms per candidate of a 50M model's 55); the pool is zeroed once every 255 stamps."""
    listed = [fix for fix in fixes if fix is not None]
    if len(listed) > STAMP_LISTS:
        raise ValueError(f"stamps hold at most {STAMP_LISTS} lists per tensor, got {len(listed)}")
    # a byte lane per list inside int32/int64 entries, not a uint8 array per list: inductor does not
    # vectorize 8-bit loads (a uint8 mark array made the 16M-entry TIES kernel 2.3x slower, measured)
    device, dtype = listed[0].device, torch.int32 if len(listed) <= 4 else torch.int64
    pool = _STAMPS.__dict__.setdefault("pool", {})
    key = (str(device), dtype)
    buf, last = pool.get(key, (None, 0))
    if buf is None or buf.numel() < numel:
        buf, last = torch.zeros(numel, dtype=dtype, device=device), 0
    if last == 255:  # every stamp was used since the pool was last all zero
        buf.zero_()
        last = 0
    pool[key] = buf, last + 1
    marks = buf[:numel]
    lanes = _lanes(marks)

    def stamp_lane(n: int, fix: torch.Tensor) -> int:
        lanes[:, n].index_fill_(0, fix, last + 1)
        return _shift(n, lanes.shape[1]) + 1

    return _per_list(fixes, stamp_lane), marks, torch.tensor(last + 1, dtype=dtype, device=device)


def flagged(fixes: Sequence[torch.Tensor | None], numel: int,
            distinct: bool = True) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
    """The entries where some expert's plain threshold (or band) decides the opposite of mergekit.

    `fixes`: per expert its `fix` list, as for `_mark`. Returns per expert its bit (0: no list), the
    listed indices (int64, in no particular order; each once if `distinct`, else once per listing)
    and per index the OR of the bits of the experts listing it (int32; int64 above 31 lists). The
    fused kernels merge a tensor with the plain thresholds and then these few entries again with the
    flagged experts' decisions flipped (`_fused._refix`): random reads and writes of the lists' size.

    Built with `_mark`'s pooled array, left all zero again: the bits are gathered, and duplicates are
    dropped by writing each listing's position and keeping the listings that read their own back
    (for the stats: repeated entries give the same merged value, so the merge itself needs no
    `distinct`). One list needs no marks at all."""
    listed = [fix for fix in fixes if fix is not None]
    if len(listed) == 1:
        bits = tuple(0 if fix is None else 1 for fix in fixes)
        return bits, listed[0], torch.ones(listed[0].shape, dtype=torch.int32, device=listed[0].device)
    bits, marks = _mark(fixes, numel)
    index = torch.cat(listed)
    flags = marks.index_select(0, index)
    if distinct:  # an entry listed by several experts: keep one listing (whichever wrote last)
        own = torch.arange(index.numel(), dtype=marks.dtype, device=index.device)
        marks.index_copy_(0, index, own)
        first = marks.index_select(0, index) == own
        index, flags = index[first], flags[first]
    marks.index_fill_(0, index, 0)
    return bits, index, flags
