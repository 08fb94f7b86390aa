"""`MergeMethod`: the small abstract base every merge method implements (one per module, optuna style)."""

from __future__ import annotations

from abc import ABC, abstractmethod
import functools
from collections.abc import Sequence
from typing import ClassVar

import torch

from .._recipe import ExpertParams
from ._magnitude import MagnitudeTable
from ._options import MethodOptions
from ._scratch import scratch

Coefficient = float | torch.Tensor
"""A scalar factor: a Python float, or a 0-dim tensor on the data's device (avoids a GPU sync)."""


class MergeMethod(ABC):
    """Computes the merged task vector (merged - base) of one tensor.

    Subclasses set the class attributes and implement `_merge`; `merge` validates first.
    """

    name: ClassVar[str]
    """Registry key, e.g. "dare_ties"."""
    mergekit_name: ClassVar[str | None] = None
    """Name in mergekit YAML, None where mergekit cannot express the method."""
    is_random: ClassVar[bool] = False
    """Whether `merge` needs a generator (DARE, DELLA)."""
    needs_base: ClassVar[bool] = False
    """Whether `merge` needs the base tensor (slerp, nuslerp, model_stock; linear without normalize too)."""
    expert_count: ClassVar[tuple[int, int | None]] = (1, None)
    """Minimum and maximum number of experts (None = unbounded)."""
    uses: ClassVar[frozenset[str]] = frozenset()
    """ExpertParams fields and options read: weight, density, gamma, epsilon, t, normalize, lambda, rescale."""
    mergekit_defaults: ClassVar[dict[str, object]] = {}
    """mergekit's own defaults for this method (e.g. normalize), for YAML export and documentation."""

    def merge(
        self,
        out: torch.Tensor,
        deltas: Sequence[torch.Tensor],
        params: Sequence[ExpertParams],
        *,
        base: torch.Tensor | None,
        options: MethodOptions,
        tables: Sequence[MagnitudeTable] | None,
        generator: torch.Generator | None,
        chunk: int | None = None,
    ) -> None:
        """Write merged - base (the merged task vector, fp32 math) into `out`. Never modifies deltas/base.

        `out` must not alias any delta or the base. The work runs in flat chunks of `chunk` entries
        (default `chunk_elements(out.device)`); the result does not depend on the chunk size beyond
        fp32 rounding of fused multiply-adds at chunk tails.
        """
        self._validate(out, deltas, params, base, options, tables, generator)
        with torch.no_grad():
            if self.whole_tensor(options):
                self._merge(out, deltas, params, base=base, options=options, tables=tables, generator=generator)
                return
            plan = self._prepare(deltas, params, base=base, options=options, tables=tables, generator=generator,
                                 chunk=chunk or chunk_elements(out.device))
            run_plan(plan, out, chunk or chunk_elements(out.device))

    def prepare(
        self,
        deltas: Sequence[torch.Tensor],
        params: Sequence[ExpertParams],
        *,
        base: torch.Tensor | None,
        options: MethodOptions,
        tables: Sequence[MagnitudeTable] | None,
        generator: torch.Generator | None,
        chunk: int,
    ) -> "ChunkPlan":
        """Everything that needs the whole tensor (thresholds, norms, L1 rescale factors), once per call;
        the returned plan then computes any flat chunk `[start, stop)` of the merged task vector.

        The engine's fast path: it runs `plan.run(chunk_buffer, start, stop)` over cache-sized chunks
        and adds the base in the same pass. When `whole_tensor(options)` is true (mergekit's draws) the
        plan merges the whole tensor on its first `run` and serves chunks from that result.
        """
        self._validate(None, deltas, params, base, options, tables, generator)
        if self.whole_tensor(options):
            return WholeTensorPlan(self, deltas, params, base=base, options=options, tables=tables, generator=generator)
        with torch.no_grad():
            return self._prepare(deltas, params, base=base, options=options, tables=tables, generator=generator, chunk=chunk)

    def whole_tensor(self, options: MethodOptions) -> bool:
        """True when this call cannot be chunked (mergekit-identical draws): use `merge`."""
        return False

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
    ) -> "ChunkPlan":
        raise NotImplementedError(f"{self.name} has no chunked plan")

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
        """Whole-tensor path, used only when `whole_tensor(options)` is true."""
        raise NotImplementedError(f"{self.name} has no whole-tensor path")

    def check_params(self, params: Sequence[ExpertParams]) -> None:
        """Method-specific parameter checks (DELLA's epsilon range), raising ValueError; run before
        anything is drawn, and by the mergekit import on the values it averaged."""

    def _validate(
        self,
        out: torch.Tensor | None,
        deltas: Sequence[torch.Tensor],
        params: Sequence[ExpertParams],
        base: torch.Tensor | None,
        options: MethodOptions,
        tables: Sequence[MagnitudeTable] | None,
        generator: torch.Generator | None,
    ) -> None:
        n = len(deltas)
        if len(params) != n:
            raise ValueError(f"{self.name}: got {n} deltas but {len(params)} ExpertParams")
        lo, hi = self.expert_count
        if n < lo or (hi is not None and n > hi):
            wanted = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            raise ValueError(f"{self.name} needs {wanted} expert(s), got {n}")
        if out is not None and not out.is_floating_point():
            raise ValueError(f"{self.name}: out must be a floating-point tensor, got {out.dtype}")
        ref = out if out is not None else deltas[0]
        for i, delta in enumerate(deltas):
            if delta.shape != ref.shape:
                raise ValueError(f"{self.name}: delta {i} has shape {tuple(delta.shape)}, out has {tuple(ref.shape)}")
            if out is not None and delta.data_ptr() == out.data_ptr() and out.numel():
                raise ValueError(f"{self.name}: out must not alias delta {i}")
        if base is not None and base.shape != ref.shape:
            raise ValueError(f"{self.name}: base has shape {tuple(base.shape)}, out has {tuple(out.shape)}")
        if self.needs_base and base is None:
            raise ValueError(f"{self.name} needs the base tensor")
        if tables is not None and len(tables) != n:
            raise ValueError(f"{self.name}: got {n} deltas but {len(tables)} magnitude tables")
        if self.is_random and generator is None:
            raise ValueError(f"{self.name} is random: pass a generator (see mask_generator)")

    def __repr__(self) -> str:
        return f"<merge method {self.name!r}>"


def axpy_(acc: torch.Tensor, x: torch.Tensor, coef: Coefficient) -> torch.Tensor:
    """acc += coef * x in one pass, for a float or 0-dim tensor coefficient."""
    if isinstance(coef, torch.Tensor):
        return acc.addcmul_(x, coef)
    return acc.add_(x, alpha=coef)


def scaled_into(out: torch.Tensor, x: torch.Tensor, coef: Coefficient) -> torch.Tensor:
    """out = coef * x (the first term of an accumulation, so `out` needs no zeroing).

    One pass when dtypes match. A lower-precision x (bf16 task vectors) is first widened into `out`:
    `torch.mul(bf16, c, out=fp32)` would multiply in bf16.
    """
    if x.dtype == out.dtype:
        return torch.mul(x, coef, out=out)
    return out.copy_(x).mul_(coef)


def total_weight_divisor(weights: Sequence[float]) -> float:
    """mergekit's non-consensus divisor: sum of weights, 1 when |sum| < 1e-8."""
    return _divisor(tuple(weights))


@functools.lru_cache(maxsize=1024)
def _divisor(weights: tuple[float, ...]) -> float:
    # Cached: every tensor of a rule asks for the same weights, once per tensor and candidate.
    total = float(torch.tensor(weights, dtype=torch.float32).sum())
    return 1.0 if abs(total) < 1e-8 else total


# -- chunked execution ---------------------------------------------------------------------------

CHUNK_ELEMENTS: dict[str, int] = {"cpu": 1 << 18, "cuda": 1 << 24}
"""Flat chunk length per device type. CPU: 256K entries (1 MiB per fp32 work buffer), so a method's
~8 work buffers stay in L2/L3 and each input is read from RAM once while op dispatch (~40 ops per
chunk) stays below ~10% of the time (measured: docs/merge-engine.md). CUDA: 16M, large enough to
hide kernel launches. Results do not depend on it (draws are counter-based, see `_draws`)."""


def chunk_elements(device: torch.device | str) -> int:
    """The chunk length for `device` (`CHUNK_ELEMENTS`, CPU's value for unknown device types)."""
    kind = torch.device(device).type
    return CHUNK_ELEMENTS.get(kind, CHUNK_ELEMENTS["cpu"])


def chunks(numel: int, chunk: int):
    """(start, stop) pairs covering [0, numel) in steps of `chunk` (the last one ragged)."""
    for start in range(0, numel, chunk):
        yield start, min(numel, start + chunk)


class ChunkPlan(ABC):
    """A merge call prepared for one tensor: `run` writes the merged task vector's flat chunk
    `[start, stop)` into `out` (fp32 or fp64, `stop - start` entries, aliasing no input)."""

    numel: int

    @abstractmethod
    def run(self, out: torch.Tensor, start: int, stop: int) -> None: ...


class WholeTensorPlan(ChunkPlan):
    """A merge that cannot be chunked (`draws="mergekit"`: torch.bernoulli over the whole tensor, as
    mergekit draws): `merge` runs once into an fp32 buffer of the tensor's size on the first `run`,
    later chunks are copied from it. Slow and one tensor of extra memory; for parity checks. The
    generator is reseeded with its seed's low 32 bits, the most mergekit's `--random-seed` takes, so
    `run_merge(..., MergeOptions(random_seed=mergekit_seed(seed, trial, name)))` draws the same."""

    def __init__(self, method: MergeMethod, deltas: Sequence[torch.Tensor], params: Sequence[ExpertParams], *,
                 base: torch.Tensor | None, options: MethodOptions, tables: Sequence[MagnitudeTable] | None,
                 generator: torch.Generator | None) -> None:
        self.numel = deltas[0].numel()
        if generator is not None:  # mergekit seeds numpy too, which takes 32-bit seeds (`mergekit_seed`)
            generator.manual_seed(generator.initial_seed() & 0xFFFFFFFF)
        self._call = (method, deltas, params, base, options, tables, generator)
        self._merged: torch.Tensor | None = None

    def run(self, out: torch.Tensor, start: int, stop: int) -> None:
        if self._merged is None:
            method, deltas, params, base, options, tables, generator = self._call
            self._merged = torch.empty(deltas[0].shape, dtype=torch.float32, device=out.device)
            method.merge(self._merged, deltas, params, base=base, options=options, tables=tables, generator=generator)
        out.copy_(self._merged.reshape(-1)[start:stop])


class LinearPlan(ChunkPlan):
    """`out = sum_k coef_k * x_k` over flat inputs: linear, slerp, nuslerp, model_stock, and empty merges."""

    def __init__(self, numel: int, terms: Sequence[tuple[torch.Tensor, Coefficient]]) -> None:
        self.numel = numel
        self.terms = [(x.reshape(-1), c) for x, c in terms]

    def run(self, out: torch.Tensor, start: int, stop: int) -> None:
        if not self.terms:
            out.zero_()
            return
        (x0, c0), rest = self.terms[0], self.terms[1:]
        scaled_into(out, x0[start:stop], c0)
        for x, c in rest:
            axpy_(out, x[start:stop], c)


def chunk_buffer(device: torch.device, chunk: int, slot: str = "out") -> torch.Tensor:
    """A reusable fp32 buffer of `chunk` entries per (thread, device, slot) (`_scratch.scratch`)."""
    return scratch(device, chunk, f"chunk.{slot}")


def run_plan(plan: ChunkPlan, out: torch.Tensor, chunk: int) -> None:
    """Fill the whole `out` from `plan`, chunk by chunk (directly in `out` when it is fp32/fp64 and contiguous)."""
    numel = out.numel()
    direct = out.dtype in (torch.float32, torch.float64) and out.is_contiguous()
    flat = out.view(-1) if out.is_contiguous() else None
    if flat is None:
        work = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        run_plan(plan, work, chunk)
        out.copy_(work)
        return
    buf = None if direct else chunk_buffer(out.device, chunk, "run_plan")
    for start, stop in chunks(numel, chunk):
        if direct:
            plan.run(flat[start:stop], start, stop)
        else:
            piece = buf[: stop - start]
            plan.run(piece, start, stop)
            flat[start:stop].copy_(piece)
