"""Task arithmetic on state dicts: the zoo's own tiny merge helper.

The project's merge engine lives in ``evomerge.merge``; the zoo cannot depend on it (the
zoo is that engine's test data), so the two reference merges recorded in the manifest are
computed here, in the simplest possible way: ``base + w * sum_i (expert_i - base)``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch


def task_arithmetic(
    base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], weight: float
) -> dict[str, torch.Tensor]:
    """``base + weight * sum(expert - base)`` for every floating tensor (others copied from base)."""
    out: dict[str, torch.Tensor] = {}
    for name, b in base.items():
        if not torch.is_floating_point(b):
            out[name] = b.clone()
            continue
        delta = torch.zeros_like(b)
        for e in experts:
            delta += e[name] - b
        out[name] = b + weight * delta
    return out
