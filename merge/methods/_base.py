"""`MergeMethod`: the small abstract base every merge method implements (one per module, optuna style)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from .._recipe import ExpertParams
from ._magnitude import MagnitudeTable
from ._options import MethodOptions

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
    ) -> None:
        """Write merged - base (the merged task vector, fp32 math) into `out`. Never modifies deltas/base.

        `out` must not alias any delta or the base.
        """
        self._validate(out, deltas, params, base, options, tables, generator)
        with torch.no_grad():
            self._merge(out, deltas, params, base=base, options=options, tables=tables, generator=generator)

    @abstractmethod
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
    ) -> None: ...

    def _validate(
        self,
        out: torch.Tensor,
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
        if not out.is_floating_point():
            raise ValueError(f"{self.name}: out must be a floating-point tensor, got {out.dtype}")
        for i, delta in enumerate(deltas):
            if delta.shape != out.shape:
                raise ValueError(f"{self.name}: delta {i} has shape {tuple(delta.shape)}, out has {tuple(out.shape)}")
            if delta.data_ptr() == out.data_ptr() and out.numel():
                raise ValueError(f"{self.name}: out must not alias delta {i}")
        if base is not None and base.shape != out.shape:
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
    total = float(torch.tensor(list(weights), dtype=torch.float32).sum())
    return 1.0 if abs(total) < 1e-8 else total
