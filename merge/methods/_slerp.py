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
from ._base import MergeMethod, axpy_, scaled_into
from ._magnitude import MagnitudeTable
from ._options import MethodOptions

_CHUNK_ELEMENTS = 1024 * 1024  # mergekit's slerp chunk; same chunks => same rounding


def _slerp_coefficients(
    t: float, a: torch.Tensor, b: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """mergekit's slerp coefficients (c_a, c_b) for flat 1-row views `a`, `b` (0-dim results, no sync)."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    tt = torch.tensor([[t]], dtype=dtype, device=a.device)
    if not a.shape[1]:
        return (1 - tt).reshape(()), tt.reshape(())
    chunk = _CHUNK_ELEMENTS
    norm_a_parts, norm_b_parts = [], []
    for start in range(0, a.shape[1], chunk):
        norm_a_parts.append(torch.linalg.vector_norm(a[:, start : start + chunk].to(dtype), dim=1, keepdim=True))
        norm_b_parts.append(torch.linalg.vector_norm(b[:, start : start + chunk].to(dtype), dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(norm_a_parts), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norm_b_parts), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot_parts = []
    for start in range(0, a.shape[1], chunk):
        x = a[:, start : start + chunk].to(dtype) / norm_a
        y = b[:, start : start + chunk].to(dtype) / norm_b
        dot_parts.append((x * y).sum(dim=1, keepdim=True))
        del x, y
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return coef_a.reshape(()), coef_b.reshape(())


class Slerp(MergeMethod):
    name = "slerp"
    mergekit_name = "slerp"
    needs_base = True
    expert_count = (1, 1)
    uses = frozenset({"t"})

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
        if options.t is None:
            raise ValueError("slerp needs t (the rule's `t`, 0 = base, 1 = expert)")
        assert base is not None
        delta = deltas[0]
        work = out if out.dtype in (torch.float32, torch.float64) else torch.empty_like(out, dtype=torch.float32)
        expert = torch.add(base, delta, out=work)
        coef_a, coef_b = _slerp_coefficients(float(options.t), base.reshape(1, -1), expert.reshape(1, -1))
        scaled_into(work, delta, coef_b)
        axpy_(work, base, coef_a + coef_b - 1)
        if work is not out:
            out.copy_(work)


class Nuslerp(MergeMethod):
    name = "nuslerp"
    mergekit_name = "nuslerp"
    needs_base = True
    expert_count = (2, 2)
    uses = frozenset({"weight", "t"})

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
        if options.t is not None:
            t = float(options.t)
        else:
            w0, w1 = float(params[0].weight), float(params[1].weight)
            total = w0 + w1
            t = 0.5 if abs(total) < 1e-6 else w1 / total
        v0, v1 = deltas[0].reshape(-1), deltas[1].reshape(-1)
        if v0.dtype not in (torch.float32, torch.float64):
            v0, v1 = v0.float(), v1.float()
        n0 = torch.linalg.vector_norm(v0).clamp(min=1e-7)
        n1 = torch.linalg.vector_norm(v1).clamp(min=1e-7)
        cos = (torch.dot(v0, v1) / (n0 * n1)).clamp(-1, 1)
        colinear = (1 - cos.square()) <= 1e-8**2
        theta = torch.acos(torch.where(colinear, 0, cos))
        sin_theta = torch.sin(theta)
        safe_sin = torch.where(colinear, 1, sin_theta)
        c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / safe_sin)
        c1 = torch.where(colinear, t, torch.sin(t * theta) / safe_sin)
        work = out if out.dtype in (torch.float32, torch.float64) else torch.empty_like(out, dtype=torch.float32)
        scaled_into(work, deltas[0], c0)
        axpy_(work, deltas[1], c1)
        if work is not out:
            out.copy_(work)


