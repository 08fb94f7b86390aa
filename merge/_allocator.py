"""glibc allocator settings of the merge engine (no torch here: the CLI applies them at its edge,
before anything heavy is imported)."""

from __future__ import annotations

from typing import Any

_MMAP_THRESHOLD = 4 << 20


def _libc() -> Any:
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def fixed_mmap_threshold() -> None:
    """glibc: serve every allocation >= 4 MiB by its own mmap (returned to the OS when freed).

    glibc raises its mmap threshold dynamically (up to 32 MiB) after large frees, so the per-tensor
    temporaries of loading and table building (tensors of 1-32 MiB) were carved from the brk heap;
    their holes between the long-lived task vectors stayed resident and the engine peaked at ~7.5x the
    model instead of (experts + 2)x. A fixed threshold (M_MMAP_THRESHOLD = -3) turns that off. Chunk
    work buffers are pooled, so the extra mmap/munmap calls are few. Process-wide (call it at a
    program's edge, before loading: the CLI does); no-op off glibc.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, _MMAP_THRESHOLD)


def trim() -> None:
    """Hand free heap pages back to the OS (glibc `malloc_trim`)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
