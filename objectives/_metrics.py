"""Metrics: pure functions from model outputs (texts, token log-probabilities) to numbers.

No model, no tokenizer, no I/O here, so every metric is tested against hand-computed values and
both scorer backends (transformers, vLLM) share exactly the same arithmetic.
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Callable, Literal, Sequence

Extraction = Literal["strip", "first_line", "last_number", "regex"]
LengthNormalization = Literal["sum", "mean"]

_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def extract_answer(text: str, mode: Extraction = "strip", pattern: str | None = None) -> str | None:
    """The part of a generation that is compared with the target; None when nothing is found.

    * ``strip``: the whole text without surrounding whitespace;
    * ``first_line``: the first line, stripped (models often continue after the answer);
    * ``last_number``: the last integer/decimal in the text, thousands separators removed
      (GSM8K-style answers; ``"1,234"`` -> ``"1234"``);
    * ``regex``: group 1 of the first match of ``pattern`` (group 0 if it has no groups).
    """
    if mode == "strip":
        return text.strip()
    if mode == "first_line":
        return text.strip().split("\n", 1)[0].strip()
    if mode == "last_number":
        numbers = _NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else None
    if mode == "regex":
        if pattern is None:
            raise ValueError("extraction 'regex' needs a pattern")
        match = re.search(pattern, text)
        if match is None:
            return None
        return (match.group(1) if match.groups() else match.group(0)).strip()
    raise ValueError(f"unknown extraction {mode!r}; expected strip, first_line, last_number or regex")


def exact_match(prediction: str, target: str, mode: Extraction = "strip", pattern: str | None = None) -> float:
    """1.0 when the extracted prediction equals the extracted target, else 0.0.

    The target goes through the same extraction, so ``"#### 42"`` targets work with
    ``last_number``. A prediction with nothing to extract (empty generation, no number) scores 0.
    """
    pred = extract_answer(prediction, mode, pattern)
    gold = extract_answer(target, mode, pattern)
    if gold is None:
        gold = target.strip()
    return float(pred is not None and pred == gold)


def contains(prediction: str, target: str) -> float:
    """1.0 when the stripped target occurs in the prediction; an empty target never counts."""
    gold = target.strip()
    return float(bool(gold) and gold in prediction)


def choice_score(token_logprobs: Sequence[float], normalization: LengthNormalization = "sum") -> float:
    """Score of one choice: summed log-likelihood, or its mean per token (length-normalized)."""
    if not token_logprobs:
        raise ValueError("a choice must have at least one token")
    total = math.fsum(token_logprobs)
    return total if normalization == "sum" else total / len(token_logprobs)


def predict_choice(scores: Sequence[float]) -> int:
    """Index of the best-scoring choice. Ties go to the lowest index.

    Breaking ties towards the first choice is deterministic and never rewards a model for being
    indifferent: a model that gives every choice the same likelihood is right only when the label
    happens to be 0, as a "pick the first" guesser would be.
    """
    best = 0
    for i, score in enumerate(scores):
        if score > scores[best]:
            best = i
    return best


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; NaN for an empty sequence (which the scorer reports as a failure)."""
    return math.fsum(values) / len(values) if values else math.nan


def answer_cross_entropy(token_logprobs: Sequence[Sequence[float]]) -> float:
    """Teacher-forced cross-entropy of the answers, in nats per answer token (token-weighted mean).

    Weighting by tokens, not by items, equals the loss of one batch of concatenated answers: the
    Evo-Merging fitness. Items with empty answers contribute nothing.
    """
    n = sum(len(row) for row in token_logprobs)
    if n == 0:
        return math.nan
    return -math.fsum(lp for row in token_logprobs for lp in row) / n


def perplexity(token_logprobs: Sequence[Sequence[float]]) -> float:
    """exp(mean negative log-likelihood per token) over all texts (corpus perplexity)."""
    ce = answer_cross_entropy(token_logprobs)
    return math.exp(ce) if not math.isnan(ce) else math.nan


def load_custom_metric(path: str) -> Callable[[str, str], float]:
    """Import a per-item metric ``func(prediction, target) -> float`` given as ``"pkg.mod:func"``."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"custom metric must be given as 'package.module:function', got {path!r}")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import custom metric {path!r}: {exc}") from None
    if not callable(func):
        raise ValueError(f"custom metric {path!r} is not callable")
    return func
