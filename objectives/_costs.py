"""Cost objectives: read from the merge engine's `MergeStats`, so they cost no inference.

* ``kept_fraction``: fraction of the task-vector entries the merge kept (sparsity of the delta);
* ``l1_distance``: L1 distance of the merged weights from the base (MM-MO's sparsity objective);
* ``changed_params``: number of parameters that differ from the base.

All three are minimized by default: a merge that stays closer to the base is cheaper to store as a
delta and, in MM-MO's argument, less likely to have drifted.
"""

from __future__ import annotations

from typing import Any, Callable

COSTS: dict[str, Callable[[Any], float]] = {
    "kept_fraction": lambda stats: float(stats.kept_fraction),
    "l1_distance": lambda stats: float(stats.l1_distance),
    "changed_params": lambda stats: float(stats.changed_params),
}
"""Cost name -> reader of the engine's `MergeStats` (duck-typed so `objectives` needs no engine import)."""
