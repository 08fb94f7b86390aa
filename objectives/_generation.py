"""Batched inference on a live transformers model: greedy generation and teacher-forced log-probs.

Both run on left-padded, length-sorted batches with explicit position ids, so a padded row sees
the same RoPE positions as it would alone, and only the logits that are read are computed
(`logits_to_keep`: with left padding every row's continuation ends at the last column).

Greedy generation is *draft-verified*: a request may carry a draft continuation (the calibration
answer). The prompt and the whole draft go through one teacher-forced forward; the greedy token at
each draft position is the argmax there, so the generation follows the draft while the argmax
agrees with it and needs decoding steps only from the first disagreement on (or after the draft
when the model does not stop). The result is the greedy generation, whatever the draft (it only
changes how many steps are needed), and the same forward yields the draft's log-probabilities,
which is what the answer cross-entropy objective needs. A candidate that answers most items right
thus costs about one forward per batch instead of a prefill, up to ``max_new_tokens`` decoding
steps and a separate loss forward. Rows that are done leave the batch (and the KV cache).

A small loop with a KV cache instead of `model.generate`: it is trivially deterministic, and it
lets the scorer check stop strings and its deadline between steps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ._plan import Generation, TokenIds
from ._scorer import Deadline

FORWARD_OVERHEAD_TOKENS = 16
"""The cost of one extra forward call in token-equivalents, for choosing batch boundaries: on CPU
one call of the zoo models costs about as much as 10-20 tokens of compute (measured: 64x1 tokens
7 ms, 8x1 1.4 ms, 1x1 1.1 ms). It only trades padding against the number of calls."""


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size`` that minimize padded work.

    Requests are sorted by length and cut into contiguous runs; the cut points minimize
    sum(rows x longest + FORWARD_OVERHEAD_TOKENS) exactly (a dynamic program over the sorted
    lengths, O(n x batch_size)), so a few long requests do not pad a whole batch to their length.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of batching the j shortest requests
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(max(0, j - batch_size), j):
            cost = best[i] + (j - i) * longest + FORWARD_OVERHEAD_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches: list[list[int]] = []
    j = n
    while j > 0:
        batches.append(order[cut[j] : j])
        j = cut[j]
    return batches[::-1]


def _truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _left_padded(seqs: Sequence[TokenIds], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, attention mask and position ids (counting real tokens only) of left-padded rows."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


class _Row:
    """One request's generation state: the tokens accepted so far and whether it has ended."""

    def __init__(self, decode: Callable[[TokenIds], str], eos_ids: frozenset[int], stop: Sequence[str], limit: int) -> None:
        self.tokens: TokenIds = []
        self.done = False
        self._decode, self._eos_ids, self._stop, self._limit = decode, eos_ids, stop, limit

    def accept(self, tokens: Sequence[int]) -> None:
        """Take greedy tokens in order until an end rule fires: EOS (not kept), the token limit,
        or a stop string in the text (the completing token is kept, later ones dropped)."""
        start = len(self.tokens)
        for token in tokens:
            if token in self._eos_ids or len(self.tokens) >= self._limit:
                self.done = True
                break
            self.tokens.append(token)
        self.done |= len(self.tokens) >= self._limit
        if self._stop and len(self.tokens) > start and _truncate_at_stop(self._decode(self.tokens), self._stop)[1]:
            # Several tokens may have come at once: keep those up to the first stop only.
            while len(self.tokens) > start + 1 and _truncate_at_stop(self._decode(self.tokens[:-1]), self._stop)[1]:
                self.tokens.pop()
            self.done = True

    def result(self, draft_logprobs: list[float]) -> Generation:
        text = _truncate_at_stop(self._decode(self.tokens), self._stop)[0]
        return Generation(text=text, num_tokens=len(self.tokens), draft_logprobs=draft_logprobs)


@torch.inference_mode()
def greedy_generate(
    model: torch.nn.Module,
    requests: Sequence[tuple[TokenIds, TokenIds]],
    *,
    decode: Callable[[TokenIds], str],
    pad_id: int,
    eos_ids: frozenset[int],
    stop: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    deadline: Deadline,
) -> list[Generation]:
    """Greedy continuations of (prompt, draft) token-id pairs; a draft may be empty.

    A row stops at an EOS id (not counted, not in the text), when its text contains a stop string
    (the text is cut before it; the completing token is counted), or after ``max_new_tokens``.
    Each result carries the draft's teacher-forced log-probabilities (`draft_logprobs`).
    """
    device = next(model.parameters()).device
    results: list[Generation | None] = [None] * len(requests)
    for batch in length_batches([len(p) + len(d) for p, d in requests], batch_size):
        deadline.check()
        drafts = [requests[i][1] for i in batch]
        ids, mask, positions = _left_padded([requests[i][0] + requests[i][1] for i in batch], pad_id, device)
        keep = 1 + max(len(d) for d in drafts)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=keep)
        logits = out.logits.float()
        rows = [_Row(decode, eos_ids, stop, max_new_tokens) for _ in batch]
        draft_logprobs: list[list[float]] = []
        next_ids: list[int] = []
        for row, (state, draft) in enumerate(zip(rows, drafts)):
            # This row's predictions after its prompt: the last len(draft) + 1 kept positions.
            preds = logits[row, keep - len(draft) - 1 :]
            greedy = preds.argmax(-1).tolist()
            agree = next((j for j, token in enumerate(draft) if greedy[j] != token), len(draft))
            state.accept(greedy[: agree + 1])
            target = torch.tensor(draft, dtype=torch.long, device=device).unsqueeze(-1)
            draft_logprobs.append(preds[:-1].log_softmax(-1).gather(-1, target).squeeze(-1).tolist())
            # The draft's cache entries from the disagreement on are not this row's context.
            mask[row, mask.shape[1] - len(draft) + agree :] = 0
            next_ids.append(greedy[agree])
        _decode_rest(model, out.past_key_values, rows, next_ids, mask, deadline)
        for i, state, lps in zip(batch, rows, draft_logprobs):
            results[i] = state.result(lps)
    return results  # type: ignore[return-value]


def _decode_rest(
    model: torch.nn.Module, past: object, rows: list[_Row], next_ids: list[int], mask: torch.Tensor, deadline: Deadline
) -> None:
    """Step the unfinished rows one greedy token at a time from the verified prefix's cache.

    ``next_ids`` are each row's next input token, ``mask`` the batch's attention mask over the
    cache. Finished rows leave the batch, so late steps cost only what is still generating.
    """
    live = list(range(len(rows)))
    while True:
        still = [slot for slot, r in enumerate(live) if not rows[r].done]
        if not still:
            return
        if len(still) < len(live):
            index = torch.tensor(still, dtype=torch.long, device=mask.device)
            past.batch_select_indices(index)  # type: ignore[attr-defined]
            mask = mask.index_select(0, index)
            live, next_ids = [live[s] for s in still], [next_ids[s] for s in still]
        deadline.check()
        positions = mask.sum(-1, keepdim=True)  # real tokens so far: the new token's position
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
        ids = torch.tensor(next_ids, dtype=torch.long, device=mask.device).unsqueeze(-1)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        next_ids = out.logits[:, -1, :].argmax(-1).tolist()
        for slot, r in enumerate(live):
            rows[r].accept([next_ids[slot]])


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

    The log-softmax is taken in fp32 on the continuation positions only.
    """
    device = next(model.parameters()).device
    results: list[list[float]] = [[] for _ in pairs]
    todo = [i for i, (_, cont) in enumerate(pairs) if cont]  # an empty continuation scores nothing
    for batch in length_batches([len(pairs[i][0]) + len(pairs[i][1]) - 1 for i in todo], batch_size):
        deadline.check()
        conts = [pairs[todo[b]][1] for b in batch]
        ids, mask, positions = _left_padded([pairs[todo[b]][0] + c[:-1] for b, c in zip(batch, conts)], pad_id, device)
        keep = max(len(c) for c in conts)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=keep).logits
        for row, (b, cont) in enumerate(zip(batch, conts)):
            rows = logits[row, keep - len(cont) :].float().log_softmax(-1)
            target = torch.tensor(cont, dtype=torch.long, device=device).unsqueeze(-1)
            results[todo[b]] = rows.gather(-1, target).squeeze(-1).tolist()
    return results
