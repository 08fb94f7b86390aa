"""Every call into vLLM whose spelling depends on the vLLM version, in one place (target: 0.33).

When vLLM changes an API, only this module changes. vLLM is an optional extra and is imported
lazily, so `import evomerge.objectives` never needs it.

Weight swap: `model_runner.reload_weights(weights_iterator=[(hf_name, tensor), ...],
is_checkpoint_format=True)`, reached through the worker's `reload_weights`, then
`llm.reset_prefix_cache()`. Why this call and not `model.load_weights`:
* the CPU platform repacks linear weights at load time (`CPUModelRunner.load_model`), so
  `model.load_weights` on the live model fails for attention/MLP weights and silently does
  nothing for `lm_head`; `reload_weights` re-runs the loader's processing on checkpoint-format
  tensors, so it is correct on CPU;
* on GPU, `vllm/v1/worker/gpu_worker.py` `Worker.reload_weights` forwards to
  `GPUModelRunner.reload_weights` (both the v1 runner `gpu_model_runner.py` and the v2 runner
  `gpu/model_runner.py` have it with the same keywords), which calls
  `model_executor.model_loader.reload.reload_weights`, the same path; `CPUWorker` and
  `CPUModelRunner` subclass the GPU classes, so one call serves both platforms;
* it also resets LoRA, encoder and multimodal caches. A partial update must hold every weight of
  each layer it touches (vLLM fuses q/k/v and gate/up), so the worker always sends all tensors.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import torch

#: Installed by the environment that runs the vLLM tests; a clear message instead of a traceback.
_INSTALL_HINT = "install the optional extra: pip install 'evomerge[vllm]' (vLLM >= 0.33, CUDA)"


def import_vllm() -> Any:
    """The vllm module, or a one-line ImportError that says how to get it."""
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001 - a broken install is as unusable as a missing one
        raise ImportError(f"the vLLM scorer needs vLLM, which is not importable ({type(exc).__name__}: {exc}); {_INSTALL_HINT}") from None
    return vllm


def vllm_problem(allow_cpu: bool) -> str | None:
    """Why `VllmScorer` cannot start here, in one line (None when it can): vLLM does not import,
    or it found no GPU and ``allow_cpu`` is off. For checks before any model loads."""
    try:
        import_vllm()
    except ImportError as exc:
        return str(exc)
    if platform_is_cpu() and not allow_cpu:
        return "vLLM found no GPU (its CPU platform), and allow_cpu is off"
    return None


def platform_is_cpu() -> bool:
    """Whether vLLM runs on its CPU platform (no GPU visible or a CPU build)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def make_llm(
    model: str,
    *,
    worker_extension_cls: str,
    dtype: str,
    max_model_len: int | None,
    seed: int,
    gpu_memory_utilization: float,
    engine_kwargs: dict[str, Any],
) -> Any:
    """A `vllm.LLM` for scoring: eager mode (no CUDA-graph capture per engine), prefix caching on."""
    vllm = import_vllm()
    if platform_is_cpu():
        # The CPU backend sizes its KV cache from this variable (GiB), not from memory utilization.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    kwargs: dict[str, Any] = dict(
        model=model,
        dtype=dtype,
        seed=seed,
        enforce_eager=True,
        enable_prefix_caching=True,
        worker_extension_cls=worker_extension_cls,
        trust_remote_code=False,
    )
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if not platform_is_cpu():
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    kwargs.update(engine_kwargs)
    return vllm.LLM(**kwargs)


def call_workers(llm: Any, method: str, *args: Any) -> list[Any]:
    """Run a worker-extension method on every worker; arguments must be JSON-able (multiprocess
    mode does not carry tensors through `collective_rpc`)."""
    return llm.collective_rpc(method, args=tuple(args))


def reload_weights(worker: Any, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Swap checkpoint-format (HF-named) tensors into the worker's live model (see module doc)."""
    worker.reload_weights(weights_iterator=named_tensors, is_checkpoint_format=True)


def reset_prefix_cache(llm: Any) -> None:
    """Drop KV blocks computed with the previous weights (they would be reused by prefix caching)."""
    llm.reset_prefix_cache()


def token_prompts(prompts: Sequence[Sequence[int]]) -> list[Any]:
    """Pre-tokenized prompts: the scorer tokenizes once, so vLLM must not re-tokenize."""
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]


def greedy_params(max_tokens: int, stop: Sequence[str], stop_token_ids: Sequence[int]) -> Any:
    """Greedy decoding with the scorer's stop rules (stop strings are cut from the text)."""
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        stop=list(stop) or None,
        stop_token_ids=list(stop_token_ids) or None,
        include_stop_str_in_output=False,
        skip_special_tokens=True,
    )


def prompt_logprob_params() -> Any:
    """Score the prompt only: the log-prob of each actual prompt token, one dummy output token."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)


def prompt_token_logprobs(output: Any, token_ids: Sequence[int], start: int) -> list[float]:
    """log p(token_ids[i]) for i >= start from a RequestOutput's `prompt_logprobs`.

    vLLM gives, per prompt position, a dict token id -> Logprob (None at position 0); with
    `prompt_logprobs=0` the dict holds the actual token.
    """
    entries = output.prompt_logprobs
    return [float(entries[i][token_ids[i]].logprob) for i in range(start, len(token_ids))]


def completion(output: Any) -> tuple[str, list[int], str | None]:
    """(text, generated token ids, finish reason) of a greedy RequestOutput."""
    first = output.outputs[0]
    return first.text, list(first.token_ids), first.finish_reason
