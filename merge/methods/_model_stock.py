"""Model Stock (Jang et al. 2024), mergekit `model_stock` with its default `filter_wise: false`.

With task vectors d_i (i = 1..n, n >= 2) flattened: cos = mean over pairs i<j of
`clamp(<d_i, d_j> / clamp(|d_i| |d_j|, min=1e-6), -1, 1)`, `t = n cos / (1 + (n - 1) cos)` (t = 0 when
|1 + (n-1) cos| < 1e-6), and merged = t * mean_i(x_i) + (1 - t) * base, i.e. the task vector
`t * mean_i d_i`. Experts' weights are not used (mergekit has none for this method).

Passes: n norms + n(n-1)/2 dot products (reads only), then n multiply-adds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._recipe import ExpertParams
from ._base import ChunkPlan, LinearPlan, MergeMethod
from ._magnitude import MagnitudeTable
from ._options import MethodOptions


class ModelStock(MergeMethod):
    name = "model_stock"
    mergekit_name = "model_stock"
    needs_base = True
    expert_count = (2, None)
    uses = frozenset()

    def _prepare(
        self,
        deltas: Sequence[torch.Tensor],
        params: Sequence[ExpertParams],
        *,
        base: torch.Tensor | None,
        options: MethodOptions,
        tables: Sequence[MagnitudeTable] | None,
        generator: torch.Generator | None,
        chunk: int,
    ) -> ChunkPlan:
        flat = [d.reshape(-1) for d in deltas]
        norms, dots = gram(flat, chunk)
        cosines = []
        for i in range(len(flat)):
            for j in range(i + 1, len(flat)):
                cosines.append((dots[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean()
        count = len(flat)
        denominator = 1 + (count - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos), count * cos / torch.where(singular, 1.0, denominator))
        coef = t / count  # 0-dim tensor: no device sync
        if coef.device.type == "cpu":
            coef = float(coef)
        return LinearPlan(flat[0].numel(), [(d, coef) for d in flat])


def gram(flat: Sequence[torch.Tensor], chunk: int) -> tuple[list[torch.Tensor], dict[tuple[int, int], torch.Tensor]]:
    """Norms and pairwise dot products of flat vectors. fp32/fp64 inputs: one torch reduction each, as
    mergekit; lower precision: widened chunk by chunk (fp32 per chunk, fp64 across chunks), no full copy."""
    n = len(flat)
    if flat[0].dtype in (torch.float32, torch.float64):
        norms = [torch.linalg.vector_norm(d) for d in flat]
        dots = {(i, j): torch.dot(flat[i], flat[j]) for i in range(n) for j in range(i + 1, n)}
        return norms, dots
    device = flat[0].device
    sq = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(n)]
    acc = {(i, j): torch.zeros((), dtype=torch.float64, device=device) for i in range(n) for j in range(i + 1, n)}
    for start in range(0, flat[0].numel(), chunk):
        parts = [d[start : start + chunk].float() for d in flat]
        for i in range(n):
            sq[i] += torch.dot(parts[i], parts[i])
        for (i, j) in acc:
            acc[(i, j)] += torch.dot(parts[i], parts[j])
    return [s.sqrt().float() for s in sq], {k: v.float() for k, v in acc.items()}
