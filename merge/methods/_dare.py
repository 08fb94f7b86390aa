"""DARE: drop each task-vector entry with probability 1 - density, rescale the survivors.

* `dare_linear` (mergekit `dare_linear`) and `dare_ties` (mergekit `dare_ties`, TIES sign election).
* Mask, `options.draws == "fast"` (default): a window on a counter-based field (`_draws`): keep entry
  j where `(bucket(field_hash(field, j)) - offset) mod 4096 < width`, width = round(density * 4096).
  With a table that names its task vector (the engine's), the field comes from (run seed, expert,
  tensor) and the offset from the trial's generator; without, both come from the generator. Each
  entry is kept with probability width / 4096, independently of the others.
  `options.draws == "mergekit"` (whole tensor only): `torch.bernoulli(p.expand(shape), generator=g)` with a 0-dim p, which
  consumes the generator exactly like mergekit's `torch.bernoulli(torch.full_like(delta, density))`;
  experts draw in the same order (an expert with density >= 1 draws nothing, as in mergekit), so with a
  generator seeded like mergekit's global RNG the masks are *identical* on CPU (parity tests).
  Both are Bernoulli per entry (distribution tests: kept fraction, rescale, expectation).
* Rescale (`options.rescale`): "mergekit" multiplies the survivors so the tensor's L1 norm is restored
  (`|d|_1 / |d * mask|_1`, skipped when either is < 1e-7); "paper" multiplies by 1 / kept probability.
  For the engine's tensors (tables that name their task vector), whatever their size, the kept L1
  is a lookup in the table's `WindowL1` (no pass over the data); otherwise one pass over the masked
  entries computes it (`GtaPlan.resolve_rescale`).
  The factor is folded into the combine's multiply-add.
"""

from __future__ import annotations

import torch

from .._recipe import ExpertParams
from ._draws import BUCKETS, field_key, window_bounds, window_mask, window_offset, window_width
from ._gta import GeneralizedTaskArithmetic, Scratch, Spec, Sparsified, trivial_spec
from ._magnitude import MagnitudeTable
from ._options import MethodOptions
from ._rescale import l1_restore_factor


def work_dtype(delta: torch.Tensor) -> torch.dtype:
    """The dtype mergekit draws and rescales in under the YAML evomerge exports (`dtype: float32`:
    every input is cast to fp32 first): fp32, or fp64 for fp64 task vectors. (mergekit run with
    `dtype: bfloat16` draws bf16 probabilities, whose rounded density gives other masks.)"""
    return torch.float64 if delta.dtype == torch.float64 else torch.float32


def mergekit_sparsify(
    delta: torch.Tensor,
    p: ExpertParams,
    table: MagnitudeTable | None,
    options: MethodOptions,
    generator: torch.Generator | None,
    scratch: Scratch,
    index: int,
) -> Sparsified:
    """mergekit's `bernoulli` sparsification, drawing exactly as it does (`draws="mergekit"` only)."""
    density = float(p.density)
    if density >= 1:
        return delta, 1.0
    dtype = work_dtype(delta)
    mask = scratch.get("mask", dtype)
    prob = torch.tensor(density, dtype=dtype, device=delta.device)
    torch.bernoulli(prob.expand(delta.shape), generator=generator, out=mask)
    if density <= 0:
        return None, 1.0  # drew (to keep the stream aligned with mergekit), kept nothing
    masked = mask.mul_(delta)
    if options.rescale == "paper":
        return masked, 1.0 / density
    return masked, l1_restore_factor(delta, masked, table)


class DareSpec(Spec):
    """Keep the entries whose field bucket falls in the window (`_draws.window_bounds`), times delta.

    `pending`: mergekit's L1 factor is still to compute by a pass over the masked entries."""

    random = True

    def __init__(self, width: int, key: tuple[int, int], offset: int, rescale: float = 1.0,
                 pending: bool = False) -> None:
        self.width, self.key, self.offset = width, key, offset
        self.shift, self.bound = window_bounds(offset, width)
        self.rescale, self.pending = rescale, pending

    @property
    def density(self) -> float:
        """The kept probability: the density quantized to 1/BUCKETS."""
        return self.width / BUCKETS

    def chunk(self, d: torch.Tensor, start: int, scratch: Scratch) -> torch.Tensor | None:
        mask = scratch.get("mask", torch.float32)
        window_mask(mask, scratch.get("bits", torch.int32), scratch.get("bits_tmp", torch.int32), self.key, start,
                    self.shift, self.bound)
        return mask.mul_(d)


def dare_spec(delta: torch.Tensor, p: ExpertParams, table: MagnitudeTable | None, options: MethodOptions,
              key: tuple[int, int] | None) -> Spec:
    """DARE per tensor: no draw when the quantized density keeps everything, nothing kept at 0."""
    width = window_width(float(p.density))
    trivial = trivial_spec(delta, width / BUCKETS)
    if trivial is not None:
        return trivial
    assert key is not None
    if table is not None and table.identity is not None:
        field, offset = field_key(options.seed, table.identity), window_offset(key)
        window = table.window_l1(delta, field) if options.rescale == "mergekit" else None
    else:
        field, offset, window = key, 0, None
    if options.rescale == "paper":
        return DareSpec(width, field, offset, rescale=BUCKETS / width)
    if window is None:
        return DareSpec(width, field, offset, pending=True)
    return DareSpec(width, field, offset, rescale=window.factor(offset, width))


class DareLinear(GeneralizedTaskArithmetic):
    name = "dare_linear"
    mergekit_name = "dare_linear"
    is_random = True
    spec = staticmethod(dare_spec)
    sparsifier = staticmethod(mergekit_sparsify)
    uses = frozenset({"weight", "density", "normalize", "lambda", "rescale"})
    mergekit_defaults = {"normalize": False, "rescale": True}


class DareTies(DareLinear):
    name = "dare_ties"
    mergekit_name = "dare_ties"
    consensus = True
