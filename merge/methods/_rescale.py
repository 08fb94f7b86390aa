"""Rescaling after random dropping (DARE, DELLA): mergekit's L1 restore or the paper's 1/p."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ._draws import BUCKETS, bucket_of, field_hash
from ._scratch import scratch

if TYPE_CHECKING:
    from ._magnitude import MagnitudeTable

_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps

def l1_restore_factor(delta: torch.Tensor, masked: torch.Tensor, table: "MagnitudeTable | None") -> torch.Tensor:
    """mergekit's RescaleNorm.l1: |delta|_1 / |masked|_1, or 1 when either is below 1e-7 (0-dim, no sync).

    The numerator comes from the table (computed once); the denominator is one read of `masked`.
    """
    before = table.l1 if table is not None else delta.abs().float().sum()
    return restore_ratio(before, torch.linalg.vector_norm(masked, ord=1, dtype=torch.float32))


def restore_ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``before / after``, or 1 when either L1 is below mergekit's 1e-7 (tensors: no sync on CUDA)."""
    ok = (before >= _EPS) & (after >= _EPS)
    return torch.where(ok, before / torch.where(ok, after, 1), 1)


def l1_factor(before: float, after: float) -> float:
    """The same factor from Python floats (|d|_1 as mergekit computes it, kept L1 in fp64), rounded to fp32."""
    if before < _EPS or after < _EPS:
        return 1.0
    return float(np.float32(before / after))


class WindowL1:
    """The kept L1 `sum_j |d_j| keep_j` of every DARE window on one field, each in O(1).

    A DARE window keeps the entries whose field bucket lies in `offset .. offset + width - 1` (mod
    BUCKETS), see `_draws`. Built once per (task vector, field): one pass hashes the field and sums
    |d| per bucket in fp64 (`bincount`, deterministic on CPU); the kept L1 of a window is then a
    difference of two prefix sums, so mergekit's L1 rescale needs no pass over the data per candidate.
    (Small chunks through reused buffers, `_scratch`: building allocates nothing per chunk.) The fp64 sums differ from a direct sum over the kept entries only in summation order (~1e-16
    relative), far below the fp32 rounding of the factor.
    """

    __slots__ = ("prefix", "l1")

    def __init__(self, delta: torch.Tensor, key: tuple[int, int], l1: float, chunk: int = 1 << 16) -> None:
        flat = delta.detach().reshape(-1)
        hist = torch.zeros(BUCKETS, dtype=torch.float64, device=flat.device)
        size = min(chunk, flat.numel())
        bits, tmp = (scratch(flat.device, size, slot, torch.int32) for slot in ("window.bits", "window.tmp"))
        magnitudes = scratch(flat.device, size, "window.magnitudes", torch.float64)
        with torch.no_grad():
            for start in range(0, flat.numel(), chunk):
                piece = flat[start : start + chunk]
                n = piece.numel()
                field_hash(bits[:n], tmp[:n], key, start)
                buckets = bucket_of(bits[:n], out=tmp[:n])
                hist += torch.bincount(buckets, weights=magnitudes[:n].copy_(piece).abs_(), minlength=BUCKETS)
        self.prefix = np.concatenate([[0.0], np.cumsum(hist.cpu().numpy())])
        """Prefix sums of the per-bucket |d| (fp64, BUCKETS + 1 entries, on the CPU: lookups never sync)."""
        self.l1 = l1
        """|d|_1 as mergekit computes it (`MagnitudeTable.l1`): the factor's numerator."""

    def kept(self, offset: int, width: int) -> float:
        """Kept L1 of the window of `width` buckets starting at bucket `offset`."""
        prefix, end = self.prefix, offset + width
        if end <= BUCKETS:
            return float(prefix[end] - prefix[offset])
        return float((prefix[BUCKETS] - prefix[offset]) + prefix[end - BUCKETS])

    def factor(self, offset: int, width: int) -> float:
        """mergekit's L1 restore factor for that window, as `l1_factor`."""
        return l1_factor(self.l1, self.kept(offset, width))
