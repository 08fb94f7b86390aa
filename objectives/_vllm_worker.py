"""vLLM worker extension: the merge engine lives inside the worker, next to the model's weights.

Only JSON crosses `collective_rpc` (paths once, then one recipe per candidate): tensors do not
survive the trip in multiprocess mode, and shipping a model's worth of weights per candidate
would cost more than the merge. The worker builds its own `MergeEngine` on its own device, merges
each recipe into a staging state dict (so the engine's `MergeStats` and timing come for free),
and swaps the staged tensors into vLLM's model with `reload_weights`.

Method names carry an ``evomerge_`` prefix: the extension is mixed into vLLM's worker class, whose
own methods (e.g. ``update_weights``) must not be shadowed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from . import _vllm_compat as compat


class MergeWorkerExtension:
    """Mixed into vLLM's worker by ``worker_extension_cls``; ``self`` is the worker."""

    def evomerge_init(self, spec_json: str) -> dict[str, Any]:
        """Load base + experts from ``{"base": path, "experts": {name: path}, "dtype": str,
        "spill_dir": path or null}`` (the engine's `MergeEngine.spill_dir`)."""
        from evomerge.merge import MergeEngine

        spec = json.loads(spec_json)
        start = time.perf_counter()
        engine = MergeEngine.load(
            spec["base"], spec["experts"], device=self.device, dtype=getattr(torch, spec["dtype"]), progress=False
        )
        engine.spill_dir = None if spec.get("spill_dir") is None else Path(spec["spill_dir"])
        self._evomerge_engine = engine
        # Staging tensors the engine writes into; `reload_weights` then copies them into vLLM's
        # (possibly repacked / fused) parameters.
        self._evomerge_staging = {name: engine.base_tensor(name).clone() for name in engine.layout.slots}
        return {"seconds": time.perf_counter() - start, "num_params": engine.num_params}

    def evomerge_build_sorts(self, recipes_json: list[str]) -> dict[str, Any]:
        """The engine's one-time sorts for these recipes (`MergeEngine.build_sorts`): seconds, or
        the `MergeError` message when they would not fit in this worker's memory (or spill folder)."""
        from evomerge.merge import MergeError, MergeRecipe

        try:
            seconds = self._evomerge_engine.build_sorts([MergeRecipe.from_json(r) for r in recipes_json])
        except MergeError as exc:
            return {"seconds": 0.0, "error": str(exc)}
        return {"seconds": seconds, "error": None}

    def evomerge_apply(self, recipe_json: str, with_stats: bool) -> dict[str, Any]:
        """Merge one recipe and swap it in; returns timings and the engine's `MergeStats` fields."""
        from evomerge.merge import MergeRecipe

        recipe = MergeRecipe.from_json(recipe_json)
        t0 = time.perf_counter()
        stats = self._evomerge_engine.apply(recipe, self._evomerge_staging, stats=with_stats)
        t1 = time.perf_counter()
        compat.reload_weights(self, list(self._evomerge_staging.items()))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        return {
            "merge": t1 - t0,
            "swap": t2 - t1,
            "kept_fraction": stats.kept_fraction,
            "l1_distance": stats.l1_distance,
            "changed_params": stats.changed_params,
            "seconds": stats.seconds,
        }
