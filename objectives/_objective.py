"""`Objective`: one number a search optimizes, with a name and a direction.

An objective is a metric over a calibration set (needs inference), an lm-eval-harness task
(metric ``lm_eval``: lm-eval builds the requests and computes the value, `_lm_eval`), or a cost
read from the merge engine's `MergeStats` (needs none). It is plain data so it can cross into `search/` and the
ledger (`to_dict` / `from_dict`, JSON-safe); the scorer does the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ._calibration import CalibrationSet, SetKind
from ._costs import COSTS
from ._lm_eval import LmEvalTask
from ._metrics import Extraction, LengthNormalization, load_custom_metric

Direction = Literal["maximize", "minimize"]

#: metric name -> (calibration-set kind it needs, default direction). Costs need no set.
METRICS: dict[str, tuple[SetKind, Direction]] = {
    "exact_match": ("generation", "maximize"),
    "contains": ("generation", "maximize"),
    "response_length": ("generation", "minimize"),
    "custom": ("generation", "maximize"),
    "answer_loss": ("generation", "minimize"),
    "mc_accuracy": ("multiple_choice", "maximize"),
    "perplexity": ("perplexity", "minimize"),
}
LM_EVAL = "lm_eval"
"""The metric of objectives defined by an lm-eval task (`Objective.lm_eval`)."""
GENERATION_METRICS = frozenset({"exact_match", "contains", "response_length", "custom"})
"""Metrics computed from greedy generations (one generation pass per set serves all of them)."""


@dataclass(frozen=True)
class Objective:
    """A named metric over a calibration set, or a cost, to be maximized or minimized.

    ``metric`` is one of `METRICS` (needs ``calibration``) or of `COSTS` (``kept_fraction``,
    ``l1_distance``, ``changed_params``; no calibration). Options that only some metrics read:
    ``extract``/``pattern`` (exact_match), ``normalization`` (mc_accuracy: ``sum`` or per-token
    ``mean``), ``function`` (custom: ``"pkg.mod:func"`` taking ``(prediction, target)``).
    ``direction`` defaults to the metric's natural one. Metric ``lm_eval`` takes ``lm_eval`` (an
    `LmEvalTask`) instead of a calibration set; its direction is the task metric's.
    """

    name: str
    metric: str
    calibration: CalibrationSet | None = None
    direction: Direction | None = None
    extract: Extraction = "strip"
    pattern: str | None = None
    normalization: LengthNormalization = "sum"
    function: str | None = None
    lm_eval: LmEvalTask | None = None

    def __post_init__(self) -> None:
        if (self.metric == LM_EVAL) != (self.lm_eval is not None):
            raise ValueError(f"objective {self.name!r}: metric 'lm_eval' and an lm_eval task go together")
        if self.metric == LM_EVAL:
            if self.calibration is not None:
                raise ValueError(f"objective {self.name!r}: an lm-eval task brings its own data; no calibration set")
            from ._lm_eval import lm_eval_direction

            default: Direction = lm_eval_direction(self.lm_eval) if self.direction is None else self.direction  # type: ignore[arg-type]
        elif self.metric in COSTS:
            if self.calibration is not None:
                raise ValueError(f"objective {self.name!r}: cost {self.metric!r} takes no calibration set")
            default: Direction = "minimize"
        elif self.metric in METRICS:
            kind, default = METRICS[self.metric]
            if self.calibration is None:
                raise ValueError(f"objective {self.name!r}: metric {self.metric!r} needs a calibration set")
            if self.calibration.kind != kind:
                raise ValueError(
                    f"objective {self.name!r}: metric {self.metric!r} needs a {kind} set, "
                    f"but {self.calibration.name!r} is {self.calibration.kind}"
                )
        else:
            allowed = ", ".join([*METRICS, *COSTS, LM_EVAL])
            raise ValueError(f"objective {self.name!r}: unknown metric {self.metric!r}; expected one of {allowed}")
        if self.metric == "custom":
            if self.function is None:
                raise ValueError(f"objective {self.name!r}: metric 'custom' needs function='pkg.mod:func'")
            load_custom_metric(self.function)  # fail at configuration time, not mid-search
        if self.extract == "regex" and not self.pattern:
            raise ValueError(f"objective {self.name!r}: extract='regex' needs a pattern")
        if self.direction is None:
            object.__setattr__(self, "direction", default)
        elif self.direction not in ("maximize", "minimize"):
            raise ValueError(f"objective {self.name!r}: direction must be 'maximize' or 'minimize', got {self.direction!r}")

    @property
    def is_cost(self) -> bool:
        """True for objectives read from `MergeStats` (no inference)."""
        return self.metric in COSTS

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric,
            "direction": self.direction,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "extract": self.extract,
            "pattern": self.pattern,
            "normalization": self.normalization,
            "function": self.function,
            "lm_eval": None if self.lm_eval is None else self.lm_eval.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Objective":
        data = dict(data)
        if data.get("calibration") is not None:
            data["calibration"] = CalibrationSet.from_dict(data["calibration"])
        if data.get("lm_eval") is not None:
            data["lm_eval"] = LmEvalTask.from_dict(data["lm_eval"])
        return cls(**data)
