"""Batched inference on a live transformers model: greedy generation and teacher-forced log-probs.

A small greedy loop with a KV cache instead of `model.generate`: on the zoo models it is faster
(no logits processors, no per-step config handling; see docs/objectives.md for the measurement),
it is trivially deterministic, and it lets the scorer check stop strings and its deadline between
steps. Batches are formed from length-sorted requests, so little compute goes to padding.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ._plan import Generation, TokenIds
from ._scorer import Deadline


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.inference_mode()
def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[TokenIds],
    *,
    decode: Callable[[TokenIds], str],
    pad_id: int,
    eos_ids: frozenset[int],
    stop: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    deadline: Deadline,
) -> list[Generation]:
    """Greedy continuations of ``prompts`` (token ids), left-padded in length-sorted batches.

    A row stops at an EOS id (not counted, not in the text), when its text contains a stop string
    (the text is cut before it; the completing token is counted), or after ``max_new_tokens``.
    """
    device = next(model.parameters()).device
    results: list[Generation | None] = [None] * len(prompts)
    for batch in _length_batches([len(p) for p in prompts], batch_size):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        # Left padding: positions count real tokens only, so padded rows see the same RoPE
        # positions as they would alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generated: list[TokenIds] = [[] for _ in batch]
        done = [False] * len(batch)
        past = None
        for _step in range(max_new_tokens):
            deadline.check()
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_ids = out.logits[:, -1, :].argmax(-1)
            for row, token in enumerate(next_ids.tolist()):
                if done[row]:
                    continue
                if token in eos_ids:
                    done[row] = True
                    continue
                generated[row].append(token)
                if stop:
                    done[row] = _truncate_at_stop(decode(generated[row]), stop)[1]
            if all(done):
                break
            ids = next_ids.unsqueeze(-1)
            mask = torch.cat([mask, mask.new_ones((len(batch), 1))], dim=-1)
            positions = positions[:, -1:] + 1
        for row, i in enumerate(batch):
            text = _truncate_at_stop(decode(generated[row]), stop)[0]
            results[i] = Generation(text=text, num_tokens=len(generated[row]))
    return results  # type: ignore[return-value]


@torch.inference_mode()
def continuation_logprobs(
    model: torch.nn.Module,
    pairs: Sequence[tuple[TokenIds, TokenIds]],
    *,
    pad_id: int,
    batch_size: int,
    deadline: Deadline,
) -> list[list[float]]:
    """log p(c_t | prefix, c_<t) for every continuation token, in batched teacher-forced forwards.

    Right padding: real tokens keep positions 0..n-1, so no position ids are needed. The
    log-softmax is taken in fp32 on the continuation positions only.
    """
    device = next(model.parameters()).device
    results: list[list[float]] = [[] for _ in pairs]
    todo = [i for i, (_, cont) in enumerate(pairs) if cont]  # an empty continuation scores nothing
    lengths = [len(pairs[i][0]) + len(pairs[i][1]) - 1 for i in todo]
    for batch in _length_batches(lengths, batch_size):
        deadline.check()
        seqs = [pairs[todo[b]][0] + pairs[todo[b]][1][:-1] for b in batch]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, b in enumerate(batch):
            prefix, cont = pairs[todo[b]]
            start = len(prefix) - 1
            rows = logits[row, start : start + len(cont)].float().log_softmax(-1)
            target = torch.tensor(cont, device=rows.device).unsqueeze(-1)
            results[todo[b]] = rows.gather(-1, target).squeeze(-1).tolist()
    return results
