"""TIES (magnitude pruning + sign election) and task arithmetic, plus Evo-Merging's `topk`.

* `task_arithmetic`: `lambda * sum_i w_i d_i` (/ sum_i w_i with normalize). mergekit: `task_arithmetic`.
* `ties`: keep the top `density` of each |d_i| (exactly mergekit's entries, `_ranks`), elect the sign of
  `sum_i w_i d_i'` per entry (ties at exactly 0 elect +), keep the weighted entries agreeing with it,
  divide by the sum of the agreeing weights (normalize), scale by lambda. mergekit: `ties`.
* `topk` (Evo-Merging stages 1 and 2): the same magnitude pruning, then a plain sign-aware scaled sum
  `lambda * sum_i w_i d_i'` with weights that may be negative (search bounds [-1.5, 1.5]); no sign election.
  It honours `normalize` like every method, so Evo-Merging presets set `normalize: false`. mergekit has
  no registered method for it (its magnitude sparsification always comes with TIES consensus); it equals
  mergekit's `breadcrumbs` with `gamma: 0` except that `topk` keeps at least one entry for density > 0.

Passes over memory (N = numel, per expert; "pass" = one elementwise kernel over N entries):
  task_arithmetic: 1 (multiply-add into `out`).
  topk: 2 (hardshrink into scratch, multiply-add); 1 when density >= 1.
  ties: 7 (hardshrink, scale, 3 adds, 2 clamps) + 4 with normalize (2 compares, 2 adds);
        then 5 final passes (elect, select P or N with exact 0/1 products) + 5 with normalize
        (select the divisor, guard 0, divide), + 1 if lambda != 1. (The fused kernels do all of it
        in one pass: `_fused`.)
"""

from __future__ import annotations

import torch

from .._recipe import ExpertParams
from ._gta import DenseSpec, GeneralizedTaskArithmetic, Scratch, Spec, Sparsified, ZeroSpec, FixList, trivial_spec
from ._magnitude import MagnitudeTable, prune_magnitude
from ._options import MethodOptions


def magnitude_sparsify(
    delta: torch.Tensor,
    p: ExpertParams,
    table: MagnitudeTable | None,
    options: MethodOptions,
    generator: torch.Generator | None,
    scratch: Scratch,
    index: int,
) -> Sparsified:
    """mergekit's `magnitude` (without rescale, its default for TIES): top max(1, int(density*N)) entries."""
    spec = magnitude_spec(delta, p, table, options, None)
    if spec.zero:
        return None, 1.0
    flat = delta.reshape(-1)
    return spec.chunk(flat, 0, Scratch(flat)).view(delta.shape), 1.0


class ThresholdSpec(Spec):
    """Keep `|x| >= threshold` (one hardshrink per chunk)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def chunk(self, d: torch.Tensor, start: int, scratch: Scratch) -> torch.Tensor | None:
        return prune_magnitude(d, self.threshold, out=scratch.get("prune", d.dtype))

    def keep_at(self, x: torch.Tensor, fixed: torch.Tensor | None) -> torch.Tensor:
        return prune_magnitude(x, self.threshold)


class TieThresholdSpec(ThresholdSpec):
    """Exact top-k with a split tie group: keep `|x| >= threshold` (strictly above the boundary value)
    and the boundary members mergekit keeps, `fix`; or with `drop`, `|x| >= threshold` (the boundary
    value) except the members mergekit drops, `fix` (flat indices; `_ranks`)."""

    def __init__(self, threshold: float, fix: torch.Tensor, drop: bool = False) -> None:
        super().__init__(threshold)
        self.fix = fix
        self.drop = drop
        self._list = FixList(fix)

    def chunk(self, d: torch.Tensor, start: int, scratch: Scratch) -> torch.Tensor | None:
        out = prune_magnitude(d, self.threshold, out=scratch.get("prune", d.dtype))
        if out is d:  # threshold 0 keeps all: never with a fix list, but never write into d
            out = scratch.get("prune", d.dtype).copy_(d)
        return self._list.restore(out, d, start, self.drop)

    def keep_at(self, x: torch.Tensor, fixed: torch.Tensor | None) -> torch.Tensor:
        plain = prune_magnitude(x, self.threshold)
        if fixed is None:
            return plain
        return torch.where(fixed, torch.zeros_like(x) if self.drop else x, plain)


def magnitude_spec(delta: torch.Tensor, p: ExpertParams, table: MagnitudeTable | None, options: MethodOptions,
                   key: tuple[int, int] | None) -> Spec:
    """`magnitude_sparsify` resolved once per tensor: exactly mergekit's entries (`_ranks`), or with
    `options.pruning == "approximate"` a threshold interpolated from the table."""
    density = float(p.density)
    trivial = trivial_spec(delta, density)
    if trivial is not None:
        return trivial
    if table is None:  # slow path: one sort per call, as mergekit
        table = MagnitudeTable.build(delta, resolution=1)
    if options.pruning == "approximate":
        return ThresholdSpec(table.threshold(density))
    selection = table.select_top(delta, density)
    if selection is None:
        return ZeroSpec()
    if selection.fix is None:
        return ThresholdSpec(selection.threshold) if selection.threshold > 0 else DenseSpec()
    return TieThresholdSpec(selection.threshold, selection.fix, selection.drop)


class TaskArithmetic(GeneralizedTaskArithmetic):
    name = "task_arithmetic"
    mergekit_name = "task_arithmetic"
    mergekit_defaults = {"normalize": False}


class Ties(GeneralizedTaskArithmetic):
    name = "ties"
    mergekit_name = "ties"
    consensus = True
    spec = staticmethod(magnitude_spec)
    sparsifier = staticmethod(magnitude_sparsify)
    sort_kind = "desc"
    uses = frozenset({"weight", "density", "normalize", "lambda"})
    mergekit_defaults = {"normalize": True}


class TopK(GeneralizedTaskArithmetic):
    name = "topk"
    mergekit_name = None
    spec = staticmethod(magnitude_spec)
    sparsifier = staticmethod(magnitude_sparsify)
    sort_kind = "desc"
    uses = frozenset({"weight", "density", "normalize", "lambda"})
