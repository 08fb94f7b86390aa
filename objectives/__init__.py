"""evomerge.objectives: calibration sets, metrics, objectives and the scorers that evaluate recipes.

Public API::

    CalibrationSet.load(path, *, name=None, size=None, seed=0, chat_template=False, system_prompt=None)
    Objective(name, metric, calibration=None, direction=None, extract="strip", pattern=None,
              normalization="sum", function=None, lm_eval=None)
    LmEvalTask(task, num_fewshot=None, limit=None, metric=None, filter=None, include_path=None)
    # metric "lm_eval": an lm-eval-harness task (optional extra `lm_eval`)
    TransformersScorer(engine, objectives, *, device="cpu", dtype=None, batch_size=32,
                       max_new_tokens=32, stop=("\n",), timeout=None, tokenizer=None)
    VllmScorer(base, experts, objectives, *, dtype="bfloat16", max_new_tokens=32, stop=("\n"),
               max_model_len=None, timeout=None, seed=0, gpu_memory_utilization=0.85,
               allow_cpu=False, engine_kwargs=None)  # optional extra `vllm`
    scorer.evaluate(recipe, *, timeout=None, items=None) -> Evaluation  # items: the first N per calibration set
    scorer.extend(evaluation, items, *, timeout=None) -> Evaluation    # the live candidate on more items
    scorer.items(items=None) -> int                                     # calibration items such an evaluation scores
"""

from __future__ import annotations

from evomerge.merge._lazy import lazy_members

# Loaded on first use (`merge._lazy`): submodule -> the public names it provides.
__getattr__, __all__ = lazy_members(__name__, {
    "._calibration": ["CalibrationError", "CalibrationItem", "CalibrationSet"],
    "._costs": ["COSTS"],
    "._evaluation": ["Evaluation"],
    "._metrics": [
        "answer_cross_entropy", "choice_score", "contains", "exact_match", "extract_answer", "load_custom_metric",
        "perplexity", "predict_choice",
    ],
    "._lm_eval": ["LmEvalError", "LmEvalTask", "lm_eval_direction", "lm_eval_installed"],
    "._objective": ["LM_EVAL", "METRICS", "Objective"],
    "._plan": ["Generation"],
    "._scorer": ["Deadline", "EvaluationTimeout", "Scorer", "SwapResult"],
    "._transformers_scorer": ["TransformersScorer"],
    "._vllm_scorer": ["VllmScorer"],
    "._vllm_compat": ["vllm_problem"],
})
