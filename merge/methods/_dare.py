"""DARE: drop each task-vector entry with probability 1 - density, rescale the survivors.

* `dare_linear` (mergekit `dare_linear`) and `dare_ties` (mergekit `dare_ties`, TIES sign election).
* Mask, `options.draws == "fast"` (default): keep where `hash(key_i, element index) < p` (`_draws`), keys
  drawn from the generator: counter-based, so chunked and whole-tensor merges draw the same masks.
  `options.draws == "mergekit"` (whole tensor only): `torch.bernoulli(p.expand(shape), generator=g)` with a 0-dim p, which
  consumes the generator exactly like mergekit's `torch.bernoulli(torch.full_like(delta, density))`;
  experts draw in the same order (an expert with density >= 1 draws nothing, as in mergekit), so with a
  generator seeded like mergekit's global RNG the masks are *identical* on CPU (parity tests).
  Both are Bernoulli(density) per entry (distribution tests: kept fraction, rescale, expectation).
* Rescale (`options.rescale`): "mergekit" multiplies the survivors so the tensor's L1 norm is restored
  (`|d|_1 / |d * mask|_1`, skipped when either is < 1e-7); "paper" multiplies by 1/density.
  The factor is a 0-dim tensor folded into the combine's multiply-add (no extra pass, no GPU sync).

Passes per expert: 2 (uniform draw, in-place compare; 1 bernoulli in mergekit mode) + 1 (mask *= delta) + 1 read (L1 of the survivors, mergekit policy)
+ the combine's (1 for dare_linear; 3, +2 with normalize, for dare_ties).
"""

from __future__ import annotations

import torch

from .._recipe import ExpertParams
from ._draws import bernoulli_mask
from ._gta import GeneralizedTaskArithmetic, Scratch, Spec, Sparsified, trivial_spec
from ._magnitude import MagnitudeTable
from ._options import MethodOptions
from ._rescale import l1_restore_factor


def work_dtype(delta: torch.Tensor) -> torch.dtype:
    """mergekit's choice: fp32 on CPU (bernoulli lacks fp16 there), the tensor's dtype elsewhere or for bf16."""
    if delta.device.type != "cpu" or delta.dtype in (torch.bfloat16, torch.float64):
        return delta.dtype
    return torch.float32


def random_sparsify(
    delta: torch.Tensor,
    p: ExpertParams,
    table: MagnitudeTable | None,
    options: MethodOptions,
    generator: torch.Generator | None,
    scratch: Scratch,
    index: int,
) -> Sparsified:
    density = float(p.density)
    if density >= 1:
        return delta, 1.0
    if options.draws == "mergekit":
        dtype = work_dtype(delta)
        mask = scratch.get("mask", dtype)
        prob = torch.tensor(density, dtype=dtype, device=delta.device)
        torch.bernoulli(prob.expand(delta.shape), generator=generator, out=mask)
    else:
        mask = scratch.get("mask", torch.float32)
        torch.rand(delta.shape, generator=generator, out=mask)
        torch.lt(mask, density, out=mask)  # P(u < p) = p; a 0/1 fp32 mask in place
    if density <= 0:
        return None, 1.0  # drew (to keep the stream aligned with mergekit), kept nothing
    masked = mask.mul_(delta)
    if options.rescale == "paper":
        return masked, 1.0 / density
    return masked, l1_restore_factor(delta, masked, table)


class DareSpec(Spec):
    """Bernoulli(density) keep mask from the counter-based hash of (key, element index), times delta."""

    random = True

    def __init__(self, density: float, key: tuple[int, int], rescale: float = 1.0) -> None:
        self.density, self.key, self.rescale = density, key, rescale

    def chunk(self, d: torch.Tensor, start: int, scratch: Scratch) -> torch.Tensor | None:
        mask = scratch.get("mask", torch.float32)
        bernoulli_mask(mask, scratch.get("bits", torch.int32), scratch.get("bits_tmp", torch.int32), self.key, start, self.density)
        return mask.mul_(d)


def dare_spec(delta: torch.Tensor, p: ExpertParams, table: MagnitudeTable | None, options: MethodOptions,
              key: tuple[int, int] | None) -> Spec:
    """DARE per tensor: no draw at density >= 1, nothing kept at <= 0; the L1 factor is set by the plan."""
    density = float(p.density)
    trivial = trivial_spec(delta, density)
    if trivial is not None:
        return trivial
    assert key is not None
    return DareSpec(density, key, 1.0 / density if options.rescale == "paper" else 1.0)


class DareLinear(GeneralizedTaskArithmetic):
    name = "dare_linear"
    mergekit_name = "dare_linear"
    is_random = True
    spec = staticmethod(dare_spec)
    sparsifier = staticmethod(random_sparsify)
    uses = frozenset({"weight", "density", "normalize", "lambda", "rescale"})
    mergekit_defaults = {"normalize": False, "rescale": True}


class DareTies(DareLinear):
    name = "dare_ties"
    mergekit_name = "dare_ties"
    consensus = True
