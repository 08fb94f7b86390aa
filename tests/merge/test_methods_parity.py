"""Parity of evomerge.merge.methods with mergekit 0.1.5's in-memory API (`merge_tensors`), the oracle.

Inputs are random full-weight tensors (base + experts); our methods get the task vectors
`expert - base` (computed exactly as mergekit computes them) and exact magnitude tables
(numel <= resolution), and we compare `base + out` with mergekit's merged tensor.
Random methods (DARE, DELLA) draw identical masks with `MethodOptions(draws="mergekit")`: mergekit uses
the global RNG seeded with `torch.manual_seed(s)`, ours a `torch.Generator` seeded with the same s.
The default fast draws are tested for their distribution in test_methods.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mergekit.merge_methods import merge_tensors

from evomerge.merge._recipe import ExpertParams
from evomerge.merge.methods import MagnitudeTable, MethodOptions, get_method

SHAPES = [(7,), (16, 24), (3, 5, 8), (64, 64), (1, 33)]
GTA_METHODS = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties",
               "della", "della_linear"]
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
BIT_EXACT = {"ties", "breadcrumbs_ties"}
"""Sign-elected merges add mergekit's numbers in mergekit's order (`_gta.ties_combine`): equal to the bit."""

HYP = settings(max_examples=25, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow])


def make_inputs(seed: int, shape: tuple[int, ...], n: int, delta_scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = [base + delta_scale * torch.randn(shape, generator=g) * (1 + i) for i in range(n)]
    deltas = [e - base for e in experts]  # the same fp32 subtraction mergekit performs
    return base, experts, deltas


def ours(name: str, base, deltas, params, options: MethodOptions, seed: int | None = None, tables=True):
    method = get_method(name)
    out = torch.full_like(base, float("nan"))  # garbage-in: every entry must be written
    tabs = [MagnitudeTable.build(d) for d in deltas] if tables else None
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if seed is not None:  # draw masks the way mergekit does, to compare them bit for bit
        options = dataclasses.replace(options, draws="mergekit")
    method.merge(out, deltas, params, base=base, options=options, tables=tabs, generator=gen)
    return out


def assert_parity(merged_ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> None:
    """Merged weights equal to 1e-6 relative; task vectors to 1e-5 relative of their scale."""
    assert torch.isfinite(merged_ours).all()
    scale = ref.abs().max().item()
    torch.testing.assert_close(merged_ours, ref, rtol=1e-6, atol=1e-6 * scale)
    tv_ref = ref - base
    tv_ours = merged_ours - base
    torch.testing.assert_close(tv_ours, tv_ref, rtol=1e-5, atol=1e-5 * max(tv_ref.abs().max().item(), 1e-12) + 2e-7 * scale)


def gta_reference(name, base, experts, params, options, seed=None):
    parameters = {
        "weight": [p.weight for p in params],
        "density": [p.density for p in params],
        "normalize": options.normalize,
        "lambda": options.lambda_,
    }
    if name.startswith("breadcrumbs"):
        parameters["gamma"] = [p.gamma for p in params]
    if name.startswith("della"):
        parameters["epsilon"] = [p.epsilon for p in params]
    if name in RANDOM:
        parameters["rescale"] = True
        torch.manual_seed(seed)
    return merge_tensors([base, *experts], name, parameters=parameters, base_index=0)


weights_st = st.floats(-1.5, 1.5, allow_nan=False).map(lambda w: round(w, 3))


@st.composite
def gta_case(draw, name: str):
    shape = draw(st.sampled_from(SHAPES))
    n = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    params = []
    for _ in range(n):
        if name.startswith("della"):
            eps = draw(st.sampled_from([0.05, 0.1, 0.15]))
            density = draw(st.one_of(st.just(1.0), st.floats(eps + 0.01, 1 - eps - 0.01)))
        else:
            eps = 0.15
            density = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0)))
        gamma = draw(st.sampled_from([0.0, 0.01, 0.1, 0.3]))
        params.append(ExpertParams(weight=draw(weights_st), density=density, gamma=gamma, epsilon=eps))
    options = MethodOptions(normalize=draw(st.booleans()), lambda_=draw(st.sampled_from([1.0, 0.7, 1.3])))
    return shape, seed, params, options


@pytest.mark.parametrize("name", GTA_METHODS)
def test_gta_methods_match_mergekit(name: str) -> None:
    @HYP
    @given(gta_case(name))
    def check(case):
        shape, seed, params, options = case
        base, experts, deltas = make_inputs(seed, shape, len(params))
        weight_sum = sum(p.weight for p in params)
        if options.normalize and not name.endswith("ties") and name != "della" and 1e-8 <= abs(weight_sum) < 0.05:
            return  # near-zero divisor amplifies rounding beyond any fixed tolerance (mergekit too)
        ref = gta_reference(name, base, experts, params, options, seed=seed)
        out = ours(name, base, deltas, params, options, seed=seed if name in RANDOM else None)
        assert_parity(base + out, ref, base)
        if name in BIT_EXACT:
            assert torch.equal(base + out, ref)

    check()


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties", "della", "dare_ties"])
def test_fixed_settings_with_negative_weights(name: str) -> None:
    """Hand-picked settings that exercise sign election against negative weights and the defaults."""
    eps = 0.1
    params = [ExpertParams(weight=1.0, density=0.5, gamma=0.05, epsilon=eps),
              ExpertParams(weight=-0.8, density=0.3, gamma=0.0, epsilon=eps),
              ExpertParams(weight=0.6, density=0.7, gamma=0.2, epsilon=eps)]
    for shape in SHAPES:
        for normalize in (True, False):
            base, experts, deltas = make_inputs(11, shape, 3)
            options = MethodOptions(normalize=normalize)
            ref = gta_reference(name, base, experts, params, options, seed=5)
            out = ours(name, base, deltas, params, options, seed=5 if name in RANDOM else None)
            assert_parity(base + out, ref, base)


@HYP
@given(shape=st.sampled_from(SHAPES), n=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       weights=st.lists(weights_st, min_size=4, max_size=4), normalize=st.booleans())
def test_linear_matches_mergekit(shape, n, seed, weights, normalize) -> None:
    """mergekit's linear averages full weights (base not listed); ours is the same in task-vector form."""
    weights = weights[:n]
    if normalize and abs(sum(weights)) < 0.05:
        weights[0] += 0.5  # mergekit divides by the raw sum; keep it away from 0 (see docs)
    base, experts, deltas = make_inputs(seed, shape, n)
    ref = merge_tensors(experts, "linear", parameters={"weight": weights, "normalize": normalize})
    params = [ExpertParams(weight=w) for w in weights]
    out = ours("linear", base, deltas, params, MethodOptions(normalize=normalize))
    assert_parity(base + out, ref, base)


@HYP
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1),
       t=st.sampled_from([0.0, 0.25, 0.5, 0.8, 1.0]), delta_scale=st.sampled_from([0.01, 0.5, 2.0]))
def test_slerp_matches_mergekit(shape, seed, t, delta_scale) -> None:
    # delta_scale 0.01 takes mergekit's collinear (linear) branch, 0.5 and 2.0 the spherical one
    base, experts, deltas = make_inputs(seed, shape, 1, delta_scale)
    ref = merge_tensors([base, experts[0]], "slerp", parameters={"t": t}, base_index=0)
    out = ours("slerp", base, deltas, [ExpertParams()], MethodOptions(t=t))
    assert_parity(base + out, ref, base)


@HYP
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1),
       w=st.tuples(st.floats(0.05, 1.5), st.floats(0.05, 1.5)), parallel=st.booleans())
def test_nuslerp_matches_mergekit(shape, seed, w, parallel) -> None:
    base, experts, deltas = make_inputs(seed, shape, 2)
    if parallel:  # collinear task vectors take mergekit's linear branch
        experts[1] = base + 2 * deltas[0]
        deltas[1] = experts[1] - base
    ref = merge_tensors([base, *experts], "nuslerp", parameters={"weight": list(w)}, base_index=0)
    params = [ExpertParams(weight=w[0]), ExpertParams(weight=w[1])]
    out = ours("nuslerp", base, deltas, params, MethodOptions())
    assert_parity(base + out, ref, base)
    # options.t overrides the weights: same as mergekit with weights (1 - t, t)
    out_t = ours("nuslerp", base, deltas, [ExpertParams(), ExpertParams()], MethodOptions(t=w[1] / (w[0] + w[1])))
    assert_parity(base + out_t, ref, base)


@HYP
@given(shape=st.sampled_from(SHAPES), n=st.integers(2, 4), seed=st.integers(0, 2**31 - 1),
       shared=st.sampled_from([0.0, 0.5, 0.9]))
def test_model_stock_matches_mergekit(shape, n, seed, shared) -> None:
    base, experts, deltas = make_inputs(seed, shape, n)
    if shared:  # correlated task vectors give a non-trivial t
        common = deltas[0]
        experts = [base + shared * common + (1 - shared) * d for d in deltas]
        deltas = [e - base for e in experts]
    ref = merge_tensors([base, *experts], "model_stock", base_index=0)
    out = ours("model_stock", base, deltas, [ExpertParams() for _ in range(n)], MethodOptions())
    assert_parity(base + out, ref, base)


def test_ties_elects_plus_on_exact_zero_sum_and_ignores_zero_weights() -> None:
    """Edge cases of mergekit's get_mask: sum == 0 elects +, zero-valued entries never agree."""
    base = torch.zeros(6)
    d0 = torch.tensor([1.0, -1.0, 0.0, 2.0, 0.0, 0.5])
    d1 = torch.tensor([-1.0, 1.0, 0.0, -2.0, 3.0, 0.5])
    experts = [base + d0, base + d1, base + d0]
    params = [ExpertParams(weight=1.0), ExpertParams(weight=1.0), ExpertParams(weight=0.0)]
    for normalize in (True, False):
        options = MethodOptions(normalize=normalize)
        ref = gta_reference("ties", base, experts, params, options)
        out = ours("ties", base, [d0, d1, d0], params, options)
        assert torch.equal(base + out, ref)


def test_without_tables_matches_with_tables() -> None:
    """tables=None is the slow path (sorts per call) and must agree with precomputed tables."""
    base, experts, deltas = make_inputs(3, (16, 24), 3)
    params = [ExpertParams(weight=w, density=d, gamma=0.05) for w, d in [(1.0, 0.3), (-0.5, 0.6), (0.7, 0.8)]]
    for name in ("ties", "breadcrumbs_ties", "topk", "della"):
        opts = MethodOptions(normalize=False)
        seed = 1 if name == "della" else None
        a = ours(name, base, deltas, params, opts, seed=seed, tables=True)
        b = ours(name, base, deltas, params, opts, seed=seed, tables=False)
        assert torch.equal(a, b), name


def test_topk_is_breadcrumbs_with_zero_gamma() -> None:
    """mergekit cannot name `topk`; it equals mergekit's breadcrumbs with gamma 0 (density*N >= 1)."""
    base, experts, deltas = make_inputs(8, (16, 24), 3)
    params = [ExpertParams(weight=w, density=d, gamma=0.0) for w, d in [(1.2, 0.2), (-0.9, 0.5), (0.4, 0.05)]]
    for normalize in (True, False):
        options = MethodOptions(normalize=normalize, lambda_=0.9)
        ref = gta_reference("breadcrumbs", base, experts, params, options)
        assert_parity(base + ours("topk", base, deltas, params, options), ref, base)


def test_bf16_target_gets_fp32_math() -> None:
    """`out` may be a bf16 target: the merge runs in fp32 and is rounded once at the end."""
    base, experts, deltas = make_inputs(4, (16, 24), 2)
    params = [ExpertParams(weight=0.6, density=0.5), ExpertParams(weight=0.4, density=0.5)]
    ref = ours("ties", base, deltas, params, MethodOptions())
    out = torch.empty_like(base, dtype=torch.bfloat16)
    get_method("ties").merge(out, deltas, params, base=base, options=MethodOptions(),
                             tables=[MagnitudeTable.build(d) for d in deltas], generator=None)
    assert torch.equal(out, ref.to(torch.bfloat16))
    assert math.isfinite(out.float().sum().item())
