"""`TransformersScorer`: the default backend; one live transformers model, weights merged in place.

The merge engine writes each candidate's merged weights straight into the parameters of a model
built once (`engine.new_target_model()`), so a candidate costs one merge plus inference: nothing
is saved, loaded or re-allocated. Because the engine writes into the live parameters there is no
separate swap step; the reported ``swap`` time is the device synchronization that makes the
written weights visible to the next kernel (~0 on CPU), and the writes themselves count as merge.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ._generation import continuation_logprobs, greedy_generate
from ._objective import Objective
from ._plan import Generation, TokenIds
from ._scorer import Deadline, Scorer, SwapResult


class TransformersScorer(Scorer):
    """Scores recipes with a live `transformers` model on CPU or GPU.

    ``tokenizer`` defaults to the one saved with the engine's base model. ``dtype`` casts the live
    model (None keeps the engine's). ``stop``: strings that end a generation besides EOS.
    """

    def __init__(
        self,
        engine: Any,
        objectives: Sequence[Objective],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        batch_size: int = 32,
        max_new_tokens: int = 32,
        stop: Sequence[str] = ("\n",),
        timeout: float | None = None,
        tokenizer: Any = None,
    ) -> None:
        if tokenizer is None:
            tokenizer = load_tokenizer(engine.base_path)
        super().__init__(objectives, tokenizer, timeout=timeout,
                         context_length=getattr(engine.config, "max_position_embeddings", None))
        self.engine = engine
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.model = engine.new_target_model().to(device=self.device, dtype=dtype).eval()
        self.inference = ModelInference(self.model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, stop=stop)

    def build_sorts(self, recipes: Sequence[Any]) -> float:
        return self.engine.build_sorts(recipes)

    def _swap_in(self, recipe: Any) -> SwapResult:
        t0 = time.perf_counter()
        stats = self.engine.apply(recipe, self.model, stats=self._plan.needs_costs)
        t1 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return SwapResult(stats=stats, merge_seconds=t1 - t0, swap_seconds=time.perf_counter() - t1)

    def _generate(self, requests: Sequence[tuple[TokenIds, TokenIds]], deadline: Deadline, *,
                  stop: Sequence[str] | None = None, max_new_tokens: int | None = None) -> list[Generation]:
        return self.inference.generate(requests, deadline, stop=stop, max_new_tokens=max_new_tokens)

    def _logprobs(self, pairs: Sequence[tuple[TokenIds, TokenIds]], deadline: Deadline) -> list[list[float]]:
        return self.inference.logprobs(pairs, deadline)

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class ModelInference:
    """Greedy generation and teacher-forced log-probs on one live model with its tokenizer's ids.

    What `TransformersScorer` runs on its live model, usable on any loaded model too (the scoring
    benchmark's on-disk loops score exactly as the scorer does). ``stop``: strings that end a
    generation besides EOS.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int, max_new_tokens: int,
                 stop: Sequence[str] = ("\n",)) -> None:
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens, self.stop = batch_size, max_new_tokens, tuple(stop)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))

    def generate(self, requests: Sequence[tuple[TokenIds, TokenIds]], deadline: Deadline, *,
                 stop: Sequence[str] | None = None, max_new_tokens: int | None = None) -> list[Generation]:
        """Greedy generations; ``stop`` / ``max_new_tokens`` replace the defaults for this call."""
        return greedy_generate(
            self.model,
            requests,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            pad_id=self.pad_id,
            eos_ids=self.eos_ids,
            stop=self.stop if stop is None else tuple(stop),
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            batch_size=self.batch_size,
            deadline=deadline,
        )

    def logprobs(self, pairs: Sequence[tuple[TokenIds, TokenIds]], deadline: Deadline) -> list[list[float]]:
        return continuation_logprobs(self.model, pairs, pad_id=self.pad_id, batch_size=self.batch_size, deadline=deadline)


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a model folder (no remote code: safety default of the project).

    Its files are input like the weights: a broken one is a one-line `MergeError` naming the
    folder. transformers and tokenizers raise many types here (JSONDecodeError, OSError,
    tokenizers' plain ``Exception``), hence the broad catch at this one loading boundary."""
    from transformers import AutoTokenizer

    from evomerge.merge import MergeError

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise MergeError(f"{path}: the tokenizer files do not load ({type(exc).__name__}: {detail}); "
                         "re-save them with the tokenizer's save_pretrained") from None


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> frozenset[int]:
    """Every id that ends a generation: the tokenizer's EOS and the generation config's (chat
    models often list several, e.g. end-of-turn tokens)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(generation_config, "eos_token_id", None)
    if config_eos is not None:
        ids.update(int(i) for i in (config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]))
    return frozenset(ids)
