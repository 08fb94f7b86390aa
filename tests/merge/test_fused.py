"""Fused compiled kernels (`methods/_fused.py`) against the eager chunked path.

Compiling is slow (seconds per variant), so the tests use few variants: 2 experts, each (method,
dtype, normalize) compiled once per session (`_fused` caches kernels per process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evomerge.merge import ExpertParams, GroupRule, MergeEngine, MergeRecipe
from evomerge.merge.methods import MagnitudeTable, MethodOptions, get_method, mask_generator
from evomerge.merge.methods._base import chunks
from evomerge.merge.methods._gta import l1_rescale
from evomerge.merge.methods._draws import window_mask
from evomerge.merge.methods._fused import FusedGta

from .conftest import assert_compiled_equals_eager

N = 3 * 4096 + 17  # ragged last chunk
CHUNK = 4096
PARAMS = [ExpertParams(weight=0.7, density=0.4, gamma=0.05), ExpertParams(weight=-0.4, density=0.6, gamma=0.1)]


def _inputs(dtype: torch.dtype, n: int = N, named: bool = False) -> tuple[torch.Tensor, list[torch.Tensor], list[MagnitudeTable]]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g).to(dtype)
    deltas = [(torch.randn(n, generator=g) * 0.01).to(dtype) for _ in PARAMS]
    return base, deltas, [MagnitudeTable.build(d, identity=f"e{i}\x1ft" if named else None) for i, d in enumerate(deltas)]


def _both(method: str, dtype: torch.dtype, normalize: bool, n: int = N, named: bool = False,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(eager chunked target, fused target) of one merge, `target = (base + merged).to(dtype)`; `named`
    tables give large DARE tensors their kept L1 from a `WindowL1`, as in the engine."""
    base, deltas, tables = _inputs(dtype, n, named)
    m = get_method(method)
    options = MethodOptions(normalize=normalize, lambda_=0.9, seed=4)

    def plan():
        gen = mask_generator(1, 2, "t", "cpu") if m.is_random else None
        return m.prepare(deltas, PARAMS, base=base, options=options, tables=tables, generator=gen, chunk=CHUNK)

    eager_plan, merged = plan(), torch.empty(n)
    for lo, hi in chunks(n, CHUNK):
        eager_plan.run(merged[lo:hi], lo, hi)
    eager = (merged + base.float()).to(dtype)
    fused = FusedGta.of(plan())
    assert fused is not None
    out = torch.empty(n, dtype=dtype)
    fused.apply(out, base, CHUNK, stats=False)
    return eager, out


def _assert_close(eager: torch.Tensor, fused: torch.Tensor) -> None:
    # fp32 math in both; only fused multiply-add rounding differs (~1 fp32 ulp), which may flip the
    # final rounding to bf16 of a few entries by one bf16 ulp.
    rtol = 1e-6 if eager.dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(fused.float(), eager.float(), rtol=rtol, atol=1e-7)


GTA = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "topk", "breadcrumbs", "breadcrumbs_ties", "della",
       "della_linear"]


@pytest.mark.parametrize("method", GTA)
def test_fused_equals_eager_fp32(method: str) -> None:
    _assert_close(*_both(method, torch.float32, normalize=True))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "della"])
def test_fused_equals_eager_bf16(method: str) -> None:
    _assert_close(*_both(method, torch.bfloat16, normalize=True))


def test_fused_ties_without_normalize() -> None:
    _assert_close(*_both("ties", torch.float32, normalize=False))


def test_dare_masks_identical_to_eager_draws() -> None:
    """One expert, delta 1, base 0, paper rescale: the fused output is exactly the mask / density."""
    density, ones = 0.3, torch.ones(N)
    gen = mask_generator(5, 7, "w", "cpu")
    plan = get_method("dare_linear").prepare([ones], [ExpertParams(weight=1.0, density=density)], base=None,
                                             options=MethodOptions(normalize=False, rescale="paper"), tables=None,
                                             generator=gen, chunk=CHUNK)
    out = torch.empty(N)
    FusedGta.of(plan).apply(out, torch.zeros(N), CHUNK, stats=False)
    spec = plan.specs[0]
    mask = window_mask(torch.empty(N), torch.empty(N, dtype=torch.int32), torch.empty(N, dtype=torch.int32),
                       spec.key, 0, spec.shift, spec.bound)
    assert torch.equal(out != 0, mask.bool())
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 4096 / round(density * 4096)))


@pytest.mark.parametrize("rescale", ["paper", "mergekit"])
def test_della_masks_identical_to_eager_draws(rescale: str) -> None:
    """Two rows, magnitudes rising along each, base 0: the fused kernel keeps exactly the entries the
    eager draws keep (exact fp64 uniforms and keep lines, so no multiply-add contraction can move a
    decision), each over p ("paper") or times mergekit's L1 restore factor (the fused L1 pass)."""
    rows = torch.linspace(1, 2, N // 2).repeat(2, 1)  # ranks ascending along each row
    params = [ExpertParams(weight=1.0, density=0.45, epsilon=0.2)]
    table = MagnitudeTable.build(rows)

    def plan():
        return get_method("della_linear").prepare(
            [rows], params, base=None, options=MethodOptions(normalize=False, rescale=rescale), tables=[table],
            generator=mask_generator(5, 7, "w", "cpu"), chunk=CHUNK)

    eager_plan, eager = plan(), torch.empty(rows.numel())
    for lo, hi in chunks(rows.numel(), CHUNK):
        eager_plan.run(eager[lo:hi], lo, hi)
    fused = torch.empty(rows.numel())
    FusedGta.of(plan()).apply(fused, torch.zeros(rows.numel()), CHUNK, stats=False)
    assert torch.equal(fused != 0, eager != 0)
    kept = (fused != 0).view(2, -1).float()
    assert 0.2 < kept[:, :100].mean() < 0.35 and 0.55 < kept[:, -100:].mean() < 0.7  # p rises with the rank
    torch.testing.assert_close(fused, eager, rtol=1e-6, atol=0)


BIG = (1 << 18) + 4099  # a WindowL1 built over several chunks


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_fused_equals_eager_with_window_l1(method: str) -> None:
    _assert_close(*_both(method, torch.float32, normalize=True, n=BIG, named=True))


@pytest.mark.parametrize("n", [37, N, BIG])
def test_window_l1_factor_equals_a_pass_over_the_masked_entries(n: int) -> None:
    """mergekit's L1 restore looked up in the WindowL1 equals the factor a pass over the kept entries
    computes (fp64 sums in another order: equal to fp32 rounding), on a trial's window of the run's field.
    Every size gets a WindowL1 (small tensors too): no DARE plan of the engine's is left pending."""
    _, deltas, tables = _inputs(torch.bfloat16, n, named=True)
    plan = get_method("dare_ties").prepare(deltas, PARAMS, base=None, options=MethodOptions(seed=9), tables=tables,
                                           generator=mask_generator(9, 3, "t", "cpu"), chunk=CHUNK)
    assert plan.pending_rescale is None and all(not s.pending for s in plan.specs)
    looked_up = [s.rescale for s in plan.specs]
    assert all(1.2 < f < 5 for f in looked_up)  # ~1/density
    for spec in plan.specs:
        spec.pending = True
    l1_rescale(plan.specs, plan.flats, tables, CHUNK, torch.device("cpu"))
    assert [s.rescale for s in plan.specs] == pytest.approx(looked_up, rel=2e-7)


@pytest.fixture(scope="module")
def engines(llama_family: dict[str, Path]) -> tuple[MergeEngine, MergeEngine]:
    experts = {e: llama_family[e] for e in ("a", "b")}
    return (MergeEngine.load(llama_family["base"], experts, progress=False, compile=True),
            MergeEngine.load(llama_family["base"], experts, progress=False, compile=False))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_engine_compiled_equals_eager(engines: tuple[MergeEngine, MergeEngine], method: str) -> None:
    fused, eager = engines
    if os.environ.get("EVOMERGE_COMPILE") == "0":
        pytest.skip("EVOMERGE_COMPILE=0 forces the eager path")
    assert fused.fused and not eager.fused
    recipe = MergeRecipe(rules=[GroupRule(method=method, experts={
        "a": ExpertParams(weight=0.6, density=0.5), "b": ExpertParams(weight=-0.3, density=0.7)})], seed=3)
    assert_compiled_equals_eager(engines, recipe)


PER_LAYER = [
    GroupRule(method="ties", experts={"a": ExpertParams(weight=0.6, density=0.5), "b": ExpertParams(weight=-0.3, density=0.7)}),
    # a band for one expert in layer 0 (the packed kernel then bands every tensor of that expert)
    GroupRule(layers=[0], method="breadcrumbs_ties", experts={
        "a": ExpertParams(weight=0.9, density=0.6, gamma=0.05), "b": ExpertParams(weight=0.4, density=1.0)}),
    # only one expert, one with weight 0: the packed tables carry zeros for the others
    GroupRule(layers=[1], kinds=["mlp"], method="ties", experts={
        "b": ExpertParams(weight=0.5, density=0.3), "a": ExpertParams(weight=0.0, density=0.5)}),
    # another method family (linear combine) and a non-task-vector method: both stay per tensor
    GroupRule(layers=[1], kinds=["attention"], method="task_arithmetic", experts={
        "a": ExpertParams(weight=0.3), "b": ExpertParams(weight=0.2)}),
    GroupRule(layers=["embed"], method="slerp", t=0.3, experts={"a": ExpertParams()}),
]


@pytest.mark.parametrize("case", ["per_layer", "dare_paper", "dare_mergekit", "keep_base_groups"])
def test_packed_small_tensors_equal_eager(engines: tuple[MergeEngine, MergeEngine], case: str) -> None:
    """Per-layer parameters, mixed methods, experts missing from a rule, DARE drawn per tensor index
    and rescaled per tensor, and groups without a rule (their base is kept): the packed arena merges
    each exactly as eager."""
    fused, _ = engines
    if os.environ.get("EVOMERGE_COMPILE") == "0":
        pytest.skip("EVOMERGE_COMPILE=0 forces the eager path")
    if case == "per_layer":
        recipe = MergeRecipe(rules=PER_LAYER, normalize=True)
    elif case == "dare_paper":
        recipe = MergeRecipe(rules=[GroupRule(method="dare_ties", experts={
            "a": ExpertParams(weight=0.7, density=0.4), "b": ExpertParams(weight=0.5, density=0.8)})],
            rescale="paper", seed=5, trial=11)
    elif case == "dare_mergekit":  # the L1 rescale: kept L1 per tensor from the packed pass 1
        recipe = MergeRecipe(rules=[GroupRule(method="dare_linear", experts={
            "a": ExpertParams(weight=0.7, density=0.4), "b": ExpertParams(weight=0.5, density=0.8)}),
            GroupRule(layers=[1], method="dare_linear", experts={"b": ExpertParams(weight=0.9, density=0.2)})],
            seed=6, trial=2)
    else:
        recipe = MergeRecipe(rules=[GroupRule(layers=[0], method="ties", experts={
            "a": ExpertParams(weight=0.6, density=0.5), "b": ExpertParams(weight=0.3, density=0.7)})])
    assert_compiled_equals_eager(engines, recipe)  # packed small tensors + per-tensor kernels
    assert fused._arena is not None and len(fused._arena.names) == len(fused.layout.slots)  # all tiny: all packed


def test_compile_policy(engines: tuple[MergeEngine, MergeEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    fused, eager = engines
    auto = MergeEngine.__new__(MergeEngine)
    auto.compile, auto.num_params = "auto", eager.num_params
    monkeypatch.delenv("EVOMERGE_COMPILE", raising=False)
    assert auto.fused and not eager.fused  # "auto" fuses every size, even a tiny model
    monkeypatch.setenv("EVOMERGE_COMPILE", "1")
    assert auto.fused and eager.fused
    monkeypatch.setenv("EVOMERGE_COMPILE", "0")
    assert not fused.fused


def test_warm_up_compiles_and_builds_before_the_first_timed_apply(engines: tuple[MergeEngine, MergeEngine]) -> None:
    """`warm_up` leaves nothing one-time for a later apply of the same methods: its applies build
    the tables and compile each variant (with and without stats), and it wrote the recipe's merge."""
    from evomerge.merge.methods import _fused

    fused, eager = engines
    if os.environ.get("EVOMERGE_COMPILE") == "0":
        pytest.skip("EVOMERGE_COMPILE=0 forces the eager path")
    recipe = MergeRecipe(rules=[GroupRule(method="breadcrumbs_ties", experts={
        "a": ExpertParams(weight=0.4, density=0.6, gamma=0.1), "b": ExpertParams(weight=0.8, density=0.5, gamma=0.05)})],
        seed=8)
    target = {n: torch.empty_like(fused.base_tensor(n)) for n in fused.layout.slots}
    assert fused.warm_up([recipe], target) > 0
    ready, tables = set(_fused._READY), len(fused._tables)
    assert any(key[0] == "packed" and key[4] for key in ready) and any(key[0] == "packed" and not key[4] for key in ready)
    expected = {n: torch.empty_like(eager.base_tensor(n)) for n in eager.layout.slots}
    eager.apply(recipe, expected)
    for name in expected:
        torch.testing.assert_close(target[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
    fused.apply(recipe, target, stats=True)
    fused.apply(recipe, target, stats=False)
    assert set(_fused._READY) == ready and len(fused._tables) == tables


FALLBACK = """
import warnings, torch
from evomerge.merge import ExpertParams, GroupRule, MergeEngine, MergeRecipe
base, a, b = {paths!r}
recipe = MergeRecipe(rules=[GroupRule(method="ties", experts={{"a": ExpertParams(weight=0.6, density=0.5),
                                                               "b": ExpertParams(weight=0.3, density=0.7)}})])
out = []
for compile in (True, False):
    engine = MergeEngine.load(base, {{"a": a, "b": b}}, progress=False, compile=compile)
    target = {{n: torch.empty_like(engine.base_tensor(n)) for n in engine.layout.slots}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.apply(recipe, target)
        engine.apply(recipe, target)
    out.append(target)
    if compile:
        lines = [str(w.message) for w in caught if str(w.message).startswith("evomerge: torch.compile")]
        assert len(lines) == 1, lines
        assert "C++ compiler" in lines[0], lines
        assert not engine.fused
assert all(torch.equal(out[0][n], out[1][n]) for n in out[0])
print("ok")
"""


def test_compile_failure_falls_back_with_one_warning(llama_family: dict[str, Path], tmp_path: Path) -> None:
    """A real compile failure: inductor pointed at a C++ compiler that does not exist (fresh process and
    empty inductor cache, so nothing compiled earlier can be reused)."""
    code = FALLBACK.format(paths=(str(llama_family["base"]), str(llama_family["a"]), str(llama_family["b"])))
    env = {**os.environ, "CXX": "/nonexistent/c++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "OMP_NUM_THREADS": "1"}
    env.pop("EVOMERGE_COMPILE", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok" in done.stdout
