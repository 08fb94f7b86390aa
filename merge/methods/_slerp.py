"""Spherical interpolation: `slerp` (base <-> one expert) and `nuslerp` (between two task vectors).

slerp (mergekit `slerp`, parameter `t`): treats the whole base tensor `a` and expert tensor `b = base + d`
as two vectors; `dot = <a/|a|, b/|b|>` (norms below 1e-8 count as 1), clamped to [-1, 1]; if
|dot| > 0.9995 the result is the linear `(1-t) a + t b`, else
`sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b` with theta = acos(dot). Norms and the dot are
computed in the same 1M-entry chunks and order as mergekit, so the collinearity decision and the
coefficients are bit-identical. The task vector written is `(c_a + c_b - 1) * base + c_b * d`.
Passes: 1 (b = base + d) + 4 reads (2 norms, chunked dot of both) + 2 (output).

nuslerp (mergekit `nuslerp` with a base, defaults `nuslerp_flatten: true`, `nuslerp_row_wise: false`):
spherical interpolation between the two flattened task vectors d_0, d_1 with
`t = options.t` if given, else `w_1 / (w_0 + w_1)` (0.5 when |w_0 + w_1| < 1e-6), mergekit's rule.
Passes: 4 reads (2 norms, 1 dot of both) + 2 (output).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._recipe import ExpertParams
from ._base import ChunkPlan, Coefficient, LinearPlan, MergeMethod
from ._magnitude import MagnitudeTable
from ._options import MethodOptions

_CHUNK_ELEMENTS = 1024 * 1024  # mergekit's slerp chunk; same chunks => same rounding


def _slerp_coefficients(
    t: float, base: torch.Tensor, delta: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """mergekit's slerp coefficients (c_a, c_b) between flat `a = base` and `b = base + delta` (0-dim results,
    no sync). `b` is built one mergekit chunk at a time (never a whole fp32 copy), with the same add and the
    same chunked reductions as before, so the coefficients are bit-identical to mergekit's."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    tt = torch.tensor([[t]], dtype=dtype, device=base.device)
    numel = base.numel()
    if not numel:
        return (1 - tt).reshape(()), tt.reshape(())
    a = base.reshape(1, -1)
    d = delta.reshape(1, -1)
    chunk = _CHUNK_ELEMENTS
    buf = torch.empty((1, min(chunk, numel)), dtype=dtype, device=base.device)

    def b_chunk(start: int) -> torch.Tensor:
        stop = min(numel, start + chunk)
        return torch.add(a[:, start:stop], d[:, start:stop], out=buf[:, : stop - start])

    norm_a_parts, norm_b_parts = [], []
    for start in range(0, numel, chunk):
        norm_a_parts.append(torch.linalg.vector_norm(a[:, start : start + chunk].to(dtype), dim=1, keepdim=True))
        norm_b_parts.append(torch.linalg.vector_norm(b_chunk(start), dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(norm_a_parts), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norm_b_parts), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot_parts = []
    for start in range(0, numel, chunk):
        x = a[:, start : start + chunk].to(dtype) / norm_a
        y = b_chunk(start) / norm_b
        dot_parts.append((x * y).sum(dim=1, keepdim=True))
        del x, y
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return coef_a.reshape(()), coef_b.reshape(())


def _host(c: torch.Tensor) -> Coefficient:
    """A coefficient as a Python float on CPU (the fast `alpha=` kernels), a 0-dim tensor elsewhere (no sync)."""
    return float(c) if c.device.type == "cpu" else c


class Slerp(MergeMethod):
    name = "slerp"
    mergekit_name = "slerp"
    needs_base = True
    expert_count = (1, 1)
    uses = frozenset({"t"})

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
        if options.t is None:
            raise ValueError("slerp needs t (the rule's `t`, 0 = base, 1 = expert)")
        assert base is not None
        delta = deltas[0]
        coef_a, coef_b = _slerp_coefficients(float(options.t), base, delta)
        return LinearPlan(delta.numel(), [(delta, _host(coef_b)), (base, _host(coef_a + coef_b - 1))])


class Nuslerp(MergeMethod):
    name = "nuslerp"
    mergekit_name = "nuslerp"
    needs_base = True
    expert_count = (2, 2)
    uses = frozenset({"weight", "t"})

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
        from ._model_stock import gram

        if options.t is not None:
            t = float(options.t)
        else:
            w0, w1 = float(params[0].weight), float(params[1].weight)
            total = w0 + w1
            t = 0.5 if abs(total) < 1e-6 else w1 / total
        v0, v1 = deltas[0].reshape(-1), deltas[1].reshape(-1)
        norms, dots = gram([v0, v1], chunk)
        n0 = norms[0].clamp(min=1e-7)
        n1 = norms[1].clamp(min=1e-7)
        cos = (dots[(0, 1)] / (n0 * n1)).clamp(-1, 1)
        colinear = (1 - cos.square()) <= 1e-8**2
        theta = torch.acos(torch.where(colinear, 0, cos))
        sin_theta = torch.sin(theta)
        safe_sin = torch.where(colinear, 1, sin_theta)
        c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / safe_sin)
        c1 = torch.where(colinear, t, torch.sin(t * theta) / safe_sin)
        return LinearPlan(v0.numel(), [(v0, _host(c0)), (v1, _host(c1))])
