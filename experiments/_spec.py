"""The experiment spec: one YAML file that says what to merge, how to search, and how to score.

The spec is validated strictly (pydantic v2, unknown keys are errors) *before* anything is loaded or
written, because an overnight run that dies on a typo after an hour of loading is the failure this
file exists to prevent. Relative paths resolve against the spec file's folder, so a spec and its
calibration data travel together. Paths may also point into the toy zoo symbolically
(``zoo:data/rev/calib.jsonl``), and ``models.zoo`` expands to the zoo's base and experts, so the
shipped presets run anywhere without a model hub.

See docs/experiments.md for every field with examples.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from evomerge.search import SpaceTemplate, kind_of
from evomerge.search._space import ParamKind

from ._hub import is_model_id

ZOO_PREFIX = "zoo:"
"""Paths starting with this prefix resolve inside the toy zoo named by ``models.zoo``."""


FOLDER_NAME = r"^[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*$"
"""Names that become file or folder names (the run folder, a stage's results): letters, digits,
``_ . -``, and not dots alone (``..`` as a run name wrote the run into the parent folder)."""

class _Strict(BaseModel):
    """Every spec section forbids unknown keys: a misspelt option must fail, not be ignored, and
    every number is finite: a NaN or infinite budget, bound or penalty is a typo, not a request."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Booleans and numbers are not interchangeable. YAML reads ``yes``, ``on`` and ``true`` as
        booleans, which pydantic takes as 1 in a number field: ``evaluations: yes`` ran one trial
        without a word. The other way, pydantic takes the text ``'yes'``, ``'off'`` or ``'0'`` as a
        boolean: a quoted ``allow_pickle: 'no'`` would be read but ``'nope'`` refused."""
        if info.field_name is None:
            return value
        annotation = cls.model_fields[info.field_name].annotation
        kinds = set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}
        if isinstance(value, bool) and kinds & {int, float} and bool not in kinds:
            raise ValueError(f"{value!r} is a boolean (YAML reads yes/no/on/off/true/false so); write a number")
        literals = {v for kind in kinds if get_origin(kind) is Literal for v in get_args(kind)}
        if isinstance(value, str) and bool in kinds and str not in kinds and value not in literals:
            raise ValueError(f"{value!r} is text; write true or false, unquoted")
        return value


MAX_SEED = 2**32 - 1
"""Seeds feed numpy's legacy RandomState (nevergrad) and optuna's samplers, which take 32 bits."""

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]

MAX_COEFFICIENT = 100.0
"""Largest |bound| of a weight or lambda: beyond it a task vector scaled into a model overflows
bf16/fp16 weights and every candidate scores as garbage (published recipes stay within +-2)."""


def _resolve_path(value: Any, info: ValidationInfo) -> Any:
    """Resolve a relative path against the spec's folder; keep ``zoo:`` paths symbolic.

    Existence is checked here, at load time, so a missing file is a one-line spec error rather
    than a crash after the models are loaded.
    """
    if not isinstance(value, (str, Path)):
        return value
    text = str(value)
    if text.startswith(ZOO_PREFIX):
        return text
    root = (info.context or {}).get("root")
    path = Path(text).expanduser()
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    path = _resolved(path, text)
    if (info.context or {}).get("check_paths", True) and not path.exists():
        raise ValueError(f"{text!r} does not exist (resolved to {path})")
    return str(path)


SpecPath = Annotated[str, BeforeValidator(_resolve_path)]
"""A file or folder path: absolute after validation, or a symbolic ``zoo:`` path."""


def _resolve_model(value: Any, info: ValidationInfo) -> Any:
    """A model folder as `SpecPath`, or a Hugging Face id (``org/name[@revision]``) kept as written.

    A local path wins over an id of the same shape; ids become cache folders in `_resolve.resolve`,
    which knows whether the hub may be reached.
    """
    if isinstance(value, str) and is_model_id(value):
        local = Path(value).expanduser()
        root = (info.context or {}).get("root")
        if not (local if local.is_absolute() or root is None else Path(root) / local).exists():
            return value
    try:
        return _resolve_path(value, info)
    except ValueError as exc:
        raise ValueError(f"{exc}, and it is not a Hugging Face id (org/name[@revision])") from None


ModelRef = Annotated[str, BeforeValidator(_resolve_model)]
"""A model or adapter: a local folder (absolute after validation) or a Hugging Face id."""


def _resolve_out_path(value: Any, info: ValidationInfo) -> Any:
    """Like `SpecPath` for outputs: resolved against the spec's folder, need not exist yet."""
    if value is None or not isinstance(value, (str, Path)):
        return value
    root = (info.context or {}).get("root")
    path = Path(str(value)).expanduser()
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    return str(_resolved(path, str(value)))


def _resolved(path: Path, text: str) -> Path:
    """``path.resolve()``, with a symlink loop as a field error (pathlib raises RuntimeError on
    Python < 3.13, OSError after)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        raise ValueError(f"{text!r} cannot be resolved ({exc}); point it at the folder or file itself") from None


OutPath = Annotated[str, BeforeValidator(_resolve_out_path)]


# --------------------------------------------------------------------------------------------- models


class ZooRef(_Strict):
    """The toy zoo as the model source; built on first use and cached."""

    size: Literal["tiny", "small"] = "small"
    seed: Seed = 0
    arch: Literal["llama", "qwen2", "mistral"] = "llama"
    experts: Literal["full", "lora", "pool"] = "full"
    """Which zoo models act as experts: full fine-tunes, the LoRA experts, or the LoRA pool."""
    path: OutPath | None = None
    """Zoo folder; default: the cache (``$EVOMERGE_CACHE/zoo/<size>-<arch>-seed<N>``)."""


class ModelsSpec(_Strict):
    """The base model and the experts merged into it.

    Either ``zoo`` (symbolic), or ``base`` plus ``experts`` (name -> HF folder or PEFT adapter
    folder) and/or ``pool`` (a folder whose subfolders are LoRA adapters of the base). ``base``
    and experts may be Hugging Face ids (``Qwen/Qwen2.5-7B``, ``org/name@revision``), resolved
    from the local HF cache (see `evomerge.experiments._hub`).
    """

    zoo: ZooRef | None = None
    base: ModelRef | None = None
    experts: dict[str, ModelRef] = Field(default_factory=dict)
    pool: SpecPath | None = None
    trust_remote_code: Literal[False] = False
    """Always false: evomerge builds models from transformers' own classes (by ``model_type``) and
    never runs code shipped with a checkpoint; `true` is refused rather than silently ignored."""
    allow_pickle: bool = False
    """Load ``.bin`` / ``.pt`` checkpoints (weights-only); off by default: safetensors only."""
    compile: Literal["auto"] | bool = "auto"
    """Fused compiled merge kernels (``MergeEngine.load(compile=...)``): a one-time compile of
    seconds once per process (paid by the untimed warm-up before the first trial) for merges several
    times faster. ``auto`` (and true): fused for every model size; false: the eager chunked path."""

    @field_validator("trust_remote_code", mode="before")
    @classmethod
    def _no_remote_code(cls, value: Any) -> Any:
        if value is True:
            raise ValueError(
                "true is refused: evomerge never runs code shipped with a model (it loads the architecture "
                "named by config.json's model_type with transformers' built-in classes); remove the field"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "ModelsSpec":
        explicit = self.base is not None or self.experts or self.pool is not None
        if self.zoo is not None and explicit:
            raise ValueError("give either 'zoo' or 'base' with 'experts'/'pool', not both")
        if self.zoo is None:
            if self.base is None:
                raise ValueError("missing 'base' (or use 'zoo: {size: small}')")
            if not self.experts and self.pool is None:
                raise ValueError("needs 'experts' (name: path) or 'pool' (a folder of LoRA adapters)")
        return self


# ---------------------------------------------------------------------------------------------- space


def _known_method(name: str) -> str:
    from evomerge.merge.methods import METHOD_NAMES

    if name not in METHOD_NAMES:
        raise ValueError(f"{name!r} is not one of {', '.join(METHOD_NAMES)}")
    return name


class SpaceSpec(SpaceTemplate):
    """The search space template (`evomerge.search.SpaceTemplate`) with the method name checked.

    Fields: ``method``; ``methods`` (the method as a searched choice among these task-vector
    methods, each with only the parameters it reads; ``method`` is then the first trial's);
    ``params`` (searched kinds: weight, density, t, gamma, epsilon; default: the method's);
    ``bounds`` and ``init`` per kind; ``fixed`` (kind or parameter name -> value);
    ``granularity`` (global | layer | k = every k layers); ``modules`` (all | split | lists of
    module kinds); ``sections`` (attach | group); ``smoothing`` (control points across layers);
    global options ``normalize``, ``lambda``, ``rescale``, ``draws`` (fast | mergekit), ``pruning``
    (exact | approximate), ``lora_mode``.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("method")
    @classmethod
    def _method_exists(cls, name: str) -> str:
        return _known_method(name)

    @model_validator(mode="after")
    def _sane_values(self) -> "SpaceSpec":
        for kind, (low, high) in self.bounds.items():
            if kind == "weight" and max(abs(low), abs(high)) > MAX_COEFFICIENT:
                raise ValueError(
                    f"bounds for 'weight': {[low, high]} exceeds +-{MAX_COEFFICIENT:g} (a task vector scaled that far "
                    "overflows the model's weights); use bounds such as [-1.5, 1.5]"
                )
        for field, values in (("fixed", self.fixed), ("init", self.init)):
            large = {k: v for k, v in values.items() if kind_of(k) == "weight" and abs(v) > MAX_COEFFICIENT}
            if large:
                raise ValueError(f"{field}: {', '.join(f'{k} {v:g}' for k, v in large.items())} exceeds +-{MAX_COEFFICIENT:g} "
                                 "(a task vector scaled that far overflows the model's weights); use a value such as 1.0")
        for key, value in self.init.items():  # by kind or by parameter name: within that kind's bounds
            low, high, _ = self.kind_bounds(kind_of(key))  # type: ignore[arg-type]
            if not low <= value <= high:
                raise ValueError(f"init for {key!r}: {value} lies outside its bounds [{low}, {high}]; pick a value inside")
        if abs(self.lambda_) > MAX_COEFFICIENT:
            raise ValueError(f"lambda: {self.lambda_} exceeds +-{MAX_COEFFICIENT:g}; use a value such as 1.0")
        return self


# ------------------------------------------------------------------------------------------ objectives

def _known_metric(name: str) -> str:
    """Metric names come from `evomerge.objectives` (imported lazily: it pulls in torch)."""
    from evomerge.objectives import COSTS, LM_EVAL, METRICS

    if name not in METRICS and name not in COSTS and name != LM_EVAL:
        raise ValueError(f"{name!r} is not one of {', '.join([*METRICS, *COSTS, LM_EVAL])}")
    return name


class LmEvalSpec(_Strict):
    """An lm-eval-harness task as the objective (`evomerge.objectives.LmEvalTask`; extra ``lm_eval``)."""

    task: str
    """A task or group lm-eval knows (``arc_easy``, ``gsm8k``, ``mmlu``) or one of ``include_path``."""
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | float | None = Field(None, gt=0)
    """The first N documents (N >= 1), or a fraction (< 1), as lm-eval's ``--limit``."""
    metric: str | None = None
    """Which of the task's metrics (default: its first), e.g. ``acc_norm``."""
    filter: str | None = None
    """Which filter's result (default: the task's first), e.g. ``strict-match`` for gsm8k."""
    include_path: SpecPath | None = None
    """Folder of your own task YAML files."""
    fewshot_seed: int = 1234
    apply_chat_template: bool = False
    """Wrap prompts in the tokenizer's chat template (lm-eval's ``--apply_chat_template``)."""
    fewshot_as_multiturn: bool = True
    """With the chat template: few-shot examples as conversation turns."""
    system_instruction: str | None = None

    @model_validator(mode="after")
    def _installed(self) -> "LmEvalSpec":
        from evomerge.objectives import lm_eval_installed

        if not lm_eval_installed():
            raise ValueError("lm-eval tasks need the lm-eval package; install it with: pip install 'evomerge[lm_eval]'")
        return self


class ObjectiveSpec(_Strict):
    """One objective: a metric over a calibration set, or a cost read from the merge statistics.

    Mirrors `evomerge.objectives.Objective`; costs (kept_fraction, l1_distance, changed_params)
    need no data and no inference.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]*(\{skill\})?[A-Za-z0-9_.-]*$")
    """Objective name; a name containing ``{skill}`` is a template: with ``models.zoo`` it expands
    to one objective per zoo skill, substituting ``{skill}`` in name, data and holdout."""
    metric: Annotated[str, AfterValidator(_known_metric)] | None = None
    """One of the metrics or costs; ``lm_eval`` (the default when ``lm_eval`` is given)."""
    lm_eval: LmEvalSpec | None = None
    """An lm-eval-harness task instead of ``data``: ``{task: arc_easy, num_fewshot: 0, limit: 100}``."""
    data: SpecPath | None = None
    """Calibration set (JSONL); ``zoo:data/<skill>/calib.jsonl`` inside the toy zoo."""
    holdout: SpecPath | None = None
    """Held-out set of the same kind: the report re-scores the front on it, so a front chosen on
    ``data`` is judged on items the search never saw."""
    direction: Literal["maximize", "minimize"] | None = None
    """Default: the metric's natural direction (accuracy up, loss and kept fraction down)."""
    size: int | None = Field(None, ge=1)
    """Score candidates on a fixed subset of this many items drawn by the spec's ``data_seed``
    (all when unset); the held-out check always uses every item of ``holdout``."""
    extract: Literal["strip", "first_line", "last_number", "regex"] = "strip"
    pattern: str | None = None
    normalization: Literal["sum", "mean"] = "sum"
    function: str | None = None
    """For metric 'custom': ``"pkg.module:function"`` taking (prediction, target)."""
    chat_template: bool = False
    system_prompt: str | None = None

    @model_validator(mode="after")
    def _data_matches_metric(self) -> "ObjectiveSpec":
        from evomerge.objectives import COSTS, LM_EVAL

        if self.lm_eval is not None:
            if self.metric not in (None, LM_EVAL):
                raise ValueError(f"objective '{self.name}': 'lm_eval' takes its metric from the task (set lm_eval.metric), not metric {self.metric!r}")
            if self.data is not None or self.holdout is not None:
                raise ValueError(f"objective '{self.name}': an lm_eval task brings its own documents; drop 'data'/'holdout'")
            object.__setattr__(self, "metric", LM_EVAL)
            return self
        if self.metric is None:
            raise ValueError(f"objective '{self.name}': needs 'metric' (or 'lm_eval' for an lm-eval-harness task)")
        if self.metric == LM_EVAL:
            raise ValueError(f"objective '{self.name}': metric 'lm_eval' needs an 'lm_eval' section ({{task: ...}})")
        if self.metric in COSTS and (self.data is not None or self.holdout is not None):
            raise ValueError(f"objective '{self.name}': cost '{self.metric}' takes no 'data' or 'holdout'")
        if self.metric not in COSTS and self.data is None:
            raise ValueError(f"objective '{self.name}': metric '{self.metric}' needs 'data' (a calibration set)")
        if self.extract == "regex" and not self.pattern:
            raise ValueError(f"objective '{self.name}': extract 'regex' needs 'pattern'")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:  # otherwise every trial fails on it
                raise ValueError(f"objective '{self.name}': pattern {self.pattern!r} is not a regular expression ({exc})") from None
        if self.metric == "custom" and not self.function:
            raise ValueError(f"objective '{self.name}': metric 'custom' needs 'function' (pkg.module:function)")
        return self


class ConstraintSpec(_Strict):
    """A feasibility bound on one objective's value; infeasible trials never enter the front."""

    objective: str
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _a_bound(self) -> "ConstraintSpec":
        if self.min is None and self.max is None:
            raise ValueError(f"constraint on '{self.objective}' needs 'min' and/or 'max'")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"constraint on '{self.objective}': min {self.min} is above max {self.max}, so no trial "
                             "can be feasible; swap them")
        return self


# -------------------------------------------------------------------------------------------- scorer


class ScorerSpec(_Strict):
    """The backend that scores each candidate in its live model."""

    backend: Literal["transformers", "vllm"] = "transformers"
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    timeout: float | None = Field(None, gt=0)
    """Seconds per evaluation; a slower candidate is recorded as failed."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Backend-specific keywords (e.g. vLLM's gpu_memory_utilization, tensor_parallel_size)."""

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not re.fullmatch(r"cpu|auto|mps|cuda(:\d+)?", device):
            raise ValueError(f"{device!r} is not one of cpu, auto, mps, cuda, cuda:N")
        return device


# ------------------------------------------------------------------------------------------ optimizer

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def _parse_duration(value: Any) -> Any:
    """``90``, ``"90s"``, ``"30m"``, ``"8h"`` -> seconds; overnight budgets read better in hours."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not a duration (seconds, or a number with s/m/h/d)")
        return float(match.group(1)) * _SECONDS[match.group(2)]
    return value


Duration = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0)]


BASELINES = ("random", "grid")


class OptimizerSpec(_Strict):
    """Which optimizer explores the space; single-objective optimizers scalarize with ``weights``.

    Names: optuna samplers by short name (tpe, cmaes, nsga2, nsga3, gp, qmc, random); nevergrad
    optimizers by explicit registry class (CMA, DE, TwoPointsDE, PSO, OnePlusOne, ...; never the
    self-selecting NGOpt family, whose pick cannot be checkpointed); baselines random and grid.
    """

    library: Literal["optuna", "nevergrad", "baseline"] = "optuna"
    name: str = Field("nsga2", validate_default=True)
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the sampler / optimizer (e.g. population_size for nsga2)."""
    weights: dict[str, float] | None = None
    """Scalarization (weighted sum of losses): objective name -> weight; unnamed objectives get 0.
    Unset: the mean over the task objectives (costs such as kept_fraction count only when
    weighted here). Single-objective optimizers (nevergrad, optuna cmaes) always see this one loss."""
    l1_penalty: float = Field(0.0, ge=0.0)
    """Adds ``l1_penalty x mean |genome|`` to the scalarized fitness (Evo-Merging, LoraHub)."""

    @field_validator("weights")
    @classmethod
    def _some_weight(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        if weights is not None and not any(weights.values()):
            raise ValueError("every weight is 0, so every candidate scalarizes to the same loss; give some objective a weight")
        return weights

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str, info: ValidationInfo) -> str:
        from evomerge.search import OPTUNA_SAMPLERS, nevergrad_refusal

        library = info.data.get("library")
        if library == "optuna" and name not in OPTUNA_SAMPLERS:
            raise ValueError(f"{name!r} is not one of {', '.join(OPTUNA_SAMPLERS)}")
        if library == "baseline" and name not in BASELINES:
            raise ValueError(f"{name!r} is not one of {', '.join(BASELINES)}")
        refusal = nevergrad_refusal(name) if library == "nevergrad" else None
        if refusal is not None:
            raise ValueError(refusal)
        return name

    @property
    def factory_name(self) -> str:
        """The name `evomerge.search.make_optimizer` takes."""
        return self.name if self.library == "baseline" else f"{self.library}:{self.name}"

    @property
    def scalarized(self) -> bool:
        """Whether the optimizer sees one weighted loss instead of the objective vector."""
        return self.library == "nevergrad" or self.weights is not None or self.l1_penalty > 0 or self.name == "cmaes"


class BudgetSpec(_Strict):
    """When to stop: after ``evaluations`` trials and/or ``wall_clock`` (whichever comes first)."""

    evaluations: int | None = Field(None, ge=1)
    wall_clock: Duration | None = None

    @model_validator(mode="after")
    def _some_limit(self) -> "BudgetSpec":
        if self.evaluations is None and self.wall_clock is None:
            raise ValueError("set 'evaluations' and/or 'wall_clock'")
        return self


class StageSpec(_Strict):
    """One stage of a multi-stage search; unset sections fall back to the spec's top level.

    ``inherit`` lists coefficient kinds whose values are held at the previous stage's best trial
    (e.g. Evo-Merging's stage 2 keeps stage 1's per-expert densities while it searches weights);
    the two stages must then share granularity and module grouping, so parameter names match.
    """

    name: str = Field(pattern=FOLDER_NAME)
    space: SpaceSpec | None = None
    optimizer: OptimizerSpec | None = None
    budget: BudgetSpec | None = None
    inherit: list[ParamKind] = Field(default_factory=list)


class RescoreSpec(_Strict):
    """Re-scoring the pick (`experiments._rescore`): the ``top`` trials by mean task score scored
    again on ``size`` calibration items per objective before the run names its pick."""

    top: int = Field(5, ge=0)
    """How many trials to re-score; 0 turns re-scoring off."""
    size: int | None = Field(None, ge=1)
    """Items per objective (a larger seeded subset of the same calibration set); unset: every item."""


class FidelitySpec(_Strict):
    """Multi-fidelity search (`evomerge.search.Fidelity`): each candidate is scored on the first
    ``rungs[0]`` items of every calibration set (a random subset, nested in the next rungs, drawn
    by ``data_seed``) and continued in the live model to the next rung only while its mean task
    score ranks in the top ``1/eta`` of the candidates that reached its rung."""

    rungs: list[Annotated[int, Field(ge=1)]] = Field(min_length=2)
    """Items per calibration set at each rung, increasing; sets smaller than a rung score every item."""
    eta: int = Field(4, ge=2)
    """1/eta of the candidates of a rung go on to the next."""

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, rungs: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(rungs, rungs[1:])):
            raise ValueError(f"{rungs} must increase strictly, e.g. [8, 32, 64] (items per calibration set at each rung)")
        return rungs


class OutputsSpec(_Strict):
    """Where results go; the run folder holds the spec copy, ledger, checkpoint, exports and report."""

    run_dir: OutPath | None = None
    """Default: ``runs/<name>`` under the current directory."""
    report: bool = True
    """Write ``report.html`` when the run finishes."""


class ExperimentSpec(_Strict):
    """A complete, validated experiment."""

    name: str = Field(pattern=FOLDER_NAME)
    description: str = ""
    seed: Seed = 0
    """Seeds the optimizer (sampler, nevergrad, baselines) and the DARE/DELLA masks, never the data."""
    data_seed: Seed = 0
    """Draws the calibration subsets (``size:``), apart from ``seed``: runs that differ only in
    ``seed`` score the same items, so comparing seeds compares optimizers, not data."""
    models: ModelsSpec
    space: SpaceSpec | None = None
    objectives: list[ObjectiveSpec] = Field(min_length=1)
    constraints: list[ConstraintSpec] = Field(default_factory=list)
    scorer: ScorerSpec = Field(default_factory=ScorerSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    budget: BudgetSpec
    stages: list[StageSpec] | None = None
    baseline: bool = False
    """Also score the built-in uniform grid (one global coefficient) for comparison in reports."""
    init: SpecPath | None = None
    """A mergekit YAML (``models:`` form) whose coefficients, fitted to the first stage's space and
    clipped to its bounds, are the search's first point."""
    baselines: dict[Annotated[str, Field(pattern=FOLDER_NAME)], SpecPath] = Field(default_factory=dict)
    """Named mergekit YAMLs scored beside the experts (comparison table and report)."""
    rescore: RescoreSpec = Field(default_factory=RescoreSpec)
    """Re-score the best few trials on more calibration items and pick by that score."""
    fidelity: FidelitySpec | None = None
    """Successive halving over calibration items (off by default): ``{rungs: [8, 32, 64], eta: 4}``."""
    storage: str | None = None
    """Optuna storage URL; default ``<run_dir>/ledger.log`` (journal file), ``sqlite:///<run_dir>/ledger.db``
    with ``run --workers``."""
    outputs: OutputsSpec = Field(default_factory=OutputsSpec)

    @model_validator(mode="after")
    def _cross_checks(self) -> "ExperimentSpec":
        names = [o.name for o in self.objectives]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"objective names must be unique; repeated: {', '.join(dupes)}")
        self._check_a_task_objective()
        for c in self.constraints:
            if c.objective not in names:
                raise ValueError(f"constraint on unknown objective {c.objective!r}; objectives: {', '.join(names)}")
        if self.stages is None and self.space is None:
            raise ValueError("missing 'space' (or give 'stages', each with its own space)")
        if self.stages is not None:
            if not self.stages:
                raise ValueError("'stages' is empty")
            if self.space is None and self.stages[0].space is None:
                raise ValueError("the first stage needs a 'space' (no top-level 'space' to fall back to)")
            if self.stages[0].inherit:
                raise ValueError("the first stage cannot inherit: there is no previous stage")
            self._check_stage_names_and_inheritance()
        for opt in [self.optimizer] + [s.optimizer for s in self.stages or [] if s.optimizer]:
            if self.has_skill_templates:
                break  # names are known once the zoo's skills are expanded (then checked again)
            unknown = sorted(set(opt.weights or {}) - set(names))
            if unknown:
                raise ValueError(f"optimizer.weights names unknown objectives {unknown}; objectives: {', '.join(names)}")
        if self.fidelity is not None:
            self._check_fidelity(self.fidelity)
        uses_zoo = any(o.data and o.data.startswith(ZOO_PREFIX) for o in self.objectives)
        if uses_zoo and self.models.zoo is None:
            raise ValueError("objectives use 'zoo:' paths but 'models.zoo' is not set")
        if self.has_skill_templates and self.models.zoo is None:
            raise ValueError("objective names with '{skill}' expand per zoo skill and need 'models.zoo'")
        return self

    def _check_a_task_objective(self) -> None:
        """At least one objective scores the model: costs alone (kept_fraction, l1_distance,
        changed_params) are read from the merge, so a search over them finds the base model, having
        run the scorer for nothing."""
        from evomerge.objectives import COSTS

        if all(o.metric in COSTS for o in self.objectives):
            raise ValueError(f"objectives: every objective is a merge cost ({', '.join(o.metric for o in self.objectives)}), "
                             "which the base model minimizes; add one that scores the model on calibration data "
                             "(e.g. metric: answer_loss with data: a JSONL file)")

    def _check_stage_names_and_inheritance(self) -> None:
        """Stage names are folder and study names (one each; ``grid`` is the uniform grid
        baseline's), and a stage inherits parameters by name, so its layer and module groups must
        be the previous stage's (otherwise the names do not match: found after stage 1 ran)."""
        names = [s.name for s in self.stages or []]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"stage names must differ: {', '.join(twice)} is used twice")
        if "grid" in names:
            raise ValueError("stage name 'grid' is the uniform grid baseline's (results/grid); pick another")
        stages = self.resolved_stages()
        for i in range(1, len(stages)):
            if not stages[i].inherit:
                continue
            before, now = stages[i - 1].space, stages[i].space
            for field_name in ("granularity", "modules", "sections"):
                if getattr(before, field_name) != getattr(now, field_name):
                    raise ValueError(f"stage {stages[i].name!r} inherits {', '.join(stages[i].inherit)} from "
                                     f"{stages[i - 1].name!r}, so its space.{field_name} must be the same: "
                                     f"{getattr(now, field_name)!r} vs {getattr(before, field_name)!r}")

    def _check_fidelity(self, fidelity: FidelitySpec) -> None:
        """Rungs need calibration sets to take items from, and fit every subset the spec draws."""
        if any(o.lm_eval is not None for o in self.objectives):
            names = ", ".join(o.name for o in self.objectives if o.lm_eval is not None)
            raise ValueError(f"fidelity: lm-eval objectives ({names}) are scored whole, not by rungs of items; remove 'fidelity' or those objectives")
        if not any(o.data is not None for o in self.objectives):
            raise ValueError("fidelity: no objective has calibration data ('data') to score in rungs; remove 'fidelity'")
        top = fidelity.rungs[-1]
        for o in self.objectives:
            if o.size is not None and o.size < top:
                raise ValueError(f"fidelity.rungs: the top rung ({top}) exceeds objective '{o.name}' size {o.size}; "
                                 f"raise its size to at least {top} or lower the rungs")

    @property
    def has_skill_templates(self) -> bool:
        return any("{skill}" in o.name for o in self.objectives)

    def resolved_stages(self) -> list[StageSpec]:
        """The stages with every section filled in from the top level (a plain spec is one stage)."""
        if self.stages is None:
            return [StageSpec(name="search", space=self.space, optimizer=self.optimizer, budget=self.budget)]
        return [
            StageSpec(
                name=s.name,
                space=s.space or self.space,
                optimizer=s.optimizer or self.optimizer,
                budget=s.budget or self.budget,
                inherit=s.inherit,
            )
            for s in self.stages
        ]

    def run_dir(self, cwd: Path | None = None) -> Path:
        """The run folder: ``outputs.run_dir`` or ``runs/<name>`` under ``cwd``."""
        if self.outputs.run_dir is not None:
            return Path(self.outputs.run_dir)
        return (cwd or Path.cwd()).resolve() / "runs" / self.name
