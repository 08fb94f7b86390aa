"""`Evaluation`: the result of scoring one recipe, as plain JSON-safe data.

It crosses into `search/` (optimizer.tell) and the ledger (stored per trial), so it holds only
floats, strings, lists and dicts, and round-trips through `to_dict` / `from_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Evaluation:
    """Objective values plus what explains them.

    * ``values``: objective name -> value (empty when ``failed``);
    * ``details``: objective name -> list of per-item records (``prediction``, ``target`` and
      ``correct`` or ``loss``), for reports and debugging; costs have none;
    * ``timings``: seconds for ``merge`` (engine writes the merged weights), ``swap`` (making the
      backend use them), ``inference``, ``total``, and ``items_per_s`` (model sequences scored per
      inference second);
    * ``failed`` / ``reason``: a failure (exception, non-finite value, timeout) is a result, not a
      crash, so one bad candidate never stops a search.
    """

    values: dict[str, float] = field(default_factory=dict)
    details: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    failed: bool = False
    reason: str | None = None

    @classmethod
    def failure(cls, reason: str, timings: dict[str, float] | None = None) -> "Evaluation":
        return cls(failed=True, reason=reason, timings=dict(timings or {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "values": dict(self.values),
            "details": {k: [dict(r) for r in v] for k, v in self.details.items()},
            "timings": dict(self.timings),
            "failed": self.failed,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Evaluation":
        return cls(
            values={k: float(v) for k, v in data.get("values", {}).items()},
            details={k: [dict(r) for r in v] for k, v in data.get("details", {}).items()},
            timings={k: float(v) for k, v in data.get("timings", {}).items()},
            failed=bool(data.get("failed", False)),
            reason=data.get("reason"),
        )
