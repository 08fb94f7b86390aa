"""Fused, compiled per-chunk kernels for the task-arithmetic family (`torch.compile`, inductor).

Why: the eager chunked path (`GtaPlan.run`) runs ~20-35 elementwise ops per chunk for TIES/DARE-TIES,
each its own loop over a cache-resident chunk; on CPU that costs 5-30x a plain pass. One compiled
function per (method shape) does the whole merge of a chunk in one loop: per expert sparsify
(threshold / band / DARE hash mask), weight, combine (linear or TIES sign election), add the base,
cast, and write the target's slice. Measured on the 0.5B benchmark: docs/merge-engine.md.

Design rules:

* Per-expert values (thresholds, band limits, coefficients, weights, DARE keep bounds and hash keys,
  the chunk start, lambda) are passed as small tensors, so a new candidate never recompiles. A
  variant is keyed by the static structure only: (expert kinds, consensus, normalize, stats), and
  `dynamic=True` makes the chunk length symbolic; dtypes are specialised by dynamo (one compile each).
* The arithmetic mirrors the eager path op for op (`_gta.ties_combine`, `linear_combine`, the
  `Spec`s): thresholds are the same `_strict_below` values hardshrink uses, DARE masks are the same
  lowbias32 integer ops on the global element index (`_draws.hash_bits`), so masks are bit-identical
  and results differ from eager only by fused multiply-add rounding (~1e-7 relative).
* 0/1 indicators are `torch.where` selects, never `mask.float() * x`: inductor's AVX-512 mask -> fp32
  conversions cost more than the arithmetic (DARE-TIES -7%, measured per pass, docs/merge-engine.md).
  `where(keep, x, x * 0)` and `where(c, w, w * 0)` give the same values, signed zeros included, so
  results are bit-identical to the `mask * x` form.
* A failing compile (no C++ compiler, unsupported platform, ...) never crashes a run: the first call
  of each variant is guarded, the failure disables fusing for the process with ONE warning, and the
  caller falls back to the eager chunked path (`FusedUnavailable`).

DELLA/DELLA-linear (per tensor, not packed): each DELLA expert's row ranks are streamed beside its
delta (`ranks`, widened to int32 per chunk: a loop that loads int16 is not vectorized), and its
keep bound `A + B * rank` is the eager path's wrapping int32 line (`line`, `_della.keep_line`), so
the masks are the eager path's. mergekit's L1 restore runs one reading pass first (`_make_l1_kernel`).
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable, Sequence

import torch

from ._base import chunks
from ._breadcrumbs import BandSpec, TieBandSpec
from ._dare import DareSpec
from ._della import DellaSpec
from ._draws import _M1, _M2, _M3, _s32
from ._gta import DenseSpec, GtaPlan, ZeroSpec, restore_factors
from ._magnitude import _strict_below
from ._ranks import STAMP_LISTS, flagged, stamp
from ._scratch import scratch
from ._ties import ThresholdSpec, TieThresholdSpec

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Delta / target dtypes the kernels take (fp64 stays eager: fp32 math would lose precision)."""

_INT32_MIN = -(1 << 31)
_KERNELS: dict[tuple, Callable] = {}
_READY: set[tuple] = set()
_DISABLED: list[str] = []  # the reason, once a compile failed in this process


class FusedUnavailable(RuntimeError):
    """Compiling a fused kernel failed (reason in the message); use the eager chunked path."""


def disabled_reason() -> str | None:
    """Why fused kernels are off in this process (a compile failed), or None."""
    return _DISABLED[0] if _DISABLED else None


def _field_hash(index: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    """`_draws.field_hash` on int32 tensors: the same wrap-around ops, so the same bits."""
    h = (index + k0) * _M1
    h = h ^ k1
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _M2
    h = h ^ ((h >> 15) & 0x1FFFF)
    return h * _M3


_DRAWN = ("dare", "della", "della_paper")
"""Kinds that hash each entry's element index."""


def _weighted(kinds: tuple[str, ...], deltas: Sequence[torch.Tensor], coef: torch.Tensor, lo: torch.Tensor,
              hi: torch.Tensor, bound: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, shift: torch.Tensor,
              start: torch.Tensor, flipped: tuple[int, ...] = (), flips: torch.Tensor | None = None,
              ranks: Sequence[torch.Tensor] = (), line: torch.Tensor | None = None,
              stamp: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Each expert's sparsified chunk times its coefficient, in fp32: the eager `Spec.chunk` times
    `coef` (dropped entries are +0 here; eager's `mask * x` may give -0, which no sum or election
    tells apart from +0). `flipped[i]` (exact top-k, a split tie group): expert i's bit in `flips`,
    set where its plain threshold decides the opposite of mergekit (`_ranks.flagged`: the variants
    that re-merge those few entries, see `_refix`), or with `stamp` (the variant that flips them in
    its one pass) the bit offset + 1 of expert i's byte in `flips`, equal to `stamp` there
    (`_ranks.stamp`). `ranks`: the row ranks of
    the DELLA experts (int32), in expert order; `line`: (2, experts) int32, each DELLA expert's
    keep line (`_della.keep_line`)."""
    index = None
    out = []
    della = iter(ranks)
    for i, (kind, d) in enumerate(zip(kinds, deltas)):
        x = d.float()
        if kind in _DRAWN and index is None:
            index = torch.arange(d.shape[-1], dtype=torch.int32, device=d.device) + start
        if kind.startswith("della"):
            assert line is not None and index is not None
            keep, della_bound = _della_keep(index, k0[i], k1[i], next(della), line[0, i], line[1, i])
            if kind == "della_paper":  # each survivor over its keep probability, fl32(1 / fl32(p)) as eager
                x = x * (1.0 / ((della_bound.long() + 2**31).float() * 2.0**-32))
        else:
            keep = _keep(kind, x, lo[i], hi[i], bound[i], k0[i], k1[i], shift[i], index)
        if flipped and flipped[i]:  # a threshold or band ("thr"/"band": keep is not None)
            listed = ((flips >> (flipped[i] - 1)) & 255) == stamp if stamp is not None else (flips & flipped[i]) != 0
            keep = keep ^ listed
        # select, then weight: measured a few % faster than the other order (inductor, AVX-512)
        out.append((x if keep is None else torch.where(keep, x, 0.0)) * coef[i])
    return out


def _della_keep(index: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, rank: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DELLA's fast draws (`_della.DellaSpec.chunk`): `hash_bits < a + b * rank` in wrapping int32
    (`_della.keep_line`); also that bound, for the keep probability of the paper's rescale."""
    h = _field_hash(index, k0, k1)
    h = h ^ ((h >> 16) & 0xFFFF)  # `_draws.hash_bits`
    bound = a + rank * b
    return h < bound, bound


def _keep(kind: str, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bound: torch.Tensor, k0: torch.Tensor,
          k1: torch.Tensor, shift: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor | None:
    """Which entries of one expert's fp32 chunk `x` survive its sparsification (None: all)."""
    if kind == "dense":
        return None
    if kind == "thr":  # hardshrink(lo): keep |x| > lo
        return x.abs() > lo
    if kind == "band":  # hardshrink(lo) - hardshrink(hi)
        a = x.abs()
        return (a > lo) & ~(a > hi)
    assert index is not None
    return _in_window(index, k0, k1, shift, bound)


def _in_window(index: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, shift: torch.Tensor,
               bound: torch.Tensor) -> torch.Tensor:
    """DARE: whether each entry's field bucket lies in the window (`_draws.window_bounds`)."""
    return _field_hash(index, k0, k1) - shift < bound


def _make_kernel(kinds: tuple[str, ...], consensus: bool, normalize: bool, stats: bool,
                 packed: bool = False, flipped: tuple[int, ...] = (), segments: bool = False) -> Callable:
    """The eager function of one variant (compiled by `_call`; also runnable as is).

    `packed`: the chunk spans many tensors (`PackedGta`): inputs are (rows, block) with each row in one
    tensor, every per-expert value an (experts, rows) table and `start` each row's first element index
    within its tensor, all gathered per row by the caller (`PackedGta.apply`). The kernel's loads of
    them are affine, one scalar per row, outside the vectorized loop over the block (a per-entry
    gather measured 3x slower: inductor scalarizes it; an in-kernel lookup through each row's segment
    id kept a bounds check and a dependent load in the inner loop).
    `segments`: flat entries of many tensors (`PackedGta._refix`: a few thousand), each looking its
    values up in the (experts, segments) tables through `seg`, its segment (an indirect load per
    entry and value: fine for that few, and no tables gathered per entry beforehand)."""

    def kernel(out: torch.Tensor, base: torch.Tensor, deltas: list[torch.Tensor], lo: torch.Tensor,
               hi: torch.Tensor, coef: torch.Tensor, weight: torch.Tensor, bound: torch.Tensor, k0: torch.Tensor,
               k1: torch.Tensor, shift: torch.Tensor, start: torch.Tensor, lam: torch.Tensor,
               flips: torch.Tensor | None = None, seg: torch.Tensor | None = None,
               ranks: Sequence[torch.Tensor] = (), line: torch.Tensor | None = None,
               stamp: torch.Tensor | None = None):
        if segments:
            lo, hi, coef, weight, bound, k0, k1, shift = (t[:, seg] for t in (lo, hi, coef, weight, bound, k0, k1, shift))
        if packed:
            lo, hi, coef, weight, bound, k0, k1, shift = (t[:, :, None] for t in (lo, hi, coef, weight, bound, k0, k1, shift))
            start = start[:, None]
        xs = _weighted(kinds, deltas, coef, lo, hi, bound, k0, k1, shift, start, flipped, flips, ranks, line, stamp)
        if not consensus:  # linear_combine: coef = rescale * w * lambda / divisor
            merged = xs[0]
            for x in xs[1:]:
                merged = merged + x
        else:  # ties_combine's values (see its docstring): the agreeing entries and weights, in expert order
            total = xs[0]
            for x in xs[1:]:
                total = total + x
            plus = total >= 0
            merged = divisor = None
            for i, x in enumerate(xs):
                agree = torch.where(plus, x > 0, x < 0)
                kept = torch.where(agree, x, 0.0)
                merged = kept if merged is None else merged + kept
                if normalize:
                    w = torch.where(agree, weight[i], 0.0)
                    divisor = w if divisor is None else divisor + w
            if normalize:
                merged = merged / torch.where(divisor == 0, 1.0, divisor)
            merged = merged * lam
        out.copy_(base.float() + merged)
        if stats:
            return (merged != 0).sum(), merged.double().abs().sum()
        return None

    return kernel


def _make_l1_kernel(count: int) -> Callable:
    """mergekit's L1 restore for DELLA experts (`_gta.l1_rescale`'s pass 1, fused): each expert's kept
    |x| summed in fp64 over one chunk, the masks drawn as the merge kernel draws them."""

    def kernel(deltas: list[torch.Tensor], k0: torch.Tensor, k1: torch.Tensor, start: torch.Tensor,
               ranks: list[torch.Tensor], line: torch.Tensor) -> torch.Tensor:
        index = torch.arange(deltas[0].shape[-1], dtype=torch.int32, device=deltas[0].device) + start
        sums = []
        for i in range(count):
            keep, _ = _della_keep(index, k0[i], k1[i], ranks[i], line[0, i], line[1, i])
            sums.append(torch.where(keep, deltas[i].float().abs(), 0.0).double().sum())
        return torch.stack(sums)

    return kernel


def _call(key: tuple, build: Callable[[], Callable], *args, **kwargs):
    """Run variant `key`, compiling it on first use; a failing first call disables fusing."""
    if _DISABLED:
        raise FusedUnavailable(_DISABLED[0])
    fn = _KERNELS.get(key)
    if fn is None:
        fn = _KERNELS[key] = torch.compile(_own_code(build(), len(_KERNELS)), dynamic=True)
    if key in _READY:
        return fn(*args, **kwargs)
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # compile failures come in many types (BackendCompilerFailed, InductorError, OSError)
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        _DISABLED.append(reason)
        warnings.warn(f"evomerge: torch.compile of the fused merge kernels failed, using the eager chunked path ({reason})",
                      RuntimeWarning, stacklevel=3)
        raise FusedUnavailable(reason) from None
    _READY.add(key)
    return result


def _own_code(fn: Callable, serial: int) -> Callable:
    """`fn` with a code object of its own: dynamo caches compiled graphs per code object (at most
    `recompile_limit` = 8), and every variant's closure shares `kernel`'s code, so without this the
    9th variant in a process would silently run uncompiled."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{serial}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class FusedGta:
    """A `GtaPlan` compiled into one fused kernel per chunk: `target = (base + merged).to(dtype)`.

    Built by `FusedGta.of(plan)` (None when the plan is not fusable: fp64, DELLA, CUDA-cached
    tensor coefficients are fine, non-chunkable methods are not GtaPlans to begin with).
    """

    inline_fixes = 1 / 256
    """Exact top-k with split tie groups: above this fraction of the tensor's entries listed
    (`Spec.fix`, summed over experts; at most `STAMP_LISTS` lists) the kernel reads a mark array
    (`_ranks.stamp`) and flips the listed decisions in its one pass: ~3-5 ns per listed entry to
    stamp, and the kernel's read of 4 more bytes per entry (~0.1 ns per entry on 2 AVX-512 threads:
    10.5 ms against 8.6 ms over 16.4M bf16 entries with 3 experts, whole-tensor calls); at or below
    it the plain kernel runs and the listed entries are merged again (`_refix`: ~30-110 ns per listed
    entry of random reads and writes, more under memory contention). Break-even is ~0.3% listed;
    1/256 keeps the random path to the sparse lists (fp32 task vectors, whose tie groups are small)."""

    def __init__(self, plan: GtaPlan, kinds: tuple[str, ...], experts: list[int]) -> None:
        self.plan = plan
        self.kinds = kinds
        self.experts = experts
        device = plan.flats[0].device
        specs = [plan.specs[i] for i in experts]
        self.deltas = [plan.flats[i] for i in experts]
        lo, hi, bound, k0, k1, shift = zip(*(_encode(spec, d.dtype) for spec, d in zip(specs, self.deltas)))
        della = [isinstance(spec, DellaSpec) for spec in specs]
        self.ranks = [spec.ranks for spec in specs if isinstance(spec, DellaSpec)]
        """The DELLA experts' flat row ranks (`MagnitudeTable.row_ranks`), streamed beside their deltas."""
        self.line = torch.tensor([[spec.line[0] if d else 0 for spec, d in zip(specs, della)],
                                  [spec.line[1] if d else 0 for spec, d in zip(specs, della)]],
                                 dtype=torch.int32, device=device) if self.ranks else None
        # Two tensors, each viewed per row: this runs per tensor and candidate, and each torch.tensor
        # call costs ~5 us (seven of them were ~10% of the planning of a 0.5B merge).
        floats = torch.tensor([lo, hi, [plan.weights[i] for i in experts], [plan.lambda_] * len(experts)],
                              dtype=torch.float32, device=device)
        ints = torch.tensor([bound, k0, k1, shift, [0] * len(experts)], dtype=torch.int32, device=device)
        self.lo, self.hi, self.weight, lam = floats.unbind(0)
        self.lam = lam[0]
        self.bound, self.k0, self.k1, self.shift, start = ints.unbind(0)
        self._start = start[0]
        self.coef: torch.Tensor | None = None

    @classmethod
    def of(cls, plan: object) -> "FusedGta | None":
        """The fused form of `plan`, or None when it has none (eager path)."""
        if not isinstance(plan, GtaPlan) or not plan.flats or plan.numel == 0:
            return None
        if any(f.dtype not in FUSED_DTYPES or not f.is_contiguous() for f in plan.flats):
            return None
        kinds, experts = [], []
        for i, (spec, w) in enumerate(zip(plan.specs, plan.weights)):
            if spec.zero or w == 0:
                continue  # contributes nothing, eager skips it too
            kind = {DenseSpec: "dense", ThresholdSpec: "thr", BandSpec: "band", DareSpec: "dare",
                    TieThresholdSpec: "thr", TieBandSpec: "band"}.get(type(spec))  # ties: re-merged after (`_refix`)
            if isinstance(spec, DellaSpec):
                kind = "della_paper" if spec.paper else "della"
            if kind is None:
                return None  # any future spec: eager
            kinds.append(kind)
            experts.append(i)
        if not experts:
            return None  # all-zero merge: eager writes the base, nothing to fuse
        return cls(plan, tuple(kinds), experts)

    def _set_start(self, start: int) -> torch.Tensor:
        self._start.fill_(_s32(start))
        return self._start

    def _resolve_rescale(self, chunk: int) -> None:
        """The coefficients, after mergekit's pending L1 rescale factors: DELLA's by a fused reading
        pass (`_della_l1`), others by an eager one (only plans without tables, or with tables that
        name no task vector, leave them pending: the engine's tables give every DARE tensor a `WindowL1`)."""
        plan = self.plan
        if plan.pending_rescale is not None and plan.pending_rescale[0] is not None:
            self._della_l1(plan.pending_rescale[0], chunk)
        plan.resolve_rescale()
        consensus, scale = plan.consensus, plan.scale
        coefs = [plan.specs[i].rescale * (plan.weights[i] if consensus else plan.weights[i] * scale)
                 for i in self.experts]
        if all(isinstance(c, float) for c in coefs):  # CPU: rescale factors are Python floats
            self.coef = torch.tensor(coefs, dtype=torch.float32, device=self.lam.device)
        else:  # CUDA: pending factors stay tensors on the device (no sync)
            self.coef = torch.stack([torch.as_tensor(c, dtype=torch.float32, device=self.lam.device).reshape(())
                                     for c in coefs])

    def _della_l1(self, tables: Sequence[object], chunk: int) -> None:
        """mergekit's L1 restore factors of the pending DELLA experts, their kept L1 summed by one
        compiled pass over their deltas and ranks (what `_gta.l1_rescale` computes eagerly)."""
        plan = self.plan
        todo = [j for j, i in enumerate(self.experts) if isinstance(plan.specs[i], DellaSpec) and plan.specs[i].pending]
        if not todo:
            return
        picked = [self.experts[j] for j in todo]
        ranks = [plan.specs[i].ranks for i in picked]  # type: ignore[attr-defined]
        deltas = [self.deltas[j] for j in todo]
        k0, k1 = self.k0[todo], self.k1[todo]
        line = self.line[:, todo]
        key = ("della_l1", len(todo), tuple(d.dtype for d in deltas))
        kept = None
        for lo, hi in chunks(plan.numel, chunk):
            sums = _call(key, lambda: _make_l1_kernel(len(todo)), [d[lo:hi] for d in deltas], k0, k1,
                         self._set_start(lo), _wide_ranks(ranks, lo, hi), line)
            kept = sums if kept is None else kept + sums
        assert kept is not None
        restore_factors(plan.specs, {i: kept[j] for j, i in enumerate(picked)},
                        {i: tables[i].l1.to(torch.float64) for i in picked}, kept.device)  # type: ignore[attr-defined]

    def apply(self, out: torch.Tensor, base: torch.Tensor, chunk: int,
              stats: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Write `(base + merged).to(out.dtype)` into the flat `out`, chunk by chunk, in one kernel each.

        Returns (changed entries, L1 of the merged task vector, fp64) when `stats`, else None.
        Raises `FusedUnavailable` when a kernel cannot be compiled (before writing anything, or, for
        the split tie groups' variant, after the plain pass: the caller's eager path rewrites `out`).
        """
        if self.coef is None:
            self._resolve_rescale(chunk)
        key = ("gta", self.kinds, self.plan.consensus, self.plan.normalize, stats,
               tuple(d.dtype for d in self.deltas), base.dtype, out.dtype)
        fixes = [self.plan.specs[i].fix for i in self.experts]
        offsets, marks, stamped = _stamp_dense(fixes, self.plan.numel, self.inline_fixes)
        if marks is not None:
            key = key + ("stamped", offsets, marks.dtype)
        build = lambda: _make_kernel(self.kinds, self.plan.consensus, self.plan.normalize, stats,  # noqa: E731
                                     flipped=offsets)
        nnz = l1 = None
        for lo, hi in chunks(self.plan.numel, chunk):
            extra = {} if marks is None else {"flips": marks[lo:hi], "stamp": stamped}
            if self.line is not None:
                extra.update(ranks=_wide_ranks(self.ranks, lo, hi), line=self.line)
            result = _call(key, build, out[lo:hi], base[lo:hi], [d[lo:hi] for d in self.deltas], self.lo,
                           self.hi, self.coef, self.weight, self.bound, self.k0, self.k1, self.shift,
                           self._set_start(lo), self.lam, **extra)
            if stats:
                nnz = result[0] if nnz is None else nnz + result[0]
                l1 = result[1] if l1 is None else l1 + result[1]
        if marks is None and any(fix is not None for fix in fixes):
            flip_bits, index, flags = flagged(fixes, self.plan.numel, distinct=stats)
            params = (self.lo, self.hi, self.coef, self.weight, self.bound, self.k0, self.k1, self.shift,
                      self._set_start(0), self.lam)  # start: DARE only, never in a plan with fixes
            build = lambda: _make_kernel(self.kinds, self.plan.consensus, self.plan.normalize, stats,  # noqa: E731
                                         flipped=flip_bits)
            change = _refix(key + (flip_bits, flags.dtype), build, out, base, self.deltas, index, flags, params,
                            stats)
            if stats:
                nnz, l1 = nnz + change[0], l1 + change[1]
        return (nnz, l1) if stats else None


def _stamp_dense(fixes: Sequence[torch.Tensor | None], numel: int,
                 fraction: float) -> tuple[tuple[int, ...], torch.Tensor | None, torch.Tensor | None]:
    """Exact top-k's split tie groups stamped for a kernel that flips them in its one pass
    (`_ranks.stamp`) when they list more than `fraction` of the `numel` entries
    (`FusedGta.inline_fixes`) in at most `STAMP_LISTS` lists; else ((), None, None): the plain
    pass, then `_refix` if any are listed."""
    lists = sum(fix is not None for fix in fixes)
    listed = sum(fix.numel() for fix in fixes if fix is not None)
    if 0 < lists <= STAMP_LISTS and listed > numel * fraction:
        return stamp(fixes, numel)
    return (), None, None


def _wide_ranks(ranks: Sequence[torch.Tensor], lo: int, hi: int) -> list[torch.Tensor]:
    """The chunk `[lo, hi)` of each DELLA expert's row ranks as int32, in pooled buffers: inductor
    does not vectorize a loop that loads int16 (the whole kernel ran scalar, ~3x slower than the eager
    ops), and the copy is one cache-resident pass per chunk."""
    out = []
    for j, r in enumerate(ranks):
        piece = r[lo:hi]
        if piece.dtype != torch.int32:
            piece = scratch(piece.device, hi - lo, f"della.ranks{j}", torch.int32).copy_(piece)
        out.append(piece)
    return out


def _refix(key: tuple, build: Callable[[], Callable], out: torch.Tensor, base: torch.Tensor,
           deltas: Sequence[torch.Tensor], index: torch.Tensor, flags: torch.Tensor, params: Sequence[torch.Tensor],
           stats: bool, *extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact top-k's split tie groups: merge the flat entries `index` of `out` again, with the
    decisions of the experts whose bits are set in `flags` flipped (`_ranks.flagged`), and write them.

    The main pass merged every entry with the plain thresholds; these entries (the listed boundary
    members, ~0.1-1% of a bf16 tensor) are gathered, merged by the variant `key` with flips (the same
    arithmetic, so the same values as flipping in the main pass) and scattered back. `params`: the
    kernel's inputs after the deltas (per-expert values: (experts,), or (experts, segments) tables).
    `extra`: inputs after the flips (the segments of `_make_kernel(segments=True)`).
    Returns the change of the stats (changed entries, fp64 L1) against the main pass when `stats`,
    from a second call without flips."""
    picked_base = base.reshape(-1).index_select(0, index)
    picked = [d.reshape(-1).index_select(0, index) for d in deltas]
    fixed = torch.empty(picked_base.shape, dtype=out.dtype, device=out.device)
    result = _call(key, build, fixed, picked_base, picked, *params, flags, *extra)
    change = None
    if stats:
        plain = _call(key, build, torch.empty_like(fixed), picked_base, picked, *params, torch.zeros_like(flags),
                      *extra)
        change = (result[0] - plain[0], result[1] - plain[1])
    out.view(-1).index_copy_(0, index, fixed.view(-1))
    return change


def _encode(spec: object, dtype: torch.dtype) -> tuple[float, float, int, int, int, int]:
    """One expert's spec as the kernel reads it: (lo, hi, bound, k0, k1, shift).

    lo/hi: keep `lo < |x|` and not `hi < |x|` (kinds "thr", "band"; lo = -1 keeps all, inf none);
    bound, k0, k1, shift: DARE keeps where `field_hash(k0, k1, index) - shift < bound` (INT32_MIN keeps none)."""
    if isinstance(spec, ThresholdSpec):
        return _keep_above(spec.threshold, dtype), math.inf, 0, 0, 0, 0
    if isinstance(spec, BandSpec):
        return _keep_above(spec.lo, dtype), spec.hi, 0, 0, 0, 0
    if isinstance(spec, DareSpec):
        return 0.0, math.inf, spec.bound, _s32(spec.key[0]), _s32(spec.key[1]), spec.shift
    if isinstance(spec, DellaSpec):  # its keep line comes separately (`FusedGta.line`)
        return 0.0, math.inf, 0, _s32(spec.key[0]), _s32(spec.key[1]), 0
    if getattr(spec, "zero", False):
        return math.inf, math.inf, _INT32_MIN, 0, 0, 0
    return -1.0, math.inf, 0, 0, 0, 0  # DenseSpec


_ZERO = ZeroSpec()
_SPEC_KIND = {DenseSpec: "dense", ThresholdSpec: "thr", BandSpec: "band", DareSpec: "dare",
              TieThresholdSpec: "thr", TieBandSpec: "band"}  # split tie groups: re-merged after (`_refix`)


def _shared_kind(kinds: set[str]) -> str | None:
    """The one kernel kind that computes each of `kinds` exactly (None: they cannot share a kernel).

    Dense is a threshold of -1 and a threshold a band without upper bound, so those three share
    the widest of them; DARE needs every segment to draw (a dense DARE expert has no int32 bound)."""
    for kind, covers in (("dense", {"dense"}), ("thr", {"dense", "thr"}), ("band", {"dense", "thr", "band"}),
                         ("dare", {"dare"})):
        if kinds <= covers:
            return kind
    return None


class PackedGta:
    """Many small tensors' `GtaPlan`s merged by ONE fused kernel call over their packed storage.

    The caller packs the tensors row-aligned (`merge/_packed.py`: base, each expert's task vector and
    the output, one (rows, block) buffer each) and passes one plan per segment (tensor); per-expert
    values become (experts, segments) tables that the kernel looks up through each row's segment
    id. Values are exactly those of the
    per-tensor kernel (`FusedGta`): the same encodings, the same arithmetic, DARE hashed on each
    tensor's own element index. A segment whose plan cannot join (no plan: keep the base; another
    method; mergekit's pending L1 rescale; other lambda/normalize/consensus) gets zero coefficients,
    so the kernel writes its base there, and is left to the caller (`handled` is False for it).
    """

    def __init__(self, handled: list[bool], experts: list[int], kinds: tuple[str, ...], consensus: bool,
                 normalize: bool, tables: dict[str, torch.Tensor], lam: float, row_starts: torch.Tensor,
                 fixes: list[list[tuple[int, torch.Tensor]]]) -> None:
        self.handled = handled
        self.experts = experts
        """Arena indices of the experts that contribute somewhere (the others are not even read)."""
        self.kinds = kinds
        self.consensus = consensus
        self.normalize = normalize
        self.tables = tables
        self.lam = torch.tensor(lam, dtype=torch.float32, device=row_starts.device)
        self.row_starts = row_starts
        self.fixes = fixes
        """Per contributing expert, its (segment, `fix` list) pairs: exact top-k's split tie groups."""

    @classmethod
    def of(cls, segments: Sequence[tuple[object, Sequence[int]] | None], n_experts: int,
           row_starts: torch.Tensor) -> "PackedGta | None":
        """`segments[s]` = (plan, the arena expert index of each of the plan's experts), or None.

        None when no segment can join or the joining ones' specs cannot share one kernel."""
        joined: list[tuple[int, GtaPlan, Sequence[int]]] = []
        first: GtaPlan | None = None
        for s, item in enumerate(segments):
            if item is None or not isinstance(item[0], GtaPlan):
                continue
            plan, experts = item
            if plan.pending_rescale is not None:
                continue  # mergekit's L1 rescale without a `WindowL1` (tables that name no task vector): per tensor
            if any(type(spec) not in _SPEC_KIND for spec in plan.specs if not spec.zero):
                continue  # DELLA's per-entry probabilities: the per-tensor path
            if first is None:
                first = plan
            elif (plan.consensus, plan.normalize, plan.lambda_) != (first.consensus, first.normalize, first.lambda_):
                continue
            joined.append((s, plan, experts))
        if first is None:
            return None
        seen: list[set[str]] = [set() for _ in range(n_experts)]
        for _, plan, experts in joined:
            for spec, w, e in zip(plan.specs, plan.weights, experts):
                if not spec.zero and w != 0:
                    seen[e].add(_SPEC_KIND[type(spec)])
        live = [e for e in range(n_experts) if seen[e]]
        if not live:
            return None  # every joined tensor keeps its base: the per-tensor path copies it
        kinds = tuple(_shared_kind(seen[e]) for e in live)
        if None in kinds:
            return None  # one expert both drawn (DARE) and thresholded across tensors: per tensor
        row = {e: r for r, e in enumerate(live)}
        n_seg = len(segments)
        fields = ("lo", "hi", "bound", "k0", "k1", "shift", "coef", "weight")
        nothing = _encode(_ZERO, torch.float32) + (0.0, 0.0)
        columns = [[[v] * n_seg for _ in live] for v in nothing]  # per field: (experts, segments)
        handled = [False] * n_seg
        fixes: list[list[tuple[int, torch.Tensor]]] = [[] for _ in live]
        for s, plan, experts in joined:
            handled[s] = True
            for spec, w, e, flat in zip(plan.specs, plan.weights, experts, plan.flats):
                if spec.zero or w == 0:
                    continue
                coef = float(spec.rescale) * (w if plan.consensus else w * plan.scale)
                r = row[e]
                for column, v in zip(columns, _encode(spec, flat.dtype) + (coef, w)):
                    column[r][s] = v
                if spec.fix is not None:
                    fixes[r].append((s, spec.fix))
        device = row_starts.device
        dtypes = {"bound": torch.int32, "k0": torch.int32, "k1": torch.int32, "shift": torch.int32}
        tables = {name: torch.tensor(v, dtype=dtypes.get(name, torch.float32), device=device)
                  for name, v in zip(fields, columns)}
        return cls(handled, live, kinds, first.consensus, first.normalize, tables, first.lambda_, row_starts, fixes)

    def apply(self, out: torch.Tensor, base: torch.Tensor, deltas: Sequence[torch.Tensor], segment: torch.Tensor,
              row_first: torch.Tensor, chunk: int, stats: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`out = (base + merged).to(out.dtype)` over the packed buffers, one kernel call per chunk.

        `out`, `base`, `deltas` (one per arena expert): (rows, block) views, each row inside one tensor;
        `segment`: each row's segment (int32); `row_first`: each row's first element index within its
        tensor (int32); `chunk`: entries per call (rounded to whole rows).
        Returns (changed entries, fp64 L1 of the merged task vector) when `stats`, else None.
        Raises `FusedUnavailable` (before writing anything) when the kernel cannot be compiled."""
        deltas = [deltas[e] for e in self.experts]
        # each (experts, segments) table gathered per row once per apply: a few small eager ops
        t = {name: table.index_select(1, segment) for name, table in self.tables.items()}
        block = out.shape[1]
        key = ("packed", self.kinds, self.consensus, self.normalize, stats, tuple(d.dtype for d in deltas),
               base.dtype, out.dtype)
        lists = self._arena_lists(block, out.device) if any(self.fixes) else []
        offsets, marks, stamped = _stamp_dense(lists, out.numel(), FusedGta.inline_fixes)
        if marks is not None:
            key = key + ("stamped", offsets, marks.dtype)
            marks = marks.view(out.shape)
        build = lambda: _make_kernel(self.kinds, self.consensus, self.normalize, stats, packed=True,  # noqa: E731
                                     flipped=offsets)
        nnz = l1 = None
        for lo, hi in chunks(out.shape[0], max(1, chunk // block)):
            extra = {} if marks is None else {"flips": marks[lo:hi], "stamp": stamped}
            result = _call(key, build, out[lo:hi], base[lo:hi], [d[lo:hi] for d in deltas],
                           *(t[name][:, lo:hi] for name in ("lo", "hi", "coef", "weight", "bound", "k0", "k1", "shift")),
                           row_first[lo:hi], self.lam, **extra)
            if stats:
                nnz = result[0] if nnz is None else nnz + result[0]
                l1 = result[1] if l1 is None else l1 + result[1]
        if marks is None and any(fix is not None for fix in lists):
            change = self._refix(out, base, deltas, lists, segment, row_first, stats)
            if stats:
                nnz, l1 = nnz + change[0], l1 + change[1]
        return (nnz, l1) if stats else None

    def _arena_lists(self, block: int, device: torch.device) -> list[torch.Tensor | None]:
        """Per contributing expert its split tie groups' `fix` lists moved to arena offsets (one
        concatenation per expert; None: no list)."""
        starts = self.row_starts.tolist()
        lists: list[torch.Tensor | None] = []
        for pieces in self.fixes:
            if not pieces:
                lists.append(None)
                continue
            listed = torch.cat([fix for _, fix in pieces]) if len(pieces) > 1 else pieces[0][1]
            offsets = torch.tensor([starts[s] * block for s, _ in pieces], dtype=torch.long, device=device)
            lengths = torch.tensor([fix.numel() for _, fix in pieces], dtype=torch.long, device=device)
            lists.append(listed + torch.repeat_interleave(offsets, lengths))
        return lists

    def _refix(self, out: torch.Tensor, base: torch.Tensor, deltas: Sequence[torch.Tensor],
               lists: list[torch.Tensor | None], segment: torch.Tensor, row_first: torch.Tensor,
               stats: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The split tie groups' entries (`lists`, arena offsets) merged again (`_refix`) by the flat
        kernel with each entry's values looked up through its segment inside the kernel
        (`_make_kernel(segments=True)`; gathering the tables per entry first measured ~1 ms for 18k
        entries on the 1M model, and the packed kernel would take one row per entry: scalar code)."""
        block = out.shape[1]
        device = out.device
        bits, index, flags = flagged(lists, out.numel(), distinct=stats)
        rows = index // block
        seg = segment.index_select(0, rows).long()
        params = [self.tables[name] for name in ("lo", "hi", "coef", "weight", "bound", "k0", "k1", "shift")]
        # the per-tensor kernel adds `arange(n)` to `start` for DARE's element index
        start = (row_first.index_select(0, rows) + (index - rows * block).to(row_first.dtype)
                 - torch.arange(index.numel(), dtype=row_first.dtype, device=device))
        key = ("segments", self.kinds, self.consensus, self.normalize, stats, tuple(d.dtype for d in deltas),
               base.dtype, out.dtype, bits, flags.dtype)
        build = lambda: _make_kernel(self.kinds, self.consensus, self.normalize, stats, flipped=bits,  # noqa: E731
                                     segments=True)
        return _refix(key, build, out, base, deltas, index, flags, (*params, start, self.lam), stats, seg)


def _keep_above(threshold: float, dtype: torch.dtype) -> float:
    """The hardshrink bound of `prune_magnitude`: keep `|x| > result` (-1 keeps all, inf keeps none)."""
    if threshold <= 0:
        return -1.0
    if threshold == float("inf"):
        return threshold
    return _strict_below(threshold, dtype)
