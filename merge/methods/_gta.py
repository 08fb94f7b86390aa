"""Generalized task arithmetic: sparsify each task vector, weight, (optionally) elect signs, sum, normalize.

This is mergekit's `GeneralizedTaskArithmeticMerge` (task_arithmetic, ties, dare_*, breadcrumbs*, della*)
plus our `topk`, restructured so that no (n_experts, ...) stack is ever materialized:

* **Linear combine** (no consensus): `out = sum_i (w_i * r_i * s) * T_i` with T_i the sparsified delta,
  r_i its rescale factor and s = lambda / divisor folded into the coefficient, so the whole merge is one
  multiply-add pass per expert over `out` (the first expert writes `out` directly, no zeroing).
* **TIES combine** (sign election, mergekit's "sum" consensus on *weighted* deltas), in ONE pass over the
  experts with sign-split accumulators instead of mergekit's stack + mask:
  `S = sum_i c_i T_i` (elects the sign) and `P = sum_i c_i T_i [c_i T_i > 0]` (the positive part).
  The merged value is `P` where `S >= 0` and `S - P` (the negative part) where `S < 0`, because an
  entry agrees with the elected sign exactly when its weighted value has that sign; zero entries agree
  with nothing, as in mergekit (`sign(0) == 0`). With `normalize`, two more accumulators collect
  `sum_i w_i [c_i T_i != 0]` and `sum_i w_i [c_i T_i > 0]`; the divisor is the elected one of
  `DP` and `DA - DP`, with 0 replaced by 1 as in mergekit. Each delta is therefore read once, and random
  masks are drawn once and never stored.

Rounding differs from mergekit only in summation order/fusing (torch's `add_(alpha=)` may fuse the
multiply-add): results agree to ~1e-7 relative. An entry whose weighted sum is within rounding of 0
could elect a different sign than mergekit; for continuous data this has probability ~1e-7 per entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from .._recipe import ExpertParams
from ._base import Coefficient, MergeMethod, axpy_, scaled_into, total_weight_divisor
from ._magnitude import MagnitudeTable
from ._options import MethodOptions


class Scratch:
    """Lazily allocated work buffers shaped like `out`, reused across the experts of one merge call."""

    def __init__(self, like: torch.Tensor) -> None:
        self._like = like
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or torch.float32
        key = (name, dtype)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(self._like.shape, dtype=dtype, device=self._like.device)
            self._buffers[key] = buf
        return buf


Sparsified = tuple[torch.Tensor | None, Coefficient]
"""A sparsified task vector (None = all zero) and the rescale factor still to apply to it."""

Sparsifier = Callable[
    [torch.Tensor, ExpertParams, "MagnitudeTable | None", MethodOptions, "torch.Generator | None", Scratch, int],
    Sparsified,
]
"""(delta, params, table, options, generator, scratch, expert index) -> (T, rescale). T may be `delta`
itself (never modified) or a scratch buffer that stays valid until the next expert's call."""


def no_sparsify(
    delta: torch.Tensor,
    p: ExpertParams,
    table: MagnitudeTable | None,
    options: MethodOptions,
    generator: torch.Generator | None,
    scratch: Scratch,
    index: int,
) -> Sparsified:
    return delta, 1.0


def _times(coef: Coefficient, factor: float) -> Coefficient:
    return coef * factor


def linear_combine(
    out: torch.Tensor,
    items: Sequence[Sparsified],
    weights: Sequence[float],
    normalize: bool,
    lambda_: float,
) -> None:
    """out = lambda * sum_i w_i r_i T_i / (sum_i w_i if normalize): one pass per non-empty expert."""
    scale = lambda_ / total_weight_divisor(weights) if normalize else lambda_
    first = True
    for (tensor, rescale), w in zip(items, weights):
        if tensor is None or w == 0:
            continue
        coef = _times(rescale, w * scale)
        if first:
            scaled_into(out, tensor, coef)
            first = False
        else:
            axpy_(out, tensor, coef)
    if first:
        out.zero_()


def ties_combine(
    out: torch.Tensor,
    items: Sequence[Sparsified],
    weights: Sequence[float],
    normalize: bool,
    lambda_: float,
    scratch: Scratch,
) -> None:
    """Sign election on weighted deltas with sign-split accumulators (see module docstring)."""
    total = scratch.get("ties_sum")  # S
    positive = out  # P
    if normalize:
        div_all = scratch.get("ties_div_all")
        div_pos = scratch.get("ties_div_pos")
        flag = scratch.get("ties_flag", torch.bool)
    first = True
    for (tensor, rescale), w in zip(items, weights):
        if tensor is None or w == 0:
            continue  # contributes 0, and sign(0) never agrees: not in the divisor either
        coef = _times(rescale, w)
        part = scratch.get("ties_part", tensor.dtype)  # clamp cannot widen into another dtype
        # part = the entries of T whose weighted value is positive (T's own sign flipped for w < 0)
        if w > 0:
            torch.clamp(tensor, min=0, out=part)
        else:
            torch.clamp(tensor, max=0, out=part)
        if first:
            scaled_into(total, tensor, coef)
            scaled_into(positive, part, coef)
        else:
            axpy_(total, tensor, coef)
            axpy_(positive, part, coef)
        if normalize:
            torch.ne(tensor, 0, out=flag)
            if first:
                torch.mul(flag, w, out=div_all)
            else:
                div_all.add_(flag, alpha=w)
            torch.ne(part, 0, out=flag)
            if first:
                torch.mul(flag, w, out=div_pos)
            else:
                div_pos.add_(flag, alpha=w)
        first = False
    if first:
        out.zero_()
        return
    elected_positive = torch.ge(total, 0, out=scratch.get("ties_sign", torch.bool))
    negative = total.sub_(positive)  # S - P: the negative part
    torch.where(elected_positive, positive, negative, out=out)
    if normalize:
        div_neg = div_all.sub_(div_pos)
        divisor = torch.where(elected_positive, div_pos, div_neg, out=div_pos)
        divisor.masked_fill_(divisor == 0, 1)
        out.div_(divisor)
    if lambda_ != 1:
        out.mul_(lambda_)


class GeneralizedTaskArithmetic(MergeMethod):
    """Base of the task-vector methods; subclasses choose the sparsifier and the consensus."""

    consensus: ClassVar[bool] = False
    sparsifier: ClassVar[Sparsifier] = staticmethod(no_sparsify)  # type: ignore[assignment]
    uses = frozenset({"weight", "normalize", "lambda"})

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
        self._check_params(params, options)
        work = out if out.dtype in (torch.float32, torch.float64) else torch.empty_like(out, dtype=torch.float32)
        scratch = Scratch(work)
        weights = [float(p.weight) for p in params]
        sparsify = type(self).sparsifier
        if self.consensus:
            # Sparsified tensors may live in per-expert scratch, so the combine consumes them one by one.
            items = _lazy(sparsify, deltas, params, tables, options, generator, scratch)
            ties_combine(work, items, weights, options.normalize, options.lambda_, scratch)
        else:
            items = _lazy(sparsify, deltas, params, tables, options, generator, scratch)
            linear_combine(work, items, weights, options.normalize, options.lambda_)
        if work is not out:
            out.copy_(work)

    def _check_params(self, params: Sequence[ExpertParams], options: MethodOptions) -> None:
        """Method-specific parameter checks (DELLA's epsilon range)."""


class _lazy(Sequence[Sparsified]):
    """Sparsify expert i only when the combine reaches it, so one scratch buffer serves every expert."""

    def __init__(self, sparsify: Sparsifier, deltas, params, tables, options, generator, scratch) -> None:
        self._args = (sparsify, deltas, params, tables, options, generator, scratch)

    def __len__(self) -> int:
        return len(self._args[1])

    def __getitem__(self, i):  # type: ignore[override]
        raise TypeError("iterate, do not index")

    def __iter__(self):
        sparsify, deltas, params, tables, options, generator, scratch = self._args
        for i, (delta, p) in enumerate(zip(deltas, params)):
            table = tables[i] if tables is not None else None
            yield sparsify(delta, p, table, options, generator, scratch, i)
