"""From objectives to model requests and back: the part both scorer backends share.

At scorer construction every calibration set is tokenized once into the requests its objectives
need (one generation pass per set however many generation metrics read it; teacher-forced
(prefix, continuation) pairs for answer losses, choices and perplexity texts). Per candidate the
backend only runs those requests; turning outputs into objective values is done here with the pure
metric functions, so transformers and vLLM cannot disagree on arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from ._calibration import CalibrationError, CalibrationItem, CalibrationSet
from ._costs import COSTS
from ._lm_eval import LmEvalSuite
from ._metrics import (
    answer_cross_entropy,
    choice_score,
    contains,
    exact_match,
    extract_answer,
    load_custom_metric,
    mean,
    perplexity,
    predict_choice,
)
from ._objective import GENERATION_METRICS, Objective

TokenIds = list[int]


@dataclass(frozen=True)
class Generation:
    """One greedy generation: the text up to (excluding) EOS or the first stop string, and the
    number of generated tokens, counting the one that completed a stop string but not EOS."""

    text: str
    num_tokens: int
    draft_logprobs: list[float] | None = None
    """The draft's teacher-forced log-probs, when the backend computed them on the way (None if not)."""


GenerateFn = Callable[..., list[Generation]]
"""Backend call: greedy generations for tokenized (prompt, draft) pairs (stop rules are the
backend's, or the keywords ``stop`` / ``max_new_tokens``). The draft is the reference answer (or
empty): a backend may use it to verify many greedy tokens in one forward, but the generation must
not depend on it."""
LogprobFn = Callable[[Sequence[tuple[TokenIds, TokenIds]]], list[list[float]]]
"""Backend call: log p(continuation token | prefix + earlier continuation) for each pair."""


@dataclass
class _SetRequests:
    """Everything one calibration set needs from the model, tokenized."""

    calibration: CalibrationSet
    prompts: list[TokenIds] = field(default_factory=list)
    drafts: list[TokenIds] = field(default_factory=list)
    needs_generation: bool = False
    answer_pairs: list[tuple[TokenIds, TokenIds]] = field(default_factory=list)
    choice_pairs: list[tuple[TokenIds, TokenIds]] = field(default_factory=list)
    text_pairs: list[tuple[TokenIds, TokenIds]] = field(default_factory=list)
    items: tuple[Any, ...] = ()
    """The calibration items these requests stand for (all of the set's, or a window of them)."""

    def window(self, start: int, stop: int | None) -> "_SetRequests":
        """The requests of items ``[start, stop)`` only (a lower rung, or the items a promotion adds)."""
        if start == 0 and (stop is None or stop >= len(self.items)):
            return self
        items = self.items[start:stop]
        offsets = [0]
        for item in self.items:
            offsets.append(offsets[-1] + len(item.choices or ()))
        first, last = offsets[min(start, len(self.items))], offsets[len(self.items) if stop is None else min(stop, len(self.items))]
        return replace(
            self, prompts=self.prompts[start:stop], drafts=self.drafts[start:stop], answer_pairs=self.answer_pairs[start:stop],
            choice_pairs=self.choice_pairs[first:last], text_pairs=self.text_pairs[start:stop], items=items,
        )


class ScoringPlan:
    """Tokenized requests for a list of objectives, and the reduction of outputs to values."""

    def __init__(self, objectives: Sequence[Objective], tokenizer: Any, context_length: int | None = None) -> None:
        """``context_length``: the model's (positions it was built for); a calibration item longer
        than that is refused here, once, rather than scored at a crawl (or garbled) per candidate."""
        names = [o.name for o in objectives]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"objective names must be unique; repeated: {', '.join(duplicates)}")
        self.objectives = list(objectives)
        self._custom = {o.name: load_custom_metric(o.function) for o in objectives if o.metric == "custom"}
        self._sets: dict[int, _SetRequests] = {}
        for obj in self.objectives:
            if obj.calibration is None:
                continue
            req = self._sets.get(id(obj.calibration))
            if req is None:
                req = self._sets[id(obj.calibration)] = _tokenize(obj.calibration, tokenizer, context_length)
            req.needs_generation |= obj.metric in GENERATION_METRICS
        # lm-eval tasks build their own requests (prompts, few-shot examples) through lm-eval.
        self._lm_eval = LmEvalSuite(self.objectives, tokenizer) if any(o.lm_eval for o in self.objectives) else None

    @property
    def needs_costs(self) -> bool:
        """Whether any objective reads `MergeStats` (the engine then spends a pass computing them)."""
        return any(o.is_cost for o in self.objectives)

    def items(self, stop: int | None = None) -> int:
        """Calibration items an evaluation of the first ``stop`` items of every set (all when None)
        scores: the cost unit of multi-fidelity search and of the scoring budget."""
        return sum(len(req.items) if stop is None else min(stop, len(req.items)) for req in self._sets.values())

    def run(
        self, generate: GenerateFn, logprobs: LogprobFn, costs: Any, *, start: int = 0, stop: int | None = None,
    ) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]], int]:
        """Run the backend calls and reduce them. Returns values, details, sequences scored.

        ``costs`` is the engine's `MergeStats` for this candidate. ``start`` / ``stop``: score only
        items ``[start, stop)`` of every calibration set (multi-fidelity search: a rung, or the
        items a promotion adds; `combine` joins windows); lm-eval tasks have no such window.
        """
        if (start, stop) != (0, None) and self._lm_eval is not None:
            raise ValueError("lm-eval objectives are scored whole; a window of calibration items needs calibration sets")
        sets = {key: req.window(start, stop) for key, req in self._sets.items()}
        values: dict[str, float] = {}
        details: dict[str, list[dict[str, Any]]] = {}
        # Requests of every set go to the backend in one call per kind, so batches are full and
        # length-sorted across sets (4 sets of 16 prompts make one batch of 64, not four of 16).
        generation_requests: list[tuple[int, str, list[Any]]] = []
        logprob_requests: list[tuple[int, str, list[Any]]] = []
        outputs: dict[int, dict[str, Any]] = {key: {} for key in sets}
        for key, req in sets.items():
            if req.needs_generation:
                generation_requests.append((key, "generations", list(zip(req.prompts, req.drafts))))
        n_sequences = _run_packed(generate, generation_requests, outputs)
        for key, req in sets.items():
            metrics = {o.metric for o in self.objectives if o.calibration is req.calibration}
            # The drafts of a generation set are its answers: a backend that verified them
            # returned their log-probs, and the answer loss needs no second forward.
            drafted = [g.draft_logprobs for g in outputs[key].get("generations", [])]
            if "answer_loss" in metrics and drafted and all(lp is not None for lp in drafted):
                outputs[key]["answer_lp"] = drafted
                metrics.discard("answer_loss")
                n_sequences += len(drafted)
            for metric, pairs, slot in (
                ("answer_loss", req.answer_pairs, "answer_lp"),
                ("mc_accuracy", req.choice_pairs, "choice_lp"),
                ("perplexity", req.text_pairs, "text_lp"),
            ):
                if metric in metrics:
                    logprob_requests.append((key, slot, pairs))
        n_sequences += _run_packed(logprobs, logprob_requests, outputs)
        task_values: dict[str, float] = {}
        if self._lm_eval is not None:
            task_values, task_details, n_tasks = self._lm_eval.run(generate, logprobs)
            details.update(task_details)
            n_sequences += n_tasks
        for obj in self.objectives:
            if obj.is_cost:
                values[obj.name] = COSTS[obj.metric](costs)
            elif obj.lm_eval is not None:
                values[obj.name] = task_values[obj.name]
            else:
                values[obj.name], details[obj.name] = self._reduce(obj, outputs[id(obj.calibration)], sets[id(obj.calibration)].items)
        return values, details, n_sequences

    def combine(self, values: dict[str, float], details: dict[str, list[dict[str, Any]]],
                more: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
        """The values and details of two windows of items of one candidate joined (`run`'s
        ``details`` of each): every metric's value recomputed from the joined per-item rows, so a
        promotion pays only for the items it adds. Costs (read from the merge) carry over."""
        joined = {name: [*details.get(name, []), *more.get(name, [])] for name in {*details, *more}}
        out = dict(values)
        for obj in self.objectives:
            if obj.calibration is not None:
                out[obj.name] = rows_value(obj.metric, joined[obj.name])
        return out, joined

    def _reduce(self, obj: Objective, out: dict[str, Any], items: Sequence[Any]) -> tuple[float, list[dict[str, Any]]]:
        if obj.metric in GENERATION_METRICS:
            gens: list[Generation] = out["generations"]
            rows: list[dict[str, Any]] = []
            for item, gen in zip(items, gens):
                row: dict[str, Any] = {"prediction": gen.text, "target": item.answer}
                if obj.metric == "exact_match":
                    row["extracted"] = extract_answer(gen.text, obj.extract, obj.pattern)
                    row["correct"] = exact_match(gen.text, item.answer, obj.extract, obj.pattern)
                elif obj.metric == "contains":
                    row["correct"] = contains(gen.text, item.answer)
                elif obj.metric == "custom":
                    row["score"] = float(self._custom[obj.name](gen.text, item.answer))
                else:
                    row["tokens"] = gen.num_tokens
                rows.append(row)
            return rows_value(obj.metric, rows), rows
        if obj.metric == "answer_loss":
            lps: list[list[float]] = out["answer_lp"]
            rows = [{"target": it.answer, "loss": answer_cross_entropy([lp]), "tokens": len(lp)} for it, lp in zip(items, lps)]
            return answer_cross_entropy(lps), rows
        if obj.metric == "perplexity":
            lps = out["text_lp"]
            rows = [{"target": it.text, "loss": answer_cross_entropy([lp]), "tokens": len(lp)} for it, lp in zip(items, lps)]
            return perplexity(lps), rows
        # mc_accuracy: choice log-probs are flat, in item order then choice order.
        flat: list[list[float]] = out["choice_lp"]
        rows, pos = [], 0
        for item in items:
            n = len(item.choices)  # type: ignore[arg-type]
            scores = [choice_score(lp, obj.normalization) for lp in flat[pos : pos + n]]
            pos += n
            pred = predict_choice(scores)
            rows.append({"prediction": pred, "target": item.label, "correct": float(pred == item.label), "scores": scores})
        return rows_value(obj.metric, rows), rows


def rows_value(metric: str, rows: Sequence[dict[str, Any]]) -> float:
    """A metric's value from its per-item rows (`ScoringPlan.run`'s details): what the objective's
    reduction gives on those items, and the one map from a metric to the row field it averages.
    Losses are token-weighted, as `answer_cross_entropy` is (`_reduce` computes them from the
    token log-probs themselves, to the last bit; from rows they agree within rounding)."""
    if metric in ("exact_match", "contains", "mc_accuracy"):
        return mean([r["correct"] for r in rows])
    if metric == "custom":
        return mean([r["score"] for r in rows])
    if metric == "response_length":
        return mean([r["tokens"] for r in rows])
    counted = [r for r in rows if r["tokens"]]  # an empty answer has no tokens and contributes nothing
    tokens = sum(r["tokens"] for r in counted)
    loss = math.fsum(r["loss"] * r["tokens"] for r in counted) / tokens if tokens else math.nan
    return math.exp(loss) if metric == "perplexity" and not math.isnan(loss) else loss


def _run_packed(call: Callable[[list[Any]], list[Any]], requests: list[tuple[int, str, list[Any]]], outputs: dict[int, dict[str, Any]]) -> int:
    """One backend call for all `requests` (set key, output slot, inputs); results go back per slot."""
    flat = [x for _, _, inputs in requests for x in inputs]
    if not flat:
        return 0
    results = call(flat)
    pos = 0
    for key, slot, inputs in requests:
        outputs[key][slot] = results[pos : pos + len(inputs)]
        pos += len(inputs)
    return len(flat)


def _tokenize(cal: CalibrationSet, tokenizer: Any, context_length: int | None) -> _SetRequests:
    req = _SetRequests(cal, items=cal.items)
    # A chat template carries its own BOS/special tokens; plain prompts get the tokenizer's.
    special = not cal.chat_template

    def encode(text: str, add_special: bool) -> TokenIds:
        # verbose=False: an item past the tokenizer's model_max_length is refused below in one line
        return list(tokenizer(text, add_special_tokens=add_special, verbose=False)["input_ids"])

    def split(prefix_text: str, continuation: str) -> tuple[TokenIds, TokenIds]:
        # Tokenize the whole string and cut at the prefix, so the continuation's tokens are the
        # ones the model would see in context; fall back to separate tokenization when a token
        # straddles the boundary.
        prefix = encode(prefix_text, special)
        if not prefix:
            raise CalibrationError(f"{cal.path or cal.name}: a prompt tokenizes to nothing and the tokenizer adds no BOS; "
                                   "nothing to condition on")
        whole = encode(prefix_text + continuation, special)
        if whole[: len(prefix)] == prefix and len(whole) > len(prefix):
            return prefix, whole[len(prefix) :]
        return prefix, encode(continuation, False)

    if cal.kind == "perplexity":
        for item in cal.items:
            ids = encode(item.text, True)  # type: ignore[arg-type]
            if len(ids) < 2:
                raise CalibrationError(f"{cal.path or cal.name}: text {item.text!r} has fewer than 2 tokens; nothing to score")
            _check_fits(cal, item, len(ids), context_length)
            req.text_pairs.append((ids[:1], ids[1:]))  # the first token (BOS) has no context
        return req
    for item in cal.items:
        prompt = cal.render_prompt(item.prompt, tokenizer)  # type: ignore[arg-type]
        req.prompts.append(encode(prompt, special))
        if cal.kind == "generation":
            req.answer_pairs.append(split(prompt, item.answer))  # type: ignore[arg-type]
            req.drafts.append(req.answer_pairs[-1][1])
            pairs = req.answer_pairs[-1:]
        else:
            pairs = [split(prompt, choice) for choice in item.choices]  # type: ignore[union-attr]
            req.choice_pairs.extend(pairs)
            req.drafts.append([])
        _check_fits(cal, item, max(len(a) + len(b) for a, b in pairs), context_length)
    return req


def _check_fits(cal: CalibrationSet, item: CalibrationItem, tokens: int, context_length: int | None) -> None:
    """An item the model cannot take in one window: a 200k-character prompt kept the toy zoo's
    256-position model in its warm-up for over ten minutes, and positions past the context score
    as noise."""
    if context_length is not None and tokens > context_length:
        start = (item.text if item.text is not None else item.prompt or "")[:40]
        raise CalibrationError(f"{cal.path or cal.name}: an item of {tokens} tokens (starting {start!r}) is longer than "
                               f"the model's context of {context_length} tokens; shorten it or drop it")
