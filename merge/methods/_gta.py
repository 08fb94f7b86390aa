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
import threading
from typing import ClassVar

import torch

from .._recipe import ExpertParams
from ._base import Coefficient, MergeMethod, axpy_, scaled_into, total_weight_divisor
from ._magnitude import MagnitudeTable
from ._options import MethodOptions


_POOL = threading.local()


def release_workspace() -> None:
    """Free this thread's pooled CPU work buffers (they are kept between calls, see `Scratch`)."""
    _POOL.buffers = {}


class Scratch:
    """Work buffers shaped like `out` for one merge call, named so each expert reuses the same ones.

    On CPU, buffers come from a per-thread pool kept between calls: a fresh multi-MiB allocation is
    mmap'ed by the C allocator and page-faulted on first write, which cost more than the merge itself
    (measured ~40 ms per 16 MiB buffer on a 4M-entry tensor, vs ~2 ms per elementwise pass). The pool
    holds, per (name, dtype), one buffer as large as the largest tensor merged so far (at most ~7
    buffers for TIES with normalize); `release_workspace()` frees it. On CUDA torch's caching allocator
    already reuses blocks, so plain allocations are used.
    """

    def __init__(self, like: torch.Tensor) -> None:
        self._like = like
        self._pooled = like.device.type == "cpu"
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or torch.float32
        key = (name, dtype)
        buf = self._buffers.get(key)
        if buf is None:
            shape, numel = self._like.shape, self._like.numel()
            if self._pooled:
                pool = getattr(_POOL, "buffers", None)
                if pool is None:
                    pool = _POOL.buffers = {}
                flat = pool.get(key)
                if flat is None or flat.numel() < numel:
                    flat = pool[key] = torch.empty(max(numel, 1), dtype=dtype)
                buf = flat[:numel].view(shape)
            else:
                buf = torch.empty(shape, dtype=dtype, device=self._like.device)
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
    """Sign election on weighted deltas with sign-split accumulators (see module docstring).

    CPU note: `torch.where` and bool-typed compares/adds are 5-20x slower than plain fp32 kernels in
    torch 2.x, so the selection uses `maximum`/`copysign` and 0/1 fp32 indicators instead.
    """
    total = scratch.get("ties_sum")  # S
    positive = out  # P
    if normalize:
        div_all = scratch.get("ties_div_all")  # sum of weights of the non-zero entries
        div_pos = scratch.get("ties_div_pos")  # sum of weights of the positively weighted entries
        flag = scratch.get("ties_flag")  # 0/1 fp32 indicator
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
    # Q = P - S = -(negative part) >= 0. S >= 0 elects P (and then Q <= P); S < 0 elects -Q (Q >= P).
    # So the merged value is copysign(max(P, Q), S); S == +0 elects +, as mergekit's `sum >= 0`.
    negated_negative = torch.sub(positive, total, out=scratch.get("ties_q"))
    torch.maximum(positive, negated_negative, out=out)
    if normalize:
        # divisor = DP where S >= 0 else DA - DP, selected with exact 0/1 products
        elected = torch.ge(total, 0, out=flag)
        div_neg = div_all.sub_(div_pos)
        div_pos.mul_(elected)
        div_neg.mul_(elected.sub_(1))  # -(DA - DP) where S < 0, -0 elsewhere
        divisor = div_pos.sub_(div_neg)
        divisor.add_(torch.eq(divisor, 0, out=flag))  # mergekit: divisor 0 -> 1
    torch.copysign(out, total, out=out)
    if normalize:
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
