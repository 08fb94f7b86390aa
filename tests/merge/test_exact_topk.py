"""Exact magnitude pruning (`_ranks`): mergekit 0.1.5's `magnitude` and `magnitude_outliers` to the
entry, its tie-breaking included, on tensors above 2**18 entries, chunked or whole, eager or fused."""

from __future__ import annotations

import pytest
import torch
from mergekit.sparsify import magnitude, magnitude_outliers

from evomerge.merge import ExpertParams
from evomerge.merge.methods import MagnitudeTable, MethodOptions, get_method, prune_topk_
from evomerge.merge.methods._base import run_plan
from evomerge.merge.methods._breadcrumbs import TieBandSpec, band_spec
from evomerge.merge.methods._gta import Scratch
from evomerge.merge.methods._ties import TieThresholdSpec, magnitude_spec

from .conftest import assert_compiled_equals_eager

N = 300_007  # > 2**18: the sizes that used sampled order statistics before


def _tensor(kind: str, n: int = N, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.01
    if kind == "grid":  # 80 distinct magnitudes: tie groups of thousands, and zeros
        return torch.randint(-40, 41, (n,), generator=g).float() / 64
    if kind == "fp32-of-bf16":  # an fp32 checkpoint trained in bf16: bf16 values, fp32 dtype
        return x.bfloat16().float()
    return x.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kind])


def _chunked(spec, delta: torch.Tensor, chunk: int) -> torch.Tensor:
    flat = delta.reshape(-1)
    if spec.zero:
        return torch.zeros_like(flat)
    parts = []
    for start in range(0, flat.numel(), chunk):
        piece = flat[start:start + chunk]
        parts.append(spec.chunk(piece, start, Scratch(piece)).clone())
    return torch.cat(parts)


KINDS = ["fp32", "bf16", "fp16", "grid", "fp32-of-bf16"]


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_keeps_exactly_mergekits_entries(kind: str) -> None:
    delta = _tensor(kind)
    table = MagnitudeTable.build(delta)
    split = 0
    for density in (1e-5, 0.001, 0.1, 0.33, 0.5, 0.77, 0.999):
        spec = magnitude_spec(delta, ExpertParams(density=density), table, MethodOptions(), None)
        want = magnitude(delta, density)
        split += isinstance(spec, TieThresholdSpec)
        for chunk in (N, 65_536, 4099):
            assert torch.equal(_chunked(spec, delta, chunk), want), (kind, density, chunk)
        assert torch.equal(prune_topk_(delta.clone(), table, density), want), (kind, density)
    if kind != "fp32":
        assert split >= 3, "ties at the boundary must be exercised"


@pytest.mark.parametrize("kind", KINDS)
def test_breadcrumbs_band_keeps_exactly_mergekits_entries(kind: str) -> None:
    delta = _tensor(kind, seed=1)
    table = MagnitudeTable.build(delta)
    split = 0
    for density, gamma in ((0.001, 0.0), (0.1, 0.01), (0.5, 0.2), (0.9, 0.3), (0.3, 0.0), (0.999, 0.01), (2e-6, 0.5)):
        spec = band_spec(delta, ExpertParams(density=density, gamma=gamma), table, MethodOptions(), None)
        split += isinstance(spec, TieBandSpec)
        want = magnitude_outliers(delta, density, gamma=gamma)
        for chunk in (N, 4099):
            assert torch.equal(_chunked(spec, delta, chunk), want), (kind, density, gamma, chunk)
    if kind != "fp32":
        assert split >= 3


def test_approximate_pruning_is_the_opt_in_threshold() -> None:
    """`pruning: approximate` keeps every tie at its interpolated threshold: more than k entries here."""
    delta = _tensor("grid")
    table = MagnitudeTable.build(delta)
    params = ExpertParams(density=0.3)
    exact = _chunked(magnitude_spec(delta, params, table, MethodOptions(), None), delta, N)
    approx = _chunked(magnitude_spec(delta, params, table, MethodOptions(pruning="approximate"), None), delta, N)
    assert int(exact.count_nonzero()) <= int(0.3 * N) < int(approx.count_nonzero())


@pytest.mark.parametrize("inline", [False, True])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "topk", "breadcrumbs"])
def test_fused_kernel_fixes_split_ties_like_the_eager_path(method: str, inline: bool) -> None:
    """The fused kernel runs the plain thresholds and merges the split tie groups' listed entries
    again with their decisions flipped (`_fused._refix`), or, with many listed (`inline`), flips
    them inside its one pass (`_ranks.stamp`): the target equals the eager chunked merge (bit for bit
    for TIES; linear sums within an fp32 multiply-add, then the bf16 cast), and the stats count the
    fixed entries."""
    from evomerge.merge.methods._fused import FusedGta

    g = torch.Generator().manual_seed(4)
    base = (torch.randn(N, generator=g) * 0.02).bfloat16()
    deltas = [_tensor("bf16", seed=s) for s in (5, 6, 7)]
    tables = [MagnitudeTable.build(d) for d in deltas]
    params = [ExpertParams(weight=0.6, density=0.3), ExpertParams(weight=-0.4, density=0.55),
              ExpertParams(weight=0.5, density=0.8)]
    plan = get_method(method).prepare(deltas, params, base=base, options=MethodOptions(), tables=tables,
                                      generator=None, chunk=1 << 16)
    assert sum(s.fix is not None for s in plan.specs) == 3
    merged = torch.empty(N)
    run_plan(plan, merged, 1 << 16)
    eager = (base.float() + merged).bfloat16()
    fused = FusedGta.of(plan)
    assert fused is not None
    fused.inline_fixes = 0.0 if inline else 1.0
    out = torch.empty(N, dtype=torch.bfloat16)
    nnz, l1 = fused.apply(out, base, 1 << 30, stats=True)
    if method.endswith("ties"):
        assert torch.equal(out, eager)
        assert int(nnz) == int(merged.count_nonzero())
    else:
        # one bf16 ulp, or fp32 multiply-add rounding of the inputs where base + merged cancels to ~0
        step = torch.maximum(eager.float().abs() * 2.0**-7, base.float().abs() * 2.0**-20)
        diff = (out.float() - eager.float()).abs()
        assert bool((diff <= step).all()), float((diff / step).max())
        assert abs(int(nnz) - int(merged.count_nonzero())) <= N // 1000
    assert float(l1) == pytest.approx(float(merged.double().abs().sum()), rel=1e-5)
    from evomerge.merge.methods._ranks import _marks

    assert not bool(_marks(N, torch.device("cpu"), torch.int32).any())  # the refix path's pooled marks are cleared


def test_stamped_marks_list_each_use_only_across_the_pools_wrap_around() -> None:
    """`_ranks.stamp` never clears what it marked: each use writes a stamp new to the pool, so an
    entry listed by an earlier use (of any tensor) reads as unlisted now, also after the 255th use,
    when the pool is zeroed and the stamps start again; up to 4 lists take int32 entries, 5-8 int64."""
    from evomerge.merge.methods._ranks import STAMP_LISTS, stamp

    g = torch.Generator().manual_seed(9)
    n = 10_000
    for experts in (3, STAMP_LISTS):
        for use in range(300):
            lists = [None if (use + e) % 5 == 0 else torch.randperm(n, generator=g)[:use % 97 + 1]
                     for e in range(experts)]
            offsets, marks, value = stamp(lists, n)
            assert marks.dtype == (torch.int32 if sum(x is not None for x in lists) <= 4 else torch.int64)
            for fix, offset in zip(lists, offsets):
                listed = ((marks >> (offset - 1)) & 255) == value
                want = torch.zeros(n, dtype=torch.bool)
                if fix is None:
                    assert offset == 0
                    continue
                want[fix] = True
                assert torch.equal(listed, want), (experts, use)
    with pytest.raises(ValueError, match="at most 8 lists"):
        stamp([torch.arange(3)] * (STAMP_LISTS + 1), n)



@pytest.mark.parametrize("inline", [False, True])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_packed_kernel_keeps_split_tie_groups_exact_in_bf16(llama_family, method: str, inline: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 task vectors split a tie group at the boundary of most small tensors: those stay in the
    packed kernel (plain thresholds, then their boundary members merged again, `_fused._refix`, or
    with many listed, `inline`, flipped in its one pass, `_ranks.stamp`) and give the eager engine's
    merge to the bit, with the same stats."""
    import os

    from evomerge.merge import GroupRule, MergeEngine, MergeRecipe
    from evomerge.merge.methods._fused import FusedGta

    if os.environ.get("EVOMERGE_COMPILE") == "0":
        pytest.skip("EVOMERGE_COMPILE=0 forces the eager path")
    monkeypatch.setattr(FusedGta, "inline_fixes", 0.0 if inline else 1.0)
    experts = {e: llama_family[e] for e in ("a", "b", "c")}
    engines = [MergeEngine.load(llama_family["base"], experts, progress=False, compile=mode, dtype=torch.bfloat16)
               for mode in (True, False)]
    band = method == "breadcrumbs_ties"

    def params(weight: float, density: float, gamma: float) -> ExpertParams:
        return ExpertParams(weight=weight, density=density, **({"gamma": gamma} if band else {}))

    rules = [GroupRule(method=method, experts={"a": params(0.6, 0.5, 0.02), "b": params(-0.3, 0.7, 0.05),
                                                "c": params(0.4, 0.35, 0.0)})]
    rules += [GroupRule(layers=[layer], method=method, experts={
        e: params(0.2 + 0.3 * j, 0.15 + 0.3 * ((layer + j) % 3), 0.01 * j) for j, e in enumerate(experts)})
        for layer in range(engines[0].layout.num_layers)]
    recipe = MergeRecipe(rules=rules, normalize=True)
    assert_compiled_equals_eager(engines, recipe, exact=True)
    fused = engines[0]
    assert fused._arena is not None and len(fused._arena.names) == len(fused.layout.slots)  # all packed
    split = sum(spec.fix is not None for _, plan in fused._sources(recipe) if plan is not None for spec in plan.specs)
    assert split >= len(fused.layout.slots), "split tie groups must be exercised"


def _sort_recipes(experts: list[str]):  # type: ignore[no-untyped-def]
    """TIES (top-k order), Breadcrumbs-TIES (ascending order) and DELLA (row ranks), per-layer densities."""
    from evomerge.merge import GroupRule, MergeRecipe

    recipes = []
    for method, extra in (("ties", {}), ("breadcrumbs_ties", {"gamma": 0.02}), ("della", {"epsilon": 0.1})):
        rules = [GroupRule(method=method, experts={e: ExpertParams(weight=0.5, density=0.3 + 0.2 * j, **extra)
                                                   for j, e in enumerate(experts)})]
        recipes.append(MergeRecipe(rules=rules, normalize=True))
    return recipes


def test_build_sorts_side_by_side_gives_the_sorts_and_merges_of_the_first_apply(llama_family) -> None:
    """`build_sorts` (several threads, before the first candidate) builds exactly the permutations and
    row ranks that the first apply built one by one, so every merge is the same to the bit."""
    from evomerge.merge import MergeEngine

    experts = {e: llama_family[e] for e in ("a", "b", "c")}
    lazy, eager = (MergeEngine.load(llama_family["base"], experts, progress=False, dtype=torch.bfloat16) for _ in range(2))
    recipes = _sort_recipes(list(experts))
    assert eager.build_sorts(recipes, threads=3) >= 0
    built = {key: t for key, t in eager._tables.items()}
    assert sum(t._ranks is not None and t._ranks.built(True) is not None for t in built.values()) > 0
    assert sum(t._ranks is not None and t._ranks.built(False) is not None for t in built.values()) > 0
    assert sum(t._row_ranks is not None for t in built.values()) > 0
    for recipe in recipes:
        a, b = lazy.new_target_model(), eager.new_target_model()
        lazy.apply(recipe, a, stats=False)
        eager.apply(recipe, b, stats=False)
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    compared = 0  # the first apply sorts only where a tie group splits; build_sorts wherever one may
    for key, table in built.items():
        other = lazy._tables[key]
        for descending in (True, False):
            mine = None if table._ranks is None else table._ranks.built(descending)
            theirs = None if other._ranks is None else other._ranks.built(descending)
            if mine is not None and theirs is not None:
                assert torch.equal(mine, theirs), key
                compared += 1
        if table._row_ranks is not None:
            assert torch.equal(table._row_ranks, other._row_ranks), key
            compared += 1
    assert compared > len(built)
    assert eager.build_sorts(recipes) >= 0  # all built: nothing to do


def test_build_sorts_refuses_sorts_that_do_not_fit_and_sorts_nothing(llama_family) -> None:
    """The results of exact pruning's sorts are held for the run (4 bytes per entry and expert):
    where they exceed the memory available, one error names the fix before any sort runs; with
    `pruning: approximate` there is nothing to sort."""
    from evomerge.merge import MergeEngine, MergeError

    experts = {e: llama_family[e] for e in ("a", "b")}
    engine = MergeEngine.load(llama_family["base"], experts, progress=False, dtype=torch.bfloat16)
    ties = _sort_recipes(list(experts))[0]
    with pytest.raises(MergeError, match=r"need \d+\.\d GB of memory \(\d+\.\d GB kept for the run, \d+\.\d GB while the largest tensor sorts\) and 0\.0 GB is available, of which 90% \(0\.0 GB\) may be used; set `pruning: approximate`"):
        engine.build_sorts([ties], available=1000)
    largest = 20 * max(engine.base_tensor(n).numel() for n in engine.layout.slots)
    with pytest.raises(MergeError, match=r"while the largest tensor sorts"):  # the largest sort's temporaries count too
        engine.build_sorts([ties], available=int(largest / 0.9) - 1)
    assert all(t._ranks is None or t._ranks.built(True) is None for t in engine._tables.values())
    approximate = ties.model_copy(update={"pruning": "approximate"})
    engine.build_sorts([approximate], available=0)
    assert all(t._ranks is None for t in engine._tables.values())


def test_available_memory_reads_the_machine() -> None:
    import sys

    from evomerge.merge._memory import available_memory

    free = available_memory()
    if sys.platform.startswith("linux"):
        assert free is not None and free > 0


def test_build_sorts_maps_exact_orders_from_disk_when_memory_is_short(llama_family, tmp_path) -> None:
    """Short of memory, with a spill folder that has the room, exact pruning's orders go to
    memory-mapped files there (unlinked at once: the folder stays empty) with a warning that says
    so; the permutations and every merge are the same to the bit. DELLA's row ranks cannot go
    there: short of memory for them, the refusal names what to do."""
    import sys

    from evomerge.merge import MergeEngine, MergeError

    experts = {e: llama_family[e] for e in ("a", "b", "c")}
    lazy, mapped = (MergeEngine.load(llama_family["base"], experts, progress=False, dtype=torch.bfloat16) for _ in range(2))
    ties, band, della = _sort_recipes(list(experts))
    spill = tmp_path / "sorts"
    # room for the largest tensor's sort temporaries (20 bytes per entry), not for the kept orders
    short = int(25 * max(mapped.base_tensor(n).numel() for n in mapped.layout.slots) / 0.9)
    with pytest.warns(UserWarning, match=r"kept in memory-mapped files in .*sorts \(\d+\.\d GB free there"):
        mapped.build_sorts([ties, band], available=short, spill_dir=spill)
    assert list(spill.iterdir()) == []
    if sys.platform.startswith("linux"):
        maps = [line for line in open("/proc/self/maps") if "evomerge-sort-" in line]
        assert maps and all("(deleted)" in line for line in maps)
    for recipe in (ties, band):
        a, b = lazy.new_target_model(), mapped.new_target_model()
        lazy.apply(recipe, a, stats=False)
        mapped.apply(recipe, b, stats=False)
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    for key, table in lazy._tables.items():
        for descending in (True, False):
            theirs = None if table._ranks is None else table._ranks.built(descending)
            if theirs is not None:
                assert torch.equal(theirs, mapped._tables[key]._ranks.built(descending)), key
    with pytest.raises(MergeError, match="merge fewer tensors with DELLA"):
        mapped.build_sorts([della], available=short, spill_dir=spill)
