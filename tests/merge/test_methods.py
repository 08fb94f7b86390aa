"""Unit and distribution tests of evomerge.merge.methods (mergekit parity lives in test_methods_parity.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mergekit import merge_methods as mk_methods
from mergekit.sparsify import magnitude as mk_magnitude
from mergekit.sparsify import magnitude_outliers as mk_magnitude_outliers

from evomerge.merge._recipe import ExpertParams
from evomerge.merge.methods import (
    METHOD_NAMES, METHODS, MagnitudeTable, MergeMethod, MethodOptions, get_method, mask_generator, mask_seed, prune_topk_,
)

ALL = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
       "della_linear", "slerp", "nuslerp", "model_stock", "topk"]


def run(name, deltas, params, *, base=None, options=MethodOptions(), tables=True, seed=0, out=None):
    method = get_method(name)
    base = torch.zeros_like(deltas[0], dtype=torch.float32) if base is None else base
    out = torch.empty_like(base) if out is None else out
    tabs = [MagnitudeTable.build(d) for d in deltas] if tables else None
    gen = torch.Generator().manual_seed(seed) if method.is_random else None
    method.merge(out, deltas, params, base=base, options=options, tables=tabs, generator=gen)
    return out


# -- registry -------------------------------------------------------------------------------------

def test_registry_has_every_method_with_consistent_metadata() -> None:
    assert sorted(METHODS) == sorted(ALL)
    assert tuple(METHODS) == METHOD_NAMES  # the torch-free list the spec is checked against
    mergekit_names = {m.spec.name for m in mk_methods.registered_methods()}
    for name, method in METHODS.items():
        assert isinstance(method, MergeMethod) and method.name == name
        assert method.mergekit_name is None or method.mergekit_name in mergekit_names
        assert method.is_random == (name.startswith(("dare", "della")))
        lo, hi = method.expert_count
        assert lo >= 1 and (hi is None or hi >= lo)
        assert method.uses <= {"weight", "density", "gamma", "epsilon", "t", "normalize", "lambda", "rescale"}
    assert METHODS["topk"].mergekit_name is None
    assert {n for n, m in METHODS.items() if m.needs_base} == {"slerp", "nuslerp", "model_stock"}


def test_get_method_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown merge method 'nope'; choose one of: .*dare_ties"):
        get_method("nope")


# -- mask generator -------------------------------------------------------------------------------

def test_mask_generator_is_deterministic_and_distinguishes_inputs() -> None:
    def draw(*key):
        return torch.rand(64, generator=mask_generator(*key, device="cpu"))

    assert torch.equal(draw(1, 2, "a.weight"), draw(1, 2, "a.weight"))
    for other in [(1, 3, "a.weight"), (2, 2, "a.weight"), (1, 2, "b.weight")]:
        assert not torch.equal(draw(1, 2, "a.weight"), draw(*other))


def test_mask_seed_is_stable_across_processes() -> None:
    """Python's hash() is salted per process; the mask seed must not be."""
    code = "from evomerge.merge.methods import mask_seed; print(mask_seed(7, 3, 'model.layers.0.mlp'))"
    # this process runs with a random hash salt; the child with a fixed, different one
    env = dict(os.environ, PYTHONHASHSEED="12345")
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert child.stdout.strip() == str(mask_seed(7, 3, "model.layers.0.mlp"))


# -- magnitude tables -----------------------------------------------------------------------------

@pytest.mark.parametrize("density", [0.001, 0.1, 0.37, 0.5, 0.99])
def test_exact_table_threshold_is_mergekits_kth_value(density: float) -> None:
    delta = torch.randn(40, 50, generator=torch.Generator().manual_seed(1))
    table = MagnitudeTable.build(delta)
    assert table.exact
    kept = delta.abs() >= table.threshold(density)
    assert torch.equal(kept, mk_magnitude(delta, density) != 0)


def test_quantile_table_density_error_bound() -> None:
    """N > resolution: the kept fraction is within 1/R + 1/N of mergekit's k/N."""
    n, resolution = 300_007, 256
    delta = torch.randn(n, generator=torch.Generator().manual_seed(2)) * torch.rand(n, generator=torch.Generator().manual_seed(3))
    table = MagnitudeTable.build(delta, resolution=resolution)
    assert not table.exact and table.values.numel() == resolution + 1
    magnitudes = delta.abs()
    for density in torch.linspace(0.001, 0.999, 57).tolist():
        k = max(1, int(density * n))
        kept = int((magnitudes >= table.threshold(density)).sum())
        assert abs(kept - k) / n <= 1 / resolution + 1 / n, density


def test_band_matches_mergekit_magnitude_outliers() -> None:
    from evomerge.merge.methods._magnitude import prune_band

    delta = torch.randn(30, 20, generator=torch.Generator().manual_seed(4))
    table = MagnitudeTable.build(delta)
    for density, gamma in [(0.5, 0.01), (0.9, 0.2), (0.3, 0.0), (0.05, 0.5), (0.999, 0.3)]:
        band = table.band(density, gamma)
        assert band is not None
        got = prune_band(delta, *band, out=torch.empty_like(delta), scratch=torch.empty_like(delta))
        assert torch.equal(got, mk_magnitude_outliers(delta, density, gamma=gamma))
    assert table.band(0.001, 0.1) is None  # int(density * N) == 0 keeps nothing, as mergekit


def test_prune_topk_in_place_matches_mergekit_magnitude() -> None:
    a = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))  # a LoRA A matrix (rank 8)
    expected = mk_magnitude(a.clone(), 0.25)
    table = MagnitudeTable.build(a)
    ptr = a.data_ptr()
    result = prune_topk_(a, table, 0.25)
    assert result.data_ptr() == ptr and torch.equal(a, expected)
    b = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    assert torch.equal(prune_topk_(b.clone(), None, 0.1), mk_magnitude(b, 0.1))
    assert torch.equal(prune_topk_(b.clone(), None, 1.0), b)
    assert prune_topk_(b.clone(), None, 0.0).count_nonzero() == 0


def test_della_row_ranks_built_once_and_cached() -> None:
    delta = torch.randn(6, 10)
    table = MagnitudeTable.build(delta, della=True)
    ranks, row_len = table.row_ranks(delta)
    assert row_len == 10 and ranks.dtype == torch.int16
    assert torch.equal(ranks.long(), delta.abs().argsort(dim=1).argsort(dim=1))
    assert table.row_ranks(delta)[0] is ranks


# -- random methods: density 1 equals the deterministic counterparts --------------------------------

@pytest.mark.parametrize("random_name, exact_name", [("dare_linear", "task_arithmetic"), ("dare_ties", "ties"),
                                                     ("della", "ties"), ("della_linear", "task_arithmetic")])
@pytest.mark.parametrize("normalize", [True, False])
def test_random_methods_at_density_one_equal_deterministic(random_name, exact_name, normalize) -> None:
    g = torch.Generator().manual_seed(7)
    deltas = [torch.randn(12, 9, generator=g) for _ in range(3)]
    params = [ExpertParams(weight=w, density=1.0) for w in (0.8, -0.4, 1.1)]
    options = MethodOptions(normalize=normalize, lambda_=0.9)
    assert torch.equal(run(random_name, deltas, params, options=options),
                       run(exact_name, deltas, params, options=options))


# -- random methods: distribution ----------------------------------------------------------------

N_BIG = 200_000


def _big_delta(seed: int = 8) -> torch.Tensor:
    return torch.randn(400, N_BIG // 400, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.8])
def test_kept_fraction_is_density(name: str, density: float) -> None:
    delta = _big_delta()
    p = ExpertParams(weight=1.0, density=density, epsilon=0.1)
    out = run(name, [delta], [p], options=MethodOptions(normalize=False))
    kept = out.count_nonzero().item() / delta.numel()
    sigma = (density * (1 - density) / delta.numel()) ** 0.5
    assert abs(kept - density) < 5 * sigma + 1e-3


@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
def test_mergekit_rescale_restores_l1_norm(name: str) -> None:
    delta = _big_delta()
    out = run(name, [delta], [ExpertParams(weight=1.0, density=0.3, epsilon=0.1)],
              options=MethodOptions(normalize=False, rescale="mergekit"))
    torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=0)


def test_dare_paper_rescale_is_one_over_density() -> None:
    delta = _big_delta()
    out = run("dare_linear", [delta], [ExpertParams(weight=1.0, density=0.25)],
              options=MethodOptions(normalize=False, rescale="paper"))
    kept = out != 0
    torch.testing.assert_close(out[kept], delta[kept] / 0.25, rtol=1e-6, atol=0)


def test_della_paper_rescale_divides_by_keep_probability() -> None:
    delta = torch.randn(5, 101, generator=torch.Generator().manual_seed(9))
    density, eps = 0.5, 0.2
    out = run("della_linear", [delta], [ExpertParams(weight=1.0, density=density, epsilon=eps)],
              options=MethodOptions(normalize=False, rescale="paper"))
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).float()
    probs = (density - eps) + ranks / 100 * 2 * eps
    kept = out != 0
    torch.testing.assert_close(out[kept], (delta / probs)[kept], rtol=1e-6, atol=0)


def test_della_keeps_large_magnitudes_more_often() -> None:
    delta = _big_delta()
    density, eps = 0.5, 0.2
    out = run("della_linear", [delta], [ExpertParams(weight=1.0, density=density, epsilon=eps)],
              options=MethodOptions(normalize=False))
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    cols = delta.shape[1]
    low = (out != 0)[ranks < cols // 5].float().mean().item()
    high = (out != 0)[ranks >= cols - cols // 5].float().mean().item()
    # expected ~ density - 0.8*eps and density + 0.8*eps
    assert abs(low - (density - 0.8 * eps)) < 0.02 and abs(high - (density + 0.8 * eps)) < 0.02


@pytest.mark.parametrize("name, exact", [("dare_linear", "task_arithmetic"), ("dare_ties", "ties"),
                                         ("della_linear", "task_arithmetic"), ("della", "ties")])
def test_expectation_of_random_merge_is_the_undropped_merge(name: str, exact: str) -> None:
    """Paper rescale is unbiased for the linear variants; for TIES the sign election sees the dropped
    tensors, so we only check the linear variants' mean and the TIES variants' correlation."""
    g = torch.Generator().manual_seed(10)
    deltas = [torch.randn(2000, generator=g) for _ in range(2)]
    params = [ExpertParams(weight=0.7, density=0.6, epsilon=0.1), ExpertParams(weight=0.5, density=0.4, epsilon=0.1)]
    options = MethodOptions(normalize=False, rescale="paper")
    draws = 400
    mean = torch.zeros(2000)
    for seed in range(draws):
        mean += run(name, deltas, params, options=options, seed=seed)
    mean /= draws
    full = run(exact, deltas, [p.model_copy(update={"density": 1.0}) for p in params], options=options)
    if exact == "task_arithmetic":
        # per-entry std of one draw <= sum_i |w_i d_i| sqrt((1-p)/p); mean of 400 draws shrinks it 20x
        err = (mean - full).abs()
        bound = sum(abs(p.weight) * d.abs() * ((1 - p.density) / p.density) ** 0.5
                    for p, d in zip(params, deltas)) / draws**0.5
        assert (err <= 5 * bound + 1e-6).float().mean() > 0.999
    else:
        assert torch.corrcoef(torch.stack([mean, full]))[0, 1] > 0.9


# -- validation -----------------------------------------------------------------------------------

def test_validation_errors_are_clear() -> None:
    d = [torch.randn(4, 4) for _ in range(3)]
    base = torch.randn(4, 4)
    out = torch.empty(4, 4)
    two = [ExpertParams(), ExpertParams()]
    opts = MethodOptions()

    def merge(name, deltas, params, **kw):
        kw = {"base": base, "options": opts, "tables": None, "generator": None} | kw
        get_method(name).merge(out, deltas, params, **kw)

    with pytest.raises(ValueError, match="slerp needs exactly 1 expert"):
        merge("slerp", d[:2], two, options=MethodOptions(t=0.5))
    with pytest.raises(ValueError, match="slerp needs t"):
        merge("slerp", d[:1], two[:1])
    with pytest.raises(ValueError, match="nuslerp needs exactly 2"):
        merge("nuslerp", d, [ExpertParams()] * 3)
    with pytest.raises(ValueError, match="model_stock needs at least 2"):
        merge("model_stock", d[:1], two[:1])
    with pytest.raises(ValueError, match="3 deltas but 2 ExpertParams"):
        merge("ties", d, two)
    with pytest.raises(ValueError, match="needs the base tensor"):
        merge("model_stock", d[:2], two, base=None)
    with pytest.raises(ValueError, match="pass a generator"):
        merge("dare_ties", d[:2], two)
    with pytest.raises(ValueError, match="density - epsilon > 0"):
        merge("della", d[:2], [ExpertParams(density=0.1, epsilon=0.15)] * 2, generator=torch.Generator())
    with pytest.raises(ValueError, match="shape"):
        merge("ties", [torch.randn(4, 5), d[0]], two)
    with pytest.raises(ValueError, match="linear without normalize needs the base"):
        merge("linear", d[:2], two, base=None, options=MethodOptions(normalize=False))
    with pytest.raises(ValueError, match="must not alias"):
        get_method("ties").merge(d[0], d[:2], two, base=base, options=opts, tables=None, generator=None)
    with pytest.raises(ValueError, match="rescale"):
        MethodOptions(rescale="l2")  # type: ignore[arg-type]


def test_inputs_are_not_modified() -> None:
    g = torch.Generator().manual_seed(11)
    base = torch.randn(10, 12, generator=g)
    deltas = [torch.randn(10, 12, generator=g) for _ in range(2)]
    copies = [d.clone() for d in deltas]
    base_copy = base.clone()
    params = [ExpertParams(weight=0.6, density=0.5, gamma=0.05, epsilon=0.1), ExpertParams(weight=-0.3, density=0.7)]
    for name in ALL:
        ps = params[:1] if name == "slerp" else params
        run(name, deltas[: len(ps)], ps, base=base, options=MethodOptions(t=0.3))
        assert torch.equal(base, base_copy) and all(torch.equal(a, b) for a, b in zip(deltas, copies)), name


@pytest.mark.parametrize("name", ALL)
def test_bf16_task_vectors_merge_close_to_fp32(name: str) -> None:
    """The engine may cache task vectors in bf16; results must match the fp32 merge of the rounded values."""
    g = torch.Generator().manual_seed(12)
    base = torch.randn(24, 32, generator=g)
    deltas = [(0.05 * torch.randn(24, 32, generator=g)).to(torch.bfloat16) for _ in range(2)]
    params = [ExpertParams(weight=0.6, density=0.5, gamma=0.05, epsilon=0.1), ExpertParams(weight=0.5, density=0.6)]
    ps = params[:1] if name == "slerp" else params
    ds = deltas[: len(ps)]
    low = run(name, ds, ps, base=base, options=MethodOptions(t=0.3))
    if METHODS[name].is_random:  # different draws in bf16 vs fp32 work dtype on CPU: check sanity only
        assert torch.isfinite(low).all() and low.count_nonzero() > 0
        return
    high = run(name, [d.float() for d in ds], ps, base=base, options=MethodOptions(t=0.3))
    torch.testing.assert_close(low, high, rtol=1e-5, atol=1e-6)


def test_bf16_threshold_bound_is_torchs_nextafter() -> None:
    """The bf16 hardshrink bound is computed in bit arithmetic; it must be exactly torch's
    `nextafter(bf16(t), 0)` (double -> fp32 -> bf16 rounding) or thresholds would keep other entries."""
    import random

    from evomerge.merge.methods._magnitude import _strict_below

    rng = random.Random(3)
    values = [rng.lognormvariate(0, 1) * 10 ** rng.uniform(-44, 38) for _ in range(5000)]
    exact = torch.arange(1, 0x7F80, 13, dtype=torch.int32).bitwise_left_shift(16).view(torch.float32).tolist()
    values += exact + [v * (1 + 2**-9) for v in exact] + [v * (1 - 2**-10) for v in exact]  # ties and near-ties
    values += [3.3895313892515355e38, 3.4e38, 1e-45, 1e-39, 5e-324, 0.0, float("inf")]
    zero = torch.zeros((), dtype=torch.bfloat16)
    for value in values:
        expected = float(torch.nextafter(torch.tensor(value, dtype=torch.bfloat16), zero))
        assert _strict_below(value, torch.bfloat16) == expected, value
