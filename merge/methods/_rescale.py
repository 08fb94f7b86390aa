"""Rescaling after random dropping (DARE, DELLA): mergekit's L1 restore or the paper's 1/p."""

from __future__ import annotations

import torch

from ._magnitude import MagnitudeTable

_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps


def l1_restore_factor(delta: torch.Tensor, masked: torch.Tensor, table: MagnitudeTable | None) -> torch.Tensor:
    """mergekit's RescaleNorm.l1: |delta|_1 / |masked|_1, or 1 when either is below 1e-7 (0-dim, no sync).

    The numerator comes from the table (computed once); the denominator is one read of `masked`.
    """
    before = table.l1 if table is not None else delta.abs().float().sum()
    after = torch.linalg.vector_norm(masked, ord=1, dtype=torch.float32)
    ok = (before >= _EPS) & (after >= _EPS)
    return torch.where(ok, before / torch.where(ok, after, 1), 1)
