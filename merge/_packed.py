"""Small tensors packed end to end, so that one fused kernel call merges all of them.

Why: per candidate, every tensor costs the merge a kernel call (~100 us of guards and dispatch for
a compiled kernel, tens of eager ops otherwise) on top of its arithmetic. Norms and biases of a
real model, or every tensor of a toy one, have a few thousand entries each: for them the calls, not
the bytes, are the merge time (the small zoo's 39 tensors: ~9 ms of calls around ~1 ms of math).

The arena holds the base and each expert's task vector of those tensors in one buffer each, laid out
as rows of `PACK_BLOCK` entries with every tensor starting on a new row (zero padding after it), plus
the tensor (segment) of each row. The engine's per-tensor caches are re-pointed to views of it, so
packing costs no memory beyond the padding, the row ids and one output buffer.
`methods._fused.PackedGta` merges the whole arena in one kernel call per chunk of rows, looking
each row's merge parameters up once per row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

PACK_MAX_NUMEL = 1 << 18
"""Tensors up to this many entries are packed: below it a kernel call's fixed cost (~100 us) is
at least about what the tensor's arithmetic costs (~1 ns per entry and expert)."""
PACK_BLOCK = 512
"""Row length: the vectorized inner loop of the packed kernel (padding costs < 1 row per tensor)."""


class PackedArena:
    """The packed base, task vectors and row segments of the engine's small tensors (module doc)."""

    def __init__(self, names: list[str], shapes: list[torch.Size], row_starts: list[int], base: torch.Tensor,
                 deltas: list[torch.Tensor], segment: torch.Tensor) -> None:
        self.names = names
        self.shapes = shapes
        self._starts = [r * PACK_BLOCK for r in row_starts]
        self.row_starts = torch.tensor(row_starts, dtype=torch.int32, device=base.device)
        self.base = base
        """(rows, PACK_BLOCK)."""
        self.deltas = deltas
        """One packed (rows, PACK_BLOCK) task vector per expert, in the engine's expert order."""
        self.segment = segment
        """int32, the tensor of each row."""
        rows = torch.arange(segment.shape[0], dtype=torch.int32, device=segment.device)
        self.row_first = (rows - self.row_starts[segment]) * PACK_BLOCK
        """int32, each row's first element index within its own tensor (DARE draws on that index)."""
        self._out: dict[torch.dtype, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    @classmethod
    def pack(cls, names: Sequence[str], base: dict[str, torch.Tensor],
             deltas: Sequence[dict[str, torch.Tensor]]) -> "PackedArena":
        """Copy `names`' base and task vectors into packed buffers and REPLACE the entries of `base`
        and of each `deltas[i]` by views of them (the old tensors are freed with their last reference).

        All tensors must share dtype and device (the engine's cache)."""
        names = list(names)
        shapes = [base[n].shape for n in names]
        rows = [-(-base[n].numel() // PACK_BLOCK) for n in names]
        row_starts = [sum(rows[:i]) for i in range(len(rows))]
        first = base[names[0]]

        def packed_copy(source: Mapping[str, torch.Tensor]) -> torch.Tensor:
            flat = torch.zeros(sum(rows) * PACK_BLOCK, dtype=first.dtype, device=first.device)
            for name, row in zip(names, row_starts):
                tensor = source[name].reshape(-1)
                flat[row * PACK_BLOCK:row * PACK_BLOCK + tensor.numel()].copy_(tensor)
            return flat.view(-1, PACK_BLOCK)

        packed_base = packed_copy(base)
        packed_deltas = [packed_copy(d) for d in deltas]
        segment = torch.repeat_interleave(torch.arange(len(names), dtype=torch.int32, device=first.device),
                                          torch.tensor(rows, device=first.device))
        arena = cls(names, shapes, row_starts, packed_base, packed_deltas, segment)
        for i, name in enumerate(names):
            base[name] = arena.view(packed_base, i)
            for d, packed in zip(deltas, packed_deltas):
                d[name] = arena.view(packed, i)
        return arena

    def view(self, packed: torch.Tensor, index: int) -> torch.Tensor:
        """Tensor `index` inside a packed buffer, shaped like the tensor."""
        start = self._starts[index]
        shape = self.shapes[index]
        return packed.view(-1)[start:start + shape.numel()].view(shape)

    def out(self, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The packed (rows, PACK_BLOCK) output buffer in `dtype` and its per-tensor views (one
        buffer per dtype, reused across merges)."""
        out = self._out.get(dtype)
        if out is None:
            buf = torch.empty(self.base.shape, dtype=dtype, device=self.base.device)
            out = self._out[dtype] = (buf, [self.view(buf, i) for i in range(len(self.names))])
        return out
