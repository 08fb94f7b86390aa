"""lm-eval-harness tasks as objectives: evomerge's value equals lm-eval's own HF backend on the export.

The tasks are lm-eval YAML files of our own (``dataset_path: json`` with ``data_files`` written
here from the zoo's data), loaded through ``include_path``, so nothing needs the hub. A candidate
is scored in evomerge's live model; the same candidate exported as a Hugging Face folder is then
scored by ``lm_eval.simple_evaluate(model="hf")``; the values must agree.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'evomerge[lm_eval]'")

from evomerge.merge import ExpertParams, GroupRule, MergeRecipe  # noqa: E402
from evomerge.objectives import Objective, TransformersScorer  # noqa: E402
from evomerge.objectives._lm_eval import LmEvalError, LmEvalTask  # noqa: E402

GEN_TASK = """\
task: toy_rev_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
fewshot_delimiter: "\\n"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 10
  do_sample: false
filter_list:
  - name: raw
    filter:
      - function: take_first
  - name: strict
    filter:
      - function: regex
        regex_pattern: "([a-z]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MC_TASK = """\
task: toy_rev_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
fewshot_delimiter: "\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two lm-eval tasks over the zoo's reversal data: generation (exact match) and 4-way choice."""
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    rows = [json.loads(line) for line in (zoo_dir / "data" / "rev" / "calib.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    with open(out / "gen.jsonl", "w") as f:
        for r in rows[:24]:
            f.write(json.dumps({"question": r["prompt"], "answer": r["answer"]}) + "\n")
    with open(out / "mc.jsonl", "w") as f:
        for i, r in enumerate(rows[:24]):
            wrong = rng.sample([x["answer"] for j, x in enumerate(rows) if j != i and x["answer"] != r["answer"]], 3)
            choices = [r["answer"], *wrong]
            rng.shuffle(choices)
            f.write(json.dumps({"question": r["prompt"], "choices": choices, "label": choices.index(r["answer"])}) + "\n")
    (out / "gen.yaml").write_text(GEN_TASK.format(data=out / "gen.jsonl"))
    (out / "mc.yaml").write_text(MC_TASK.format(data=out / "mc.jsonl"))
    return out


def _objectives(task_dir: Path) -> list[Objective]:
    inc = str(task_dir)
    return [
        Objective("rev_gen", "lm_eval", lm_eval=LmEvalTask("toy_rev_gen", num_fewshot=2, limit=16, include_path=inc)),
        Objective("rev_gen_strict", "lm_eval",
                  lm_eval=LmEvalTask("toy_rev_gen", num_fewshot=2, limit=16, filter="strict", include_path=inc)),
        Objective("rev_mc", "lm_eval", lm_eval=LmEvalTask("toy_rev_mc", num_fewshot=1, limit=16, include_path=inc)),
        Objective("rev_mc_norm", "lm_eval",
                  lm_eval=LmEvalTask("toy_rev_mc", num_fewshot=1, limit=16, metric="acc_norm", include_path=inc)),
    ]


def _half_merge(experts: list[str]) -> MergeRecipe:
    """Half of the reversal skill and a bit of another: an imperfect model, so values are not 0 or 1."""
    weights = {experts[0]: 0.6, experts[1]: 0.3}
    return MergeRecipe(rules=[GroupRule(method="task_arithmetic", experts={e: ExpertParams(weight=w) for e, w in weights.items()})],
                       normalize=False)


def test_values_equal_lm_eval_hf_backend_on_the_export(zoo_engine, task_dir: Path, tmp_path: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    experts = ["rev", "sort"]
    recipe = _half_merge(experts)
    objectives = _objectives(task_dir)
    assert [o.direction for o in objectives] == ["maximize"] * 4
    scorer = TransformersScorer(zoo_engine, objectives, batch_size=8, max_new_tokens=4)
    first = scorer.evaluate(recipe)
    assert not first.failed, first.reason
    again = scorer.evaluate(recipe)  # same prompts every candidate: few-shot draws are re-seeded
    assert again.values == first.values
    assert len(first.details["rev_mc"]) == 16 and {"prediction", "target", "acc"} <= set(first.details["rev_mc"][0])

    export = zoo_engine.export(recipe, tmp_path / "candidate")
    # simple_evaluate takes one num_fewshot for all tasks: score each task at the objective's count.
    ref = {}
    for task, shots in (("toy_rev_gen", 2), ("toy_rev_mc", 1)):
        out = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(export), "dtype": "float32"}, device="cpu", batch_size=8,
            tasks=[task], task_manager=TaskManager(include_path=str(task_dir)), limit=16, num_fewshot=shots,
            bootstrap_iters=0,
        )
        ref.update(out["results"])
    expected = {
        "rev_gen": ref["toy_rev_gen"]["exact_match,raw"],
        "rev_gen_strict": ref["toy_rev_gen"]["exact_match,strict"],
        "rev_mc": ref["toy_rev_mc"]["acc,none"],
        "rev_mc_norm": ref["toy_rev_mc"]["acc_norm,none"],
    }
    assert first.values == pytest.approx(expected, abs=1e-9)
    # The candidate is neither hopeless nor perfect on every task, so equality says something.
    assert any(0.0 < v < 1.0 for v in expected.values()), expected


def test_unknown_metric_and_filter_are_one_line(task_dir: Path) -> None:
    with pytest.raises(LmEvalError, match=r"toy_rev_mc' has no metric 'f1'; it computes acc, acc_norm"):
        Objective("x", "lm_eval", lm_eval=LmEvalTask("toy_rev_mc", metric="f1", include_path=str(task_dir)))
    with pytest.raises(LmEvalError, match=r"has no filter 'loose'; its filters: raw, strict"):
        Objective("x", "lm_eval", lm_eval=LmEvalTask("toy_rev_gen", filter="loose", include_path=str(task_dir)))
    with pytest.raises(LmEvalError, match=r"'no_such_task' cannot be loaded"):
        Objective("x", "lm_eval", lm_eval=LmEvalTask("no_such_task", include_path=str(task_dir)))


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}q {{ m['content'] }}\n{% else %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}a {% endif %}"
)
"""A chat template in the zoo's alphabet: user turns start with 'q ', the answer slot with 'a '."""


def test_chat_template_and_multiturn_fewshot_equal_lm_eval(zoo_engine, zoo_dir: Path, task_dir: Path, tmp_path: Path) -> None:
    """``apply_chat_template`` (few-shot examples as turns) gives lm-eval's HF-backend value too."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(zoo_dir / "base"))
    tokenizer.chat_template = CHAT_TEMPLATE
    inc = str(task_dir)
    objectives = [
        Objective("gen_chat", "lm_eval", lm_eval=LmEvalTask("toy_rev_gen", num_fewshot=2, limit=12, include_path=inc, apply_chat_template=True)),
        Objective("mc_chat", "lm_eval", lm_eval=LmEvalTask("toy_rev_mc", num_fewshot=2, limit=12, include_path=inc, apply_chat_template=True)),
    ]
    recipe = _half_merge(["rev", "sort"])
    evaluation = TransformersScorer(zoo_engine, objectives, batch_size=8, tokenizer=tokenizer).evaluate(recipe)
    assert not evaluation.failed, evaluation.reason
    export = zoo_engine.export(recipe, tmp_path / "candidate")
    tokenizer.save_pretrained(str(export))
    ref = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(export), "dtype": "float32"}, device="cpu", batch_size=8,
        tasks=["toy_rev_gen", "toy_rev_mc"], task_manager=TaskManager(include_path=inc), limit=12, num_fewshot=2,
        bootstrap_iters=0, apply_chat_template=True, fewshot_as_multiturn=True,
    )["results"]
    assert evaluation.values == pytest.approx({"gen_chat": ref["toy_rev_gen"]["exact_match,raw"], "mc_chat": ref["toy_rev_mc"]["acc,none"]}, abs=1e-9)
    prompt = evaluation.details["gen_chat"][0]
    assert prompt["prediction"] is not None
    with pytest.raises(LmEvalError, match="has no chat template"):
        TransformersScorer(zoo_engine, objectives[:1], batch_size=8)  # the zoo's own tokenizer has none


def _vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: not this environment
        return False
    return True


@pytest.mark.vllm
@pytest.mark.skipif(not _vllm_importable(), reason="vLLM not importable (run with the vLLM environment, see README)")
def test_vllm_backend_scores_lm_eval_tasks_as_transformers_does(zoo_dir: Path, zoo_experts, zoo_engine, task_dir: Path) -> None:
    """The same requests through vLLM's greedy and prompt-logprob paths (fp32): the same values."""
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from evomerge.objectives import VllmScorer

    objectives = _objectives(task_dir)
    recipe = _half_merge(["rev", "sort"])
    want = TransformersScorer(zoo_engine, objectives, batch_size=8).evaluate(recipe)
    scorer = VllmScorer(zoo_dir / "base", zoo_experts, objectives, dtype="float32", max_model_len=256, allow_cpu=True)
    try:
        got = scorer.evaluate(recipe)
    finally:
        scorer.close()
    assert not got.failed, got.reason
    assert got.values == pytest.approx(want.values, abs=1e-9)
