"""DELLA (MagPrune): drop entries with a probability that falls with their magnitude rank in the row.

mergekit's `della_magprune`: within each row (dim 1; a 1-D tensor is one row) entries get ascending
magnitude ranks r = 0..n-1, keep probability `p = (density - epsilon) + 2 * epsilon * r / (n - 1)`, a
Bernoulli mask, then rescale. The ranks come from the `MagnitudeTable` (built once, int16 per entry),
and `p` is computed with the same fp32 operations as mergekit. With `options.draws == "mergekit"` the
mask is `torch.bernoulli(p, generator)`, identical to mergekit's on CPU under the same generator state
(parity tests); the default "fast" draws compare a counter-based int32 hash per entry
(`_draws.hash_bits`) with the int32 line `A + B * r` (`keep_line`: p on a 2**-32 grid, within 4e-6
of mergekit's line), chunk by chunk, in the fused kernels too (`_fused`): the same distribution, and
the same masks on every path.

* `della` (mergekit `della`, TIES sign election, mergekit default normalize true) and
  `della_linear` (mergekit `della_linear`, plain weighted sum).
* `0 < density < 1` requires `density - epsilon > 0` and `density + epsilon < 1`, as mergekit
  (ValueError otherwise); density >= 1 keeps everything, density <= 0 keeps nothing (no draws).
* Rescale: "mergekit" restores the L1 norm; "paper" divides each survivor by its own keep probability
  p_i, which makes the result an unbiased estimate of the task vector.
* Rows of length 1 (n = 1): mergekit divides 0 by 0 and fails; we use p = density.

Eager passes per expert: 3 for the bound (widen the ranks, scale, shift) + 2 (hash, compare) + 1
(mask *= delta) (+3 for the keep probability of "paper") + 1 read (L1, "mergekit") + the combine's;
fused: one pass, plus one reading pass for mergekit's L1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._recipe import ExpertParams
from ._dare import work_dtype
from ._draws import _s32, hash_bits
from ._gta import GeneralizedTaskArithmetic, Scratch, Spec, Sparsified, trivial_spec
from ._magnitude import MagnitudeTable
from ._options import MethodOptions
from ._rescale import l1_restore_factor


def della_sparsify(
    delta: torch.Tensor,
    p: ExpertParams,
    table: MagnitudeTable | None,
    options: MethodOptions,
    generator: torch.Generator | None,
    scratch: Scratch,
    index: int,
) -> Sparsified:
    """mergekit's `della_magprune`, drawing exactly as it does (`draws="mergekit"` only)."""
    density, epsilon = float(p.density), float(p.epsilon)
    if density >= 1:
        return delta, 1.0
    if density <= 0 or delta.numel() == 0:
        return None, 1.0
    _check_epsilon(density, epsilon)
    if table is None:
        table = MagnitudeTable.build(delta, resolution=1)
    ranks, row_len = table.row_ranks(delta)
    dtype = work_dtype(delta)
    probs = scratch.get("della_probs", dtype).view(ranks.shape)
    if row_len > 1:
        torch.div(ranks, row_len - 1, out=probs)
        probs.mul_(2 * epsilon)
        probs.add_(density - epsilon)
    else:
        probs.fill_(density)
    mask = scratch.get("mask", dtype).view(ranks.shape)
    torch.bernoulli(probs, generator=generator, out=mask)
    if options.rescale == "paper":
        mask.div_(probs)
    masked = mask.mul_(delta.reshape(ranks.shape)).view(delta.shape)
    if options.rescale == "paper":
        return masked, 1.0
    return masked, l1_restore_factor(delta, masked, table)


def keep_line(density: float, epsilon: float, row_len: int) -> tuple[int, int]:
    """(A, B): the fast draws keep the entry of row rank r where `hash_bits < A + B * r` (int32,
    wrapping), i.e. with probability mergekit's `(density - epsilon) + 2 * epsilon * r / (n - 1)`
    on a 2**-32 grid (within r * 2**-33 of it: 4e-6 at most for int16 ranks).

    Why integers: the same wrapping int32 ops give the same decisions in the eager path and in the
    fused kernels whatever they fuse (a float line can be contracted into a multiply-add there), and
    they vectorize (fp64 comparisons ran ~10x slower in inductor's kernels). B is capped so that
    A + B * r stays below 2**31 for every rank (B is returned as the signed int32 of its value: the
    product wraps, the sum does not)."""
    top = (1 << 31) - 1
    low, slope = (density, 0.0) if row_len <= 1 else (density - epsilon, 2 * epsilon / (row_len - 1))
    a = min(top, round(low * 2**32) - (1 << 31))
    b = round(slope * 2**32)
    if row_len > 1:
        b = min(b, (top - a) // (row_len - 1))
    return a, _s32(b)


class DellaSpec(Spec):
    """Per-entry keep probability from the precomputed row ranks (`keep_line`); counter-based hashes."""

    random = True

    def __init__(self, density: float, epsilon: float, key: tuple[int, int], ranks: torch.Tensor, row_len: int,
                 paper: bool) -> None:
        self.density, self.epsilon, self.key = density, epsilon, key
        self.ranks, self.row_len, self.paper = ranks.reshape(-1), row_len, paper
        self.line = keep_line(density, epsilon, row_len)
        self.pending = not paper  # mergekit's L1 restore: a pass over the masked chunks

    def chunk(self, d: torch.Tensor, start: int, scratch: Scratch) -> torch.Tensor | None:
        bound = scratch.get("della_bound", torch.int32)
        bound.copy_(self.ranks[start : start + d.numel()])
        bound.mul_(self.line[1]).add_(self.line[0])  # wrapping int32, as the fused kernel
        bits = hash_bits(scratch.get("bits", torch.int32), scratch.get("bits_tmp", torch.int32), self.key, start)
        keep = torch.lt(bits, bound, out=scratch.get("della_keep", torch.bool))
        mask = scratch.get("mask", torch.float32)
        if self.paper:  # each survivor over its keep probability: fl32(1 / fl32(p)), as the fused kernel
            shifted = scratch.get("della_shifted", torch.int64)
            shifted.copy_(bound).add_(1 << 31)  # p * 2**32, an integer below 2**32
            mask.copy_(shifted).mul_(2.0**-32).reciprocal_()  # one rounding to fp32, then exact scaling
            mask.mul_(keep)
        else:
            mask.copy_(keep)
        return mask.mul_(d)


def della_spec(delta: torch.Tensor, p: ExpertParams, table: MagnitudeTable | None, options: MethodOptions,
               key: tuple[int, int] | None) -> Spec:
    density, epsilon = float(p.density), float(p.epsilon)
    trivial = trivial_spec(delta, density)
    if trivial is not None:
        return trivial
    _check_epsilon(density, epsilon)
    if table is None:
        table = MagnitudeTable.build(delta, resolution=1)
    ranks, row_len = table.row_ranks(delta)
    assert key is not None
    return DellaSpec(density, epsilon, key, ranks, row_len, options.rescale == "paper")


def _check_epsilon(density: float, epsilon: float) -> None:
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"DELLA needs density - epsilon > 0 and density + epsilon < 1 for 0 < density < 1; "
            f"got density={density}, epsilon={epsilon}"
        )


class DellaLinear(GeneralizedTaskArithmetic):
    name = "della_linear"
    mergekit_name = "della_linear"
    is_random = True
    spec = staticmethod(della_spec)
    sparsifier = staticmethod(della_sparsify)
    sort_kind = "rows"
    uses = frozenset({"weight", "density", "epsilon", "normalize", "lambda", "rescale"})
    mergekit_defaults = {"normalize": False, "rescale": True}

    def check_params(self, params: Sequence[ExpertParams]) -> None:
        # Validate every expert before drawing anything, so a bad recipe fails fast and cleanly.
        for p in params:
            if 0 < p.density < 1:
                _check_epsilon(float(p.density), float(p.epsilon))


class Della(DellaLinear):
    name = "della"
    mergekit_name = "della"
    consensus = True
    mergekit_defaults = {"normalize": True, "rescale": True}
