"""`linear`: weighted average of the experts' full weights (mergekit `linear`), in task-vector form.

mergekit's linear merges the *listed* models' weights: `sum_i w_i x_i / sum_i w_i` (normalize) or
`sum_i w_i x_i`; the base takes part only if listed. With x_i = base + d_i this is, as a task vector,

    normalize:      sum_i w_i d_i / sum_i w_i
    no normalize:   sum_i w_i d_i + (sum_i w_i - 1) * base     (needs the base unless sum w == 1)

`lambda` is not part of mergekit's linear and is ignored. Difference: mergekit divides by the raw
weight sum, giving inf/NaN when it is 0; we skip the division when |sum w| < 1e-8 (as mergekit's
task_arithmetic does), so a search never sees a non-finite model from this method.

Passes: 1 multiply-add per expert (+1 for the base term without normalize).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._recipe import ExpertParams
from ._base import ChunkPlan, LinearPlan, MergeMethod, total_weight_divisor
from ._magnitude import MagnitudeTable
from ._options import MethodOptions


class Linear(MergeMethod):
    name = "linear"
    mergekit_name = "linear"
    uses = frozenset({"weight", "normalize"})
    mergekit_defaults = {"normalize": True}

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
        weights = [float(p.weight) for p in params]
        scale = 1.0 / total_weight_divisor(weights) if options.normalize else 1.0
        base_coef = 0.0 if options.normalize else float(torch.tensor(weights, dtype=torch.float32).sum()) - 1.0
        if base_coef != 0.0 and base is None:
            raise ValueError("linear without normalize needs the base tensor (weights do not sum to 1)")
        terms: list[tuple[torch.Tensor, float]] = [(d, w * scale) for d, w in zip(deltas, weights)]
        if base_coef != 0.0:
            assert base is not None
            terms.append((base, base_coef))
        return LinearPlan(deltas[0].numel(), terms)
