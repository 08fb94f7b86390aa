"""`VllmScorer`: scores recipes on one vLLM engine whose weights are swapped in place per candidate.

The engine is started once. The merge engine runs inside vLLM's worker (`_vllm_worker`), which
receives each recipe as JSON, merges on the worker's device and reloads the merged tensors into
the live model; the driver then drops the prefix cache (its KV blocks were computed with the old
weights). Greedy generation uses `SamplingParams(temperature=0)`; teacher-forced log-probs use
`prompt_logprobs`. LoRA pools are scored by merging adapters into dense weights like any other
expert (vLLM's LoRA-request path is not used).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from evomerge.merge import MergeError, MergeStats

from . import _vllm_compat as compat
from ._objective import Objective
from ._plan import Generation, TokenIds
from ._scorer import Deadline, Scorer, SwapResult
from ._transformers_scorer import eos_token_ids, load_tokenizer

WORKER_EXTENSION = "evomerge.objectives._vllm_worker.MergeWorkerExtension"


class VllmScorer(Scorer):
    """Scores recipes with vLLM (GPU; CPU only with ``allow_cpu=True``, for tests).

    ``base`` / ``experts`` are the same folders given to `MergeEngine.load`; the worker loads them
    itself. ``dtype`` is the serving dtype (``"float32"`` makes outputs match the transformers
    backend exactly). ``engine_kwargs`` go to `vllm.LLM` unchanged (e.g. ``tensor_parallel_size``).
    """

    def __init__(
        self,
        base: str | Path,
        experts: Mapping[str, str | Path],
        objectives: Sequence[Objective],
        *,
        dtype: str = "bfloat16",
        max_new_tokens: int = 32,
        stop: Sequence[str] = ("\n",),
        max_model_len: int | None = None,
        timeout: float | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.85,
        allow_cpu: bool = False,
        engine_kwargs: Mapping[str, Any] | None = None,
        spill_dir: str | Path | None = None,
    ) -> None:
        compat.import_vllm()
        if compat.platform_is_cpu() and not allow_cpu:
            raise RuntimeError("VllmScorer needs a GPU but vLLM found none (CPU platform); use TransformersScorer, or pass allow_cpu=True to run vLLM on CPU")
        tokenizer = load_tokenizer(base)
        super().__init__(objectives, tokenizer, timeout=timeout, context_length=max_model_len or _context_length(base))
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(stop)
        self._eos_ids = eos_token_ids(tokenizer, _generation_config(base))
        start = time.perf_counter()
        self.llm = compat.make_llm(
            str(base),
            worker_extension_cls=WORKER_EXTENSION,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            engine_kwargs=dict(engine_kwargs or {}),
        )
        spec = {"base": str(base), "experts": {k: str(v) for k, v in experts.items()}, "dtype": dtype,
                "spill_dir": None if spill_dir is None else str(spill_dir)}
        compat.call_workers(self.llm, "evomerge_init", json.dumps(spec))
        self.startup_seconds = time.perf_counter() - start
        """Engine start plus the worker's merge-engine load, for reports."""

    def build_sorts(self, recipes: Sequence[Any]) -> float:
        results = compat.call_workers(self.llm, "evomerge_build_sorts", [r.to_json() for r in recipes])
        refused = next((r["error"] for r in results if r["error"]), None)
        if refused is not None:  # the worker's MergeError, carried as text through the RPC
            raise MergeError(refused)
        return max(r["seconds"] for r in results)

    def _swap_in(self, recipe: Any) -> SwapResult:
        results = compat.call_workers(self.llm, "evomerge_apply", recipe.to_json(), self._plan.needs_costs)
        t0 = time.perf_counter()
        compat.reset_prefix_cache(self.llm)
        reset = time.perf_counter() - t0
        # Workers merge in parallel (tensor parallel): the slowest one bounds the candidate.
        merge = max(r["merge"] for r in results)
        swap = max(r["swap"] for r in results) + reset
        first = results[0]
        stats = MergeStats(**{k: first[k] for k in ("kept_fraction", "l1_distance", "changed_params", "seconds")})
        return SwapResult(stats=stats, merge_seconds=merge, swap_seconds=swap)

    def _generate(self, requests: Sequence[tuple[TokenIds, TokenIds]], deadline: Deadline, *,
                  stop: Sequence[str] | None = None, max_new_tokens: int | None = None) -> list[Generation]:
        # Drafts are not used: vLLM's own scheduler batches decoding; answer losses go through
        # `_logprobs` (`prompt_logprobs`) instead.
        params = compat.greedy_params(self.max_new_tokens if max_new_tokens is None else max_new_tokens,
                                      self.stop if stop is None else tuple(stop), sorted(self._eos_ids))
        outputs = self.llm.generate(compat.token_prompts([prompt for prompt, _ in requests]), params, use_tqdm=False)
        results = []
        for out in outputs:
            text, token_ids, _reason = compat.completion(out)
            n = len(token_ids) - (1 if token_ids and token_ids[-1] in self._eos_ids else 0)
            results.append(Generation(text=text, num_tokens=n))
        return results

    def _logprobs(self, pairs: Sequence[tuple[TokenIds, TokenIds]], deadline: Deadline) -> list[list[float]]:
        results: list[list[float]] = [[] for _ in pairs]
        todo = [i for i, (_, cont) in enumerate(pairs) if cont]
        sequences = [pairs[i][0] + pairs[i][1] for i in todo]
        outputs = self.llm.generate(compat.token_prompts(sequences), compat.prompt_logprob_params(), use_tqdm=False)
        for i, seq, out in zip(todo, sequences, outputs):
            results[i] = compat.prompt_token_logprobs(out, seq, len(pairs[i][0]))
        return results

    def close(self) -> None:
        del self.llm


def _context_length(base: str | Path) -> int | None:
    """The base's context length (``max_position_embeddings``), the length vLLM serves by default."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(str(base), trust_remote_code=False), "max_position_embeddings", None)


def _generation_config(base: str | Path) -> Any:
    """The base's generation config (its EOS ids stop generation in vLLM too), or None."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(base))
    except OSError:
        return None
