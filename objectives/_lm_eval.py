"""Objectives from lm-eval-harness tasks, scored with the scorer's live model.

Users who evaluate merges with lm-eval-harness (GSM8K, MMLU, ARC, their own YAML tasks) should not
rewrite those tasks as JSONL. An `LmEvalTask` names a task; lm-eval itself builds the prompts
(templates, few-shot examples), applies the filters and computes the metrics, through its public
API (`TaskManager.load`, `lm_eval.evaluate`). Only the model calls are evomerge's: `ScorerLM`, an
`lm_eval.api.model.TemplateLM`, answers lm-eval's requests with the scorer's batched log-likelihood
and greedy-generation calls, so one candidate costs one merge and both backends (transformers,
vLLM) serve lm-eval tasks.

Tokenization follows lm-eval's HF backend (`TemplateLM`'s context/continuation split, BOS as the
tokenizer adds it, its left truncation and rolling windows, its stop-sequence handling), so a
candidate's value equals ``lm_eval.simple_evaluate(model="hf", pretrained=<exported candidate>)``.

Tasks are loaded once per process (`load_task`); every evaluation re-seeds the few-shot sampler
as `simple_evaluate` does, so every candidate sees the same prompts.

lm-eval is an optional extra (``pip install 'evomerge[lm_eval]'``); nothing here imports it
until an lm-eval objective is built.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Callable, Literal, Sequence

DEFAULT_FEWSHOT_SEED = 1234
"""`lm_eval.simple_evaluate`'s default ``fewshot_random_seed``."""
INSTALL = "pip install 'evomerge[lm_eval]'"

TokenIds = list[int]


class LmEvalError(ValueError):
    """An lm-eval objective that cannot work (extra missing, unknown task/metric); one line."""


def lm_eval_installed() -> bool:
    """Whether the optional lm-eval package can be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def require_lm_eval() -> None:
    if not lm_eval_installed():
        raise LmEvalError(f"lm-eval tasks need the lm-eval package; install it with: {INSTALL}")


@dataclass(frozen=True)
class LmEvalTask:
    """Which lm-eval task an objective scores, and how.

    ``task``: a task or group name lm-eval knows (its registry, or YAML files under
    ``include_path``); ``num_fewshot`` and ``limit`` as in `lm_eval.simple_evaluate` (``limit``:
    the first N documents, or a fraction < 1); ``metric`` / ``filter``: which of the task's
    results is the objective (default: its first metric, first filter); ``fewshot_seed``: the
    few-shot sampler's seed (simple_evaluate's default); ``apply_chat_template``,
    ``fewshot_as_multiturn`` and ``system_instruction`` as in `lm_eval.simple_evaluate` (the
    tokenizer's chat template wraps the prompts; few-shot examples as turns).
    """

    task: str
    num_fewshot: int | None = None
    limit: int | float | None = None
    metric: str | None = None
    filter: str | None = None
    include_path: str | None = None
    fewshot_seed: int = DEFAULT_FEWSHOT_SEED
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = True
    system_instruction: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LmEvalTask":
        return cls(**data)

    @property
    def requests_key(self) -> "LmEvalTask":
        """Tasks with the same key share their requests; only metric and filter differ."""
        from dataclasses import replace

        return replace(self, metric=None, filter=None)


# ------------------------------------------------------------------------------------------ loading


@dataclass
class LoadedTask:
    """lm-eval's loaded task dict (``TaskManager.load``) with the objective's result key."""

    spec: LmEvalTask
    task_dict: dict[str, Any]
    result_key: str
    """``"<metric>,<filter>"`` in lm-eval's results."""
    higher_is_better: bool

    def reseed(self) -> None:
        """Reset the few-shot samplers, so this evaluation draws the same examples as every other."""
        for task in self.task_dict["tasks"].values():
            task.set_fewshot_seed(seed=self.spec.fewshot_seed)


@lru_cache(maxsize=None)
def _task_dict(key: LmEvalTask) -> dict[str, Any]:
    """Load and configure a task once per process, exactly as `simple_evaluate` configures it."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=key.include_path)
    try:
        loaded = manager.load([key.task])
    except Exception as exc:  # noqa: BLE001 - lm-eval raises KeyError/ValueError/... for unknown tasks
        raise LmEvalError(f"lm-eval task {key.task!r} cannot be loaded ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
                          + ("" if key.include_path else "; a task of your own needs 'include_path' (its YAML folder)")) from None
    for task in loaded["tasks"].values():
        if key.num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=key.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        if task.get_config("output_type") == "generate_until":
            gen = task.get_config("generation_kwargs") or {}
            if gen.get("do_sample") or float(gen.get("temperature", 0.0) or 0.0) > 0:
                raise LmEvalError(f"lm-eval task {task.get_config('task')!r} samples (do_sample/temperature); evomerge scores candidates greedily")
    return loaded


def _result_key(spec: LmEvalTask, tasks: dict[str, Any]) -> tuple[str, bool]:
    """The ``metric,filter`` key and its direction, checked against what the tasks compute."""
    metrics: dict[str, bool] = {}
    filters: list[str] = []
    for task in tasks.values():
        for name, higher in task.higher_is_better().items():
            metrics.setdefault(name, bool(higher))
        for entry in task.get_config("filter_list") or [{"name": "none"}]:
            if entry["name"] not in filters:
                filters.append(entry["name"])
    metric = spec.metric or next(iter(metrics), None)
    if metric not in metrics:
        raise LmEvalError(f"lm-eval task {spec.task!r} has no metric {metric!r}; it computes {', '.join(metrics)}")
    name = spec.filter or filters[0]
    if name not in filters:
        raise LmEvalError(f"lm-eval task {spec.task!r} has no filter {name!r}; its filters: {', '.join(filters)}")
    for task in tasks.values():
        if (task.OUTPUT_TYPE, metric) in _NEEDS_GREEDY_FLAGS:
            raise LmEvalError(f"lm-eval task {spec.task!r}: metric {metric!r} of a {task.OUTPUT_TYPE} task needs greedy "
                              "flags, which evomerge's scorers do not compute; choose another metric")
    return f"{metric},{name}", metrics[metric]


_NEEDS_GREEDY_FLAGS = {("loglikelihood", "acc"), ("multiple_choice", "exact_match")}
"""Metrics lm-eval computes from ``is_greedy`` (whether the continuation is the greedy decode);
the scorers return log-likelihoods only, so these are refused rather than reported wrong."""


def load_task(spec: LmEvalTask) -> LoadedTask:
    """The configured task of ``spec`` (loaded once per process) and the result it reports."""
    task_dict = _task_dict(spec.requests_key)
    key, higher = _result_key(spec, task_dict["tasks"])
    return LoadedTask(spec, task_dict, key, higher)


def lm_eval_direction(spec: LmEvalTask) -> Literal["maximize", "minimize"]:
    """The objective's natural direction: lm-eval's ``higher_is_better`` for the chosen metric."""
    return "maximize" if load_task(spec).higher_is_better else "minimize"


# ---------------------------------------------------------------------------------------------- LM

GenerateFn = Callable[..., list[Any]]
"""``generate(requests, stop=..., max_new_tokens=...)`` -> `Generation`s (the scorer's greedy path)."""
LogprobFn = Callable[[Sequence[tuple[TokenIds, TokenIds]]], list[list[float]]]


def scorer_lm(tokenizer: Any, generate: GenerateFn, logprobs: LogprobFn, max_length: int) -> Any:
    """An lm-eval model whose requests run on a scorer's live model (see `ScorerLM` below).

    The class is defined here, not at module level, because its base class comes from the optional
    lm-eval extra, which this module must not import until an lm-eval objective is scored.
    """
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class ScorerLM(TemplateLM):
        """lm-eval's HF-backend conventions over the scorer's batched calls.

        Log-likelihoods sum the scorer's per-token log-probabilities; ``is_greedy`` is not computed
        (`_NEEDS_GREEDY_FLAGS` keeps the metrics that read it out). Generation is greedy with the
        request's stop sequences (plus EOS) and ``max_gen_toks``.
        """

        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = tokenizer
            self.sequences = 0

        @property
        def eot_token_id(self) -> int:
            return tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                       **kwargs: Any) -> list[int]:
            special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            if add_special_tokens is None and has_bos_prefix(string, tokenizer.decode(self.prefix_token_id)):
                special = {"add_special_tokens": False}  # the string brings its own BOS
            ids = list(tokenizer.encode(string, **special))
            return ids[-left_truncate_len:] if left_truncate_len else ids

        @property
        def tokenizer_name(self) -> str:
            return tokenizer.name_or_path.replace("/", "__")

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            """As lm-eval's HF backend: the tokenizer's template; without the system turn if it rejects one."""
            import jinja2

            def render(history: list[dict[str, str]]) -> str:
                return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                     continue_final_message=not add_generation_prompt)
            try:
                return render(chat_history)
            except jinja2.exceptions.TemplateError:
                return render([m for m in chat_history if m["role"] != "system"])

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
            return super().loglikelihood(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests: list[Any], **kwargs: Any) -> list[tuple[float, bool]]:
            pairs = []
            for _, context, continuation in requests:
                whole = (context + continuation)[-(max_length + 1):]  # the HF backend's left truncation
                pairs.append((whole[: len(whole) - len(continuation)], continuation))
            self.sequences += len(pairs)
            return [(float(sum(lp)), False) for lp in logprobs(pairs)]

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = True) -> list[float]:
            windows: list[tuple[TokenIds, TokenIds]] = []
            counts = []
            for (text,) in (r.args for r in requests):
                rolling = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=max_length, context_len=1)]
                windows.extend(rolling)
                counts.append(len(rolling))
            self.sequences += len(windows)
            sums = [float(sum(lp)) for lp in logprobs(windows)] if windows else []
            out, pos = [], 0
            for n in counts:
                out.append(float(sum(sums[pos : pos + n])))
                pos += n
            return out

        def generate_until(self, requests: list[Any], disable_tqdm: bool = True) -> list[str]:
            eos = tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
            out: list[str] = [""] * len(requests)
            for indices in groups.values():
                kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), 256)  # 256: the HF backend's max_gen_toks
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                budget = int(kwargs.pop("max_gen_toks"))
                prompts = [(self.tok_encode(requests[i].args[0], left_truncate_len=max_length - budget), []) for i in indices]
                self.sequences += len(prompts)
                for i, gen in zip(indices, generate(prompts, stop=tuple(until), max_new_tokens=budget)):
                    out[i] = postprocess_generated_text(generation=gen.text, stop=until, think_end_token=None)
            return out

    return ScorerLM()


def max_length_of(tokenizer: Any) -> int:
    """The context length lm-eval's HF backend would use for this model (its config, else the
    tokenizer's, else lm-eval's default)."""
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(tokenizer.name_or_path)
    except (OSError, ValueError):
        config = None
    return resolve_max_length(config, tokenizer)


# ----------------------------------------------------------------------------------------- scoring


class LmEvalSuite:
    """The lm-eval objectives of a scoring plan: tasks loaded once, scored per candidate."""

    def __init__(self, objectives: Sequence[Any], tokenizer: Any) -> None:
        self.objectives = [o for o in objectives if o.lm_eval is not None]
        self.tokenizer = tokenizer
        for o in self.objectives:
            if o.lm_eval.apply_chat_template and getattr(tokenizer, "chat_template", None) is None:
                raise LmEvalError(f"objective {o.name!r}: lm_eval.apply_chat_template is set but the tokenizer "
                                  f"({tokenizer.name_or_path}) has no chat template; set apply_chat_template: false")
        self._loaded = {o.name: load_task(o.lm_eval) for o in self.objectives}
        self._max_length = max_length_of(tokenizer) if self.objectives else 0

    def run(self, generate: GenerateFn, logprobs: LogprobFn) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]], int]:
        """Values, per-document details and the number of model sequences, for every objective."""
        from lm_eval import evaluate

        lm = scorer_lm(self.tokenizer, generate, logprobs, self._max_length)
        values: dict[str, float] = {}
        details: dict[str, list[dict[str, Any]]] = {}
        results: dict[LmEvalTask, Any] = {}
        for obj in self.objectives:
            loaded = self._loaded[obj.name]
            key = obj.lm_eval.requests_key
            if key not in results:  # objectives differing only in metric/filter share one evaluation
                loaded.reseed()
                results[key] = evaluate(lm=lm, task_dict=loaded.task_dict, limit=key.limit, bootstrap_iters=0,
                                        log_samples=True, apply_chat_template=key.apply_chat_template,
                                        fewshot_as_multiturn=key.fewshot_as_multiturn and key.apply_chat_template,
                                        system_instruction=key.system_instruction)
            values[obj.name], details[obj.name] = _value(results[key], loaded)
        return values, details, lm.sequences


def _value(results: dict[str, Any], loaded: LoadedTask) -> tuple[float, list[dict[str, Any]]]:
    """The objective's number (the named task's, or its group's aggregate) and per-document rows."""
    name = loaded.spec.task
    table = results["results"]
    if name not in table or loaded.result_key not in table[name]:
        leaves = [t for t in table if loaded.result_key in table[t]]
        raise LmEvalError(f"lm-eval results have no {loaded.result_key!r} for {name!r} (present for: {', '.join(leaves) or 'none'})")
    metric, filter_name = loaded.result_key.split(",", 1)
    rows = []
    for task, samples in results.get("samples", {}).items():
        for s in samples:
            if s.get("filter") != filter_name or metric not in s:
                continue
            rows.append({"task": task, "doc_id": s["doc_id"], "prediction": _short(s["filtered_resps"]),
                         "target": _short(s["target"]), metric: _short(s[metric])})
    return float(table[name][loaded.result_key]), rows


def _short(value: Any) -> Any:
    """JSON-safe and small enough for the ledger: numbers as floats, the rest as text (<= 200 chars)."""
    if isinstance(value, (bool, int, float)) or hasattr(value, "item"):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:197] + "..."
