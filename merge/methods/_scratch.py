"""Reusable work buffers, one per (thread, device, slot, dtype).

Why: the merge and the one-time table building run thousands of per-tensor steps whose temporaries
would otherwise be allocated and freed each time. Below glibc's mmap threshold those come from the
heap, and the small long-lived results built between them (magnitude tables, window sums) land in
the freed holes, so the next temporaries no longer fit there and the heap grows: building the
tables of a 1.25B model with 3 experts left ~2 GB of such holes resident. A buffer that is reused
allocates nothing after its first use.
"""

from __future__ import annotations

import threading

import torch

_POOL = threading.local()


def scratch(device: torch.device | str, numel: int, slot: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A flat buffer of `numel` entries, reused by every call with the same (thread, device, slot,
    dtype): its contents are the caller's until the next call for that slot (grown when too small)."""
    pool = getattr(_POOL, "buffers", None)
    if pool is None:
        pool = _POOL.buffers = {}
    key = (torch.device(device), slot, dtype)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        pool.pop(key, None)  # free the smaller one before allocating its successor
        buf = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release() -> None:
    """Free this thread's pooled buffers (they are otherwise kept for the next merge)."""
    _POOL.buffers = {}
