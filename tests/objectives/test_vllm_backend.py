"""The vLLM backend against the transformers backend on the tiny zoo, for real (vLLM's CPU build).

Run with the vLLM environment: ``.venv-vllm/bin/python -m pytest tests/objectives -m vllm``.
In fp32 both backends compute the same function, so greedy outputs must be identical and
log-likelihoods agree to float32 accumulation noise (LOGPROB_TOL per token, measured ~2e-6).
"""

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: starts in ~3 s
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except Exception:  # noqa: BLE001 - any import failure means: not this environment
    HAVE_VLLM = False

from evomerge.merge import ExpertParams, GroupRule, MergeRecipe
from evomerge.objectives import TransformersScorer, VllmScorer

LOGPROB_TOL = 1e-4
"""Absolute tolerance on per-token log-probs and mean losses (fp32; vLLM's kernels sum differently)."""

needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM not importable (run with the vLLM environment, see README)")


def recipe(weights: dict[str, float], method: str = "task_arithmetic") -> MergeRecipe:
    return MergeRecipe(rules=[GroupRule(method=method, experts={n: ExpertParams(weight=w) for n, w in weights.items()})], normalize=False)


CANDIDATES = [recipe({"rev": 1.0}), recipe({"sort": 1.0, "rev": 0.4}, "ties"), recipe({"rev": 0.5, "shift": 0.5, "sort": 0.3})]


@pytest.fixture(scope="module")
def vllm_scorer(zoo_dir, zoo_experts, zoo_objectives):
    scorer = VllmScorer(zoo_dir / "base", zoo_experts, zoo_objectives, dtype="float32", max_new_tokens=12,
                        max_model_len=128, allow_cpu=True)
    yield scorer
    scorer.close()


@pytest.fixture(scope="module")
def hf_scorer(zoo_engine, zoo_objectives):
    with TransformersScorer(zoo_engine, zoo_objectives, batch_size=8, max_new_tokens=12) as scorer:
        yield scorer


@needs_vllm
@pytest.mark.vllm
def test_swapped_candidates_match_the_transformers_backend(vllm_scorer, hf_scorer):
    """Three candidates swapped into one engine in turn score as each fresh candidate does."""
    for r in CANDIDATES:
        got, want = vllm_scorer.evaluate(r), hf_scorer.evaluate(r)
        assert not got.failed, got.reason
        for name, value in want.values.items():
            obj = next(o for o in vllm_scorer.objectives if o.name == name)
            if obj.metric in ("exact_match", "response_length", "mc_accuracy", "changed_params", "kept_fraction"):
                assert got.values[name] == value, name
            elif obj.metric == "perplexity":
                assert got.values[name] == pytest.approx(value, rel=LOGPROB_TOL), name
            else:
                assert got.values[name] == pytest.approx(value, abs=LOGPROB_TOL, rel=1e-6), name
        for row_v, row_h in zip(got.details["rev_acc"], want.details["rev_acc"]):
            assert row_v["prediction"] == row_h["prediction"]
        for row_v, row_h in zip(got.details["rev_mc"], want.details["rev_mc"]):
            assert row_v["scores"] == pytest.approx(row_h["scores"], abs=LOGPROB_TOL * 10)
        assert got.timings["merge"] > 0 and got.timings["swap"] > 0


@needs_vllm
@pytest.mark.vllm
def test_warm_up_sorts_in_the_workers_engine(vllm_scorer, hf_scorer):
    """`warm_up` runs the one-time sorts of exact TIES in the vLLM worker's engine (the one that
    merges), once: a second warm-up finds them built; the candidate scores as the transformers one."""
    rule = GroupRule(method="ties", experts={"rev": ExpertParams(weight=0.8, density=0.4),
                                             "sort": ExpertParams(weight=0.6, density=0.6)})
    pruned = MergeRecipe(rules=[rule])
    first = vllm_scorer.warm_up(pruned)
    assert not first.failed, first.reason
    assert first.timings["sorts"] > 0
    assert vllm_scorer.warm_up(pruned).timings["sorts"] < 0.05
    want = hf_scorer.evaluate(pruned)
    assert {k: v for k, v in first.values.items() if k.endswith("_acc")} == {
        k: v for k, v in want.values.items() if k.endswith("_acc")}


@needs_vllm
@pytest.mark.vllm
def test_returning_to_a_candidate_reproduces_it(vllm_scorer):
    first = vllm_scorer.evaluate(CANDIDATES[0])
    vllm_scorer.evaluate(CANDIDATES[1])
    again = vllm_scorer.evaluate(CANDIDATES[0])
    assert again.values == first.values and again.details == first.details


@needs_vllm
@pytest.mark.vllm
def test_failures_are_results(vllm_scorer):
    bad = vllm_scorer.evaluate(recipe({"nobody": 1.0}))
    assert bad.failed and "nobody" in bad.reason
    assert vllm_scorer.evaluate(CANDIDATES[0], timeout=1e-6).failed
    assert not vllm_scorer.evaluate(CANDIDATES[0]).failed


@needs_vllm
@pytest.mark.vllm
def test_cpu_needs_explicit_permission(zoo_dir, zoo_experts, zoo_objectives):
    with pytest.raises(RuntimeError, match="needs a GPU") as info:
        VllmScorer(zoo_dir / "base", zoo_experts, zoo_objectives)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message given when vLLM is missing")
def test_missing_vllm_is_a_one_line_error(zoo_dir, zoo_experts, zoo_objectives):
    with pytest.raises(ImportError, match=r"needs vLLM.*pip install 'evomerge\[vllm\]'") as info:
        VllmScorer(zoo_dir / "base", zoo_experts, zoo_objectives)
    assert "\n" not in str(info.value)
