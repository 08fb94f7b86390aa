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
from ._base import MergeMethod, axpy_, scaled_into
from ._magnitude import MagnitudeTable
from ._options import MethodOptions


class ModelStock(MergeMethod):
    name = "model_stock"
    mergekit_name = "model_stock"
    needs_base = True
    expert_count = (2, None)
    uses = frozenset()

    def _merge(
        self,
        out: torch.Tensor,
        deltas: Sequence[torch.Tensor],
        params: Sequence[ExpertParams],
        *,
        base: torch.Tensor | None,
        options: MethodOptions,
        tables: Sequence[MagnitudeTable] | None,
        generator: torch.Generator | None,
    ) -> None:
        flat = [d.reshape(-1).float() if d.dtype != torch.float64 else d.reshape(-1) for d in deltas]
        norms = [torch.linalg.vector_norm(d) for d in flat]
        cosines = []
        for i in range(len(flat)):
            for j in range(i + 1, len(flat)):
                dot = torch.dot(flat[i], flat[j])
                cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean()
        count = len(flat)
        denominator = 1 + (count - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos), count * cos / torch.where(singular, 1.0, denominator))
        coef = t / count  # 0-dim tensor: no device sync
        work = out if out.dtype in (torch.float32, torch.float64) else torch.empty_like(out, dtype=torch.float32)
        scaled_into(work, deltas[0], coef)
        for delta in deltas[1:]:
            axpy_(work, delta, coef)
        if work is not out:
            out.copy_(work)
