"""evomerge.objectives: calibration sets, metrics, objectives and the scorers that evaluate recipes.

Public API::

    CalibrationSet.load(path, *, name=None, size=None, seed=0, chat_template=False, system_prompt=None)
    Objective(name, metric, calibration=None, direction=None, extract="strip", pattern=None,
              normalization="sum", function=None, lm_eval=None)
    LmEvalTask(task, num_fewshot=None, limit=None, metric=None, filter=None, include_path=None)
    # metric "lm_eval": an lm-eval-harness task (optional extra `lm_eval`)
    TransformersScorer(engine, objectives, *, device="cpu", dtype=None, batch_size=32,
                       max_new_tokens=32, stop=("\\n",), timeout=None, tokenizer=None)
    VllmScorer(base, experts, objectives, *, dtype="bfloat16", max_new_tokens=32, stop=("\\n",),
               max_model_len=None, timeout=None, seed=0, gpu_memory_utilization=0.85,
               allow_cpu=False, engine_kwargs=None)  # optional extra `vllm`
    scorer.evaluate(recipe, *, timeout=None) -> Evaluation
"""

from ._calibration import CalibrationError, CalibrationItem, CalibrationSet
from ._costs import COSTS
from ._evaluation import Evaluation
from ._metrics import (
    answer_cross_entropy,
    choice_score,
    contains,
    exact_match,
    extract_answer,
    load_custom_metric,
    perplexity,
    predict_choice,
)
from ._lm_eval import LmEvalError, LmEvalTask, lm_eval_direction, lm_eval_installed
from ._objective import LM_EVAL, METRICS, Objective
from ._plan import Generation
from ._scorer import Deadline, EvaluationTimeout, Scorer, SwapResult
from ._transformers_scorer import TransformersScorer
from ._vllm_scorer import VllmScorer

__all__ = [
    "COSTS",
    "LM_EVAL",
    "METRICS",
    "CalibrationError",
    "CalibrationItem",
    "CalibrationSet",
    "Deadline",
    "Evaluation",
    "EvaluationTimeout",
    "Generation",
    "LmEvalError",
    "LmEvalTask",
    "Objective",
    "Scorer",
    "SwapResult",
    "TransformersScorer",
    "VllmScorer",
    "answer_cross_entropy",
    "choice_score",
    "contains",
    "exact_match",
    "extract_answer",
    "lm_eval_direction",
    "lm_eval_installed",
    "load_custom_metric",
    "perplexity",
    "predict_choice",
]
