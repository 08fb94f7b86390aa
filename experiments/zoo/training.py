"""Training loops of the zoo: full fine-tuning and LoRA, teacher-forced on the answer only.

The loss covers the answer and its EOS, never the prompt: prompts are random strings, and
learning them would only add noise. Batches are drawn from a fixed example list with a
seeded numpy Generator, so a run is a pure function of (model init, data, seed, threads).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .skills import Example
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, encode

IGNORE = -100


def encode_examples(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids, attention_mask, labels`` for teacher forcing.

    Sequence = BOS + prompt + answer + EOS; labels are IGNORE except on answer + EOS.
    """
    seqs, labs = [], []
    for ex in examples:
        p, a = encode(ex.prompt), encode(ex.answer) + [EOS_ID]
        seqs.append([BOS_ID] + p + a)
        labs.append([IGNORE] * (1 + len(p)) + a)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, : len(l)] = torch.tensor(l)
    return ids, mask, labels


@dataclass
class TrainResult:
    """Figures recorded in the manifest for every trained model."""

    steps: int
    lr: float
    batch_size: int
    n_train: int
    first_loss: float
    final_loss: float
    seconds: float

    def to_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def train(
    model: torch.nn.Module,
    examples: Sequence[Example],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    rng: np.random.Generator,
    weights: np.ndarray | None = None,
    warmup: int = 0,
    weight_decay: float = 0.0,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """AdamW with linear warmup and cosine decay on the trainable parameters of ``model``.

    ``weights`` (optional, per example) sets the sampling probabilities, which is how the
    base's task mixture is expressed. The reported final loss is the mean over the last 10%
    of steps (one step's loss is too noisy to compare models by).
    """
    t0 = time.perf_counter()
    ids, mask, labels = encode_examples(examples)
    lengths = mask.sum(1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    p = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    model.train()
    losses: list[float] = []
    for step in range(steps):
        idx = torch.from_numpy(rng.choice(len(examples), size=batch_size, replace=True, p=p))
        width = int(lengths[idx].max())
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=ids[idx, :width], attention_mask=mask[idx, :width], labels=labels[idx, :width])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return TrainResult(
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        n_train=len(examples),
        first_loss=losses[0] if losses else float("nan"),
        final_loss=float(np.mean(tail)) if losses else float("nan"),
        seconds=time.perf_counter() - t0,
    )
