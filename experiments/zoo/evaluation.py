"""Exact-match evaluation: batched greedy generation with left padding.

This mirrors what the project's scorers do (transformers and vLLM): the prompt is fed
with BOS, the model generates greedily, and the text up to EOS or newline, stripped, must
equal the answer.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .skills import Example
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, decode, encode


def left_pad(prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids, attention_mask`` (BOS + prompt) for batched generation."""
    seqs = [[BOS_ID] + encode(p) for p in prompts]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def completion_text(text: str) -> str:
    """The answer part of a generation: up to the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def exact_match(generated: str, answer: str) -> bool:
    return completion_text(generated) == answer.strip()


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """Greedy completions of ``prompts`` (text up to EOS, special tokens dropped)."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start : start + batch_size])
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
        )
        out.extend(decode(row.tolist()) for row in gen[:, ids.shape[1] :])
    model.train(was_training)
    return out


def accuracy(model: torch.nn.Module, examples: Sequence[Example], batch_size: int = 256) -> float:
    """Exact-match accuracy of greedy generation on ``examples``."""
    if not examples:
        return float("nan")
    max_new = max(len(ex.answer) for ex in examples) + 2
    gens = generate(model, [ex.prompt for ex in examples], max_new, batch_size)
    return sum(exact_match(g, ex.answer) for g, ex in zip(gens, examples)) / len(examples)
