"""Generalized task arithmetic: sparsify each task vector, weight, (optionally) elect signs, sum, normalize.

This is mergekit's `GeneralizedTaskArithmeticMerge` (task_arithmetic, ties, dare_*, breadcrumbs*, della*)
plus our `topk`, restructured so that no (n_experts, ...) stack is ever materialized:

* **Linear combine** (no consensus): `out = sum_i (w_i * r_i * s) * T_i` with T_i the sparsified delta,
  r_i its rescale factor and s = lambda / divisor folded into the coefficient, so the whole merge is one
  multiply-add pass per expert over `out` (the first expert writes `out` directly, no zeroing).
* **TIES combine** (sign election, mergekit's "sum" consensus on *weighted* deltas), in ONE pass over the
  experts with sign-split accumulators instead of mergekit's stack + mask: `S = sum_i x_i` (elects
  the sign), `P = sum_i x_i [x_i > 0]` and `N = sum_i x_i [x_i < 0]` with `x_i = c_i T_i`. The merged
  value is `P` where `S >= 0` and `N` where `S < 0`, because an entry agrees with the elected sign
  exactly when its weighted value has that sign; zero entries agree with nothing, as in mergekit
  (`sign(0) == 0`). With `normalize`, `DP = sum_i w_i [x_i > 0]` and `DN = sum_i w_i [x_i < 0]` give
  the divisor the same way, with 0 replaced by 1 as in mergekit. Each delta is read once, random masks
  are drawn once and never stored, and every sum adds mergekit's numbers in mergekit's order: TIES is
  bit-exact (fp32; tests/merge/test_methods_parity.py).

The linear combine folds `lambda / divisor` into the coefficients (one multiply-add per expert), so it
rounds differently from mergekit's sum-then-divide: ~1e-7 relative.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch

from .._recipe import ExpertParams
from ._draws import expert_keys
from ._base import ChunkPlan, Coefficient, MergeMethod, axpy_, chunks, scaled_into, total_weight_divisor
from ._magnitude import MagnitudeTable, SortKind
from ._options import MethodOptions
from ._rescale import restore_ratio
from ._scratch import release, scratch


def release_workspace() -> None:
    """Free this thread's pooled CPU work buffers (they are kept between calls, see `Scratch`)."""
    release()


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
                buf = scratch("cpu", max(numel, 1), f"gta.{name}", dtype)[:numel].view(shape)
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
    scale: float | None = None,
) -> None:
    """out = lambda * sum_i w_i r_i T_i / (sum_i w_i if normalize): one pass per non-empty expert.

    `scale` (= lambda / divisor) may be passed precomputed, as the chunked path does once per tensor."""
    if scale is None:
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
    """Sign election on weighted deltas, mergekit's arithmetic in one pass over the experts.

    With `x_i = c_i T_i` (c_i = rescale * weight) it accumulates, in expert order, `S = sum x_i`, the
    agreeing sums for either elected sign, `P = sum max(x_i, 0)` and `N = sum min(x_i, 0)`, and with
    `normalize` their weight sums `DP = sum w_i [x_i > 0]`, `DN = sum w_i [x_i < 0]`. The elected sign
    (S >= 0: +) then picks (P, DP) or (N, DN): every one of these sums adds the same numbers in the
    same order as mergekit's `(deltas * mask).sum(0)` and `(weights * mask).sum(0)` (the others add
    zeros, which change nothing), so the merge is mergekit's to the bit, signed zeros aside.

    CPU note: eager `torch.where` and bool-typed ops are slow, so selections are exact 0/1 fp32
    products (`v * 1 == v`, `v * 0 == 0`).
    """
    total = scratch.get("ties_sum")  # S
    positive = out  # P
    negative = scratch.get("ties_neg")  # N
    x = scratch.get("ties_x")
    part = scratch.get("ties_part")
    if normalize:
        div_pos = scratch.get("ties_div_pos")
        div_neg = scratch.get("ties_div_neg")
        flag = scratch.get("ties_flag")  # 0/1 fp32 indicator
    first = True
    for (tensor, rescale), w in zip(items, weights):
        if tensor is None or w == 0:
            continue  # contributes 0, and sign(0) never agrees: not in the divisor either
        scaled_into(x, tensor, _times(rescale, w))
        if first:
            total.copy_(x)
            torch.clamp(x, min=0, out=positive)
            torch.clamp(x, max=0, out=negative)
        else:
            total.add_(x)
            positive.add_(torch.clamp(x, min=0, out=part))
            negative.add_(torch.clamp(x, max=0, out=part))
        if normalize:
            for divisor, compare in ((div_pos, torch.gt), (div_neg, torch.lt)):
                compare(x, 0, out=flag)
                if first:
                    torch.mul(flag, w, out=divisor)
                else:
                    divisor.add_(flag, alpha=w)
        first = False
    if first:
        out.zero_()
        return
    elected = torch.ge(total, 0, out=part)  # 1 where S >= 0 (+ elected, as mergekit's `sum >= 0`)
    rejected = torch.sub(1, elected, out=x)
    positive.mul_(elected).add_(negative.mul_(rejected))  # out = P where S >= 0, else N
    if normalize:
        divisor = div_pos.mul_(elected).add_(div_neg.mul_(rejected))
        divisor.add_(torch.eq(divisor, 0, out=flag))  # mergekit: divisor 0 -> 1
        out.div_(divisor)
    if lambda_ != 1:
        out.mul_(lambda_)


class Spec:
    """One expert's sparsification, resolved once per tensor; `chunk` applies it to a flat chunk.

    `chunk(d, start, scratch)` returns the sparsified chunk (`d` itself, or a scratch buffer valid until
    the next expert's call), or None for all-zero. `rescale` is the factor still to apply (a float, or a
    0-dim tensor on the data's device). `zero` marks an expert that contributes nothing; `pending`
    one whose `rescale` (mergekit's L1 restore) needs a pass over its masked chunks first (`l1_rescale`).
    """

    zero = False
    random = False
    pending = False
    rescale: Coefficient = 1.0

    fix: torch.Tensor | None = None
    """Exact magnitude pruning with a split tie group: the flat indices where the spec's plain
    threshold or band decides the opposite of mergekit (in no particular order; `_ranks`). The fused
    kernels run the plain threshold, then merge these entries again with the decision flipped (`_fused._refix`)."""

    def chunk(self, d: torch.Tensor, start: int, scratch: Scratch) -> torch.Tensor | None:
        return d

    def keep_at(self, x: torch.Tensor, fixed: torch.Tensor | None) -> torch.Tensor:
        """This spec applied to `x`, the task vector gathered at some flat indices (only for specs
        whose plans may carry `fix` lists: dense, zero, thresholds and bands); `fixed` marks the
        gathered entries listed in `fix` (None: apply the plain threshold, as a fused kernel does)."""
        return x


class FixList:
    """A `fix` list sorted once, on first use by the eager chunked path (the fused path's
    kernels take the unsorted list: `_ranks.flagged`)."""

    def __init__(self, fix: torch.Tensor) -> None:
        self._fix = fix
        self._sorted: tuple[torch.Tensor, np.ndarray] | None = None

    def restore(self, out: torch.Tensor, d: torch.Tensor, start: int, drop: bool = False) -> torch.Tensor:
        """`out` with the entries of the chunk `d` (flat indices `start...`) in the list put back
        (`drop`: set to 0)."""
        if self._sorted is None:
            ordered = torch.sort(self._fix).values
            self._sorted = ordered, ordered.cpu().numpy()
        fix, bounds = self._sorted
        lo, hi = np.searchsorted(bounds, (start, start + d.numel()))
        if hi > lo:
            where = fix[lo:hi] - start
            out[where] = 0 if drop else d[where]
        return out


class DenseSpec(Spec):
    """Keep everything (density >= 1, or no sparsification)."""


class ZeroSpec(Spec):
    """Keep nothing."""

    zero = True

    def chunk(self, d: torch.Tensor, start: int, scratch: Scratch) -> torch.Tensor | None:
        return None


def trivial_spec(delta: torch.Tensor, density: float) -> Spec | None:
    """The spec a density decides alone: keep everything at density >= 1, nothing at <= 0 or for an
    empty tensor; None when the density needs the method's own sparsification."""
    if density >= 1:
        return DenseSpec()
    if density <= 0 or delta.numel() == 0:
        return ZeroSpec()
    return None


SpecBuilder = Callable[
    [torch.Tensor, ExpertParams, "MagnitudeTable | None", MethodOptions, "tuple[int, int] | None"], Spec
]
"""(delta, params, table, options, draw key) -> Spec, called once per (expert, tensor, merge call)."""


def dense_spec(delta: torch.Tensor, p: ExpertParams, table: MagnitudeTable | None, options: MethodOptions,
               key: tuple[int, int] | None) -> Spec:
    return DenseSpec()


class GtaPlan(ChunkPlan):
    """Per-chunk sparsify + combine for one tensor (specs, weights and scale resolved by `prepare`)."""

    def __init__(self, flats: list[torch.Tensor], specs: list[Spec], weights: list[float], consensus: bool,
                 options: MethodOptions) -> None:
        self.numel = flats[0].numel() if flats else 0
        self.flats = flats
        self.specs = specs
        self.weights = weights
        self.consensus = consensus
        self.normalize = options.normalize
        self.lambda_ = options.lambda_
        self.scale = options.lambda_ / total_weight_divisor(weights) if options.normalize else options.lambda_
        self.pending_rescale: tuple[Sequence[MagnitudeTable] | None, int] | None = None
        """(tables, chunk) while mergekit's L1 rescale factors are still to compute: deferred to the
        first run, so a fused runner (`_fused.FusedGta`) can compute them with its own pass-1 kernel."""

    def resolve_rescale(self) -> None:
        """Compute the pending L1 rescale factors eagerly (`l1_rescale`), once."""
        if self.pending_rescale is not None:
            tables, chunk = self.pending_rescale
            self.pending_rescale = None
            l1_rescale(self.specs, self.flats, tables, chunk, self.flats[0].device)

    def _items(self, start: int, stop: int, scratch: Scratch):
        for spec, flat in zip(self.specs, self.flats):
            if spec.zero:
                yield None, 1.0
            else:
                yield spec.chunk(flat[start:stop], start, scratch), spec.rescale

    def run(self, out: torch.Tensor, start: int, stop: int) -> None:
        self.resolve_rescale()
        scratch = Scratch(out)
        items = self._items(start, stop, scratch)
        if self.consensus:
            ties_combine(out, items, self.weights, self.normalize, self.lambda_, scratch)
        else:
            linear_combine(out, items, self.weights, self.normalize, self.lambda_, scale=self.scale)


def l1_rescale(specs: list[Spec], flats: list[torch.Tensor], tables: Sequence[MagnitudeTable] | None,
               chunk: int, device: torch.device) -> None:
    """mergekit's L1 restore for the pending specs, set in place: `|d|_1 / |d * mask|_1` (1 when either < 1e-7).

    Pass 1 of two: the masks are counter-based, so this pass recomputes them chunk by chunk (nothing is
    stored) and accumulates the kept L1 in fp64. (The engine's DARE tensors skip it: their kept L1
    comes from a `WindowL1`.)"""
    todo = [i for i, spec in enumerate(specs) if spec.pending and not spec.zero]
    if not todo:
        return
    numel = flats[0].numel()
    kept = {i: torch.zeros((), dtype=torch.float64, device=device) for i in todo}
    full = {i: torch.zeros((), dtype=torch.float64, device=device) for i in todo if tables is None}
    from ._base import chunk_buffer

    like = chunk_buffer(device, chunk, "l1_like")
    for start, stop in chunks(numel, chunk):
        scratch = Scratch(like[: stop - start])
        for i in todo:
            piece = flats[i][start:stop]
            masked = specs[i].chunk(piece, start, scratch)
            # fp64 per chunk: the factor then does not depend on the chunk length (to fp32 rounding)
            kept[i] += torch.linalg.vector_norm(masked, ord=1, dtype=torch.float64)
            if i in full:
                full[i] += torch.linalg.vector_norm(piece, ord=1, dtype=torch.float64)
    before = {i: tables[i].l1.to(torch.float64) if tables is not None else full[i] for i in todo}
    restore_factors(specs, kept, before, device)


def restore_factors(specs: list[Spec], kept: Mapping[int, torch.Tensor], before: Mapping[int, torch.Tensor],
                    device: torch.device) -> None:
    """Set `specs[i].rescale` to mergekit's L1 restore `before[i] / kept[i]` (fp64 L1 of the task vector
    and of its kept entries; 1 when either is below 1e-7), for every i in `kept`."""
    on_cpu = device.type == "cpu"
    for i, after in kept.items():
        factor = restore_ratio(before[i], after).to(torch.float32)
        specs[i].rescale = float(factor) if on_cpu else factor
        specs[i].pending = False


class GeneralizedTaskArithmetic(MergeMethod):
    """Base of the task-vector methods; subclasses choose the sparsifier and the consensus."""

    consensus: ClassVar[bool] = False
    spec: ClassVar[SpecBuilder] = staticmethod(dense_spec)  # type: ignore[assignment]
    sparsifier: ClassVar[Sparsifier] = staticmethod(no_sparsify)  # type: ignore[assignment]
    """Whole-tensor sparsifier, used only for `draws="mergekit"` (mergekit-identical generator use)."""
    uses = frozenset({"weight", "normalize", "lambda"})
    sort_kind: ClassVar[SortKind | None] = None
    """The one-time sort of a task vector this method's pruning reads (`MagnitudeTable.build_sort`):
    "desc" mergekit's top-k order, "asc" Breadcrumbs' order (both for exact pruning only), "rows"
    DELLA's row ranks; None: no sort."""

    def whole_tensor(self, options: MethodOptions) -> bool:
        return self.is_random and options.draws == "mergekit"

    def one_time_sort(self, p: ExpertParams, options: MethodOptions) -> SortKind | None:
        """The sort that merging a task vector with `p` under `options` reads, None if none: the engine
        runs every such sort of a run at once, several in parallel, before the first candidate
        (`MergeEngine.build_sorts`), rather than one by one inside the first merge."""
        kind = self.sort_kind
        if kind is None or not 0 < float(p.density) < 1 or self.whole_tensor(options):
            return None
        if kind != "rows" and options.pruning != "exact":
            return None
        return kind

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
        if self.whole_tensor(options):
            raise ValueError(f"{self.name} with draws='mergekit' runs on whole tensors: call merge()")
        self.check_params(params)
        weights = [float(p.weight) for p in params]
        flats = [d.reshape(-1) for d in deltas]
        keys = expert_keys(generator, len(deltas)) if self.is_random else [None] * len(deltas)
        build = type(self).spec
        specs = []
        for i, (delta, p, w) in enumerate(zip(deltas, params, weights)):
            table = tables[i] if tables is not None else None
            specs.append(ZeroSpec() if w == 0 else build(delta, p, table, options, keys[i]))
        plan = GtaPlan(flats, specs, weights, self.consensus, options)
        if any(s.pending and not s.zero for s in specs):
            plan.pending_rescale = (tables, chunk)
        return plan

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
        self.check_params(params)
        work = out if out.dtype in (torch.float32, torch.float64) else torch.empty_like(out, dtype=torch.float32)
        scratch = Scratch(work)
        weights = [float(p.weight) for p in params]
        sparsify = type(self).sparsifier
        # Sparsified tensors may live in per-expert scratch, so the combine consumes them one by one.
        items = _lazy(sparsify, deltas, params, tables, options, generator, scratch)
        if self.consensus:
            ties_combine(work, items, weights, options.normalize, options.lambda_, scratch)
        else:
            linear_combine(work, items, weights, options.normalize, options.lambda_)
        if work is not out:
            out.copy_(work)


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
