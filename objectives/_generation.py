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
steps and a separate loss forward. The rows a draft did not finish go on from the verification
forward's own KV cache (the rejected draft tokens masked out, `_Resume`), the rows of all batches
together in one decode loop (a decoding step costs mostly its fixed per-call overhead on small
models, so one loop beats one per batch); rows that are done leave the batch and its cache.

A small loop with a KV cache instead of `model.generate`: it is trivially deterministic, and it
lets the scorer check stop strings and its deadline between steps.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from transformers.cache_utils import DynamicLayer

from ._plan import Generation, TokenIds
from ._scorer import Deadline

FORWARD_OVERHEAD_TOKENS = 48
"""The cost of one extra forward call in token-equivalents, for choosing batch boundaries. Small zoo
on CPU: a call costs ~1 ms besides its tokens, a prefill token ~16 us on 2 threads and ~30 us on one
(measured: 1x1 tokens 0.96 ms, 16x32 7.4 ms, 64x32 34 ms on 2 threads), so ~35-60 tokens. It only
trades padding against the number of calls (the earlier 16, estimated from decode steps, split
teacher-forced batches too eagerly)."""


def length_batches(lengths: Sequence[int], batch_size: int, overhead: int = FORWARD_OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size`` that minimize padded work.

    Requests are sorted by length and cut into contiguous runs; the cut points minimize
    sum(rows x longest + overhead) exactly (a dynamic program over the sorted
    lengths, O(n x batch_size)), so a few long requests do not pad a whole batch to their length.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of batching the j shortest requests
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(max(0, j - batch_size), j):
            cost = best[i] + (j - i) * longest + overhead
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


def _last_columns(width: int, keep: int, device: torch.device) -> torch.Tensor:
    """``logits_to_keep`` for the last ``keep`` of ``width`` positions, as an index tensor.

    An int would make transformers slice ``hidden_states[:, -keep:]``: a strided view whose batched
    product with the output embeddings CPU kernels run two orders of magnitude slower than on a
    contiguous copy (bf16, vocabulary 151,936: 8.4 s against 0.065 s). An index tensor is gathered
    into a contiguous copy first (a public form of the argument since transformers 4.50), and the
    model's own head still runs on it, final logit soft-capping (Gemma 2) included."""
    return torch.arange(width - keep, width, device=device)


def _teacher_forced(model: torch.nn.Module, seqs: Sequence[TokenIds], keep: int, pad_id: int,
                    cache: bool = False) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Logits (the model's dtype) of the last ``keep`` positions of each left-padded sequence (one
    forward), the attention mask, and the KV cache when ``cache``."""
    ids, mask, positions = _left_padded(seqs, pad_id, next(model.parameters()).device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=cache,
                logits_to_keep=_last_columns(ids.shape[1], keep, ids.device))
    return out.logits, mask, getattr(out, _cache_name(model)) if cache else None


def _cache_name(model: torch.nn.Module) -> str:
    """The KV cache's name in this model's forward and output: ``cache`` in current transformers
    (which deprecates ``past_key_values`` with a warning on every run), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """The greedy token of each row of ``logits`` (..., vocab): ``max`` returns the first maximal
    index like ``argmax``, and on a bf16 151k vocabulary it is ~3x faster than ``argmax``."""
    return logits.max(-1).indices


def _selected_logprobs(logits: torch.Tensor, spans: Sequence[tuple[int, int, TokenIds]]) -> list[list[float]]:
    """log p(tokens[t]) under ``logits[row, start + t]`` for each (row, start, tokens) span, fp32.

    One gather and one fp32 log-softmax over exactly the selected positions of the whole batch:
    per request the same work costs ~8x more on a 151k vocabulary (a call's fixed cost, repeated)."""
    rows = [row for row, _, tokens in spans for _ in tokens]
    if not rows:
        return [[] for _ in spans]
    device = logits.device
    columns = [start + t for _, start, tokens in spans for t in range(len(tokens))]
    targets = torch.tensor([tok for _, _, tokens in spans for tok in tokens], dtype=torch.long, device=device)
    picked = logits[torch.tensor(rows, device=device), torch.tensor(columns, device=device)]
    flat = torch.log_softmax(picked, -1, dtype=torch.float32).gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()
    out, pos = [], 0
    for _, _, tokens in spans:
        out.append(flat[pos : pos + len(tokens)])
        pos += len(tokens)
    return out


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
    rows = [_Row(decode, eos_ids, stop, max_new_tokens) for _ in requests]
    draft_logprobs: list[list[float]] = [[] for _ in requests]
    resumes: list[_Resume] = []  # reusable caches waiting for their decode loop
    prefill: list[int] = []  # the rest: re-prefilled from their verified prefix
    for batch in length_batches([len(p) + len(d) for p, d in requests], batch_size):
        deadline.check()
        keep = 1 + max(len(requests[i][1]) for i in batch)
        logits, mask, past = _teacher_forced(model, [requests[i][0] + requests[i][1] for i in batch], keep, pad_id,
                                             cache=True)
        greedy_all = _greedy(logits).tolist()
        spans = [(row, keep - len(requests[i][1]) - 1, requests[i][1]) for row, i in enumerate(batch)]
        for (row, start, draft), i, lps in zip(spans, batch, _selected_logprobs(logits, spans)):
            greedy = greedy_all[row][start:]  # the predictions after the prompt
            agree = next((j for j, token in enumerate(draft) if greedy[j] != token), len(draft))
            rows[i].accept(greedy[: agree + 1])
            draft_logprobs[i] = lps
        del logits
        # Rows the draft did not finish go on from this forward's own KV cache where the model's
        # cache allows it (the rows of several batches joined into one decode loop), else re-prefilled.
        unfinished = [r for r, i in enumerate(batch) if not rows[i].done]
        if unfinished:
            resume = _Resume(past, mask, unfinished, [batch[r] for r in unfinished], requests, rows)
            if resume.reusable:
                resumes.append(resume)
            else:
                prefill.extend(resume.indices)
        del past
        while sum(len(r.indices) for r in resumes) >= batch_size:  # decode as soon as a batch is full:
            _decode_cached(model, _take_group(resumes, batch_size), rows, deadline)  # caches held <= 2 batches
    while resumes:
        _decode_cached(model, _take_group(resumes, batch_size), rows, deadline)
    prefixes = [requests[i][0] + rows[i].tokens for i in prefill]
    # A decode batch costs up to max_new_tokens forward calls, so padding is cheap next to a split.
    for batch in length_batches([len(p) for p in prefixes], batch_size, FORWARD_OVERHEAD_TOKENS * max_new_tokens):
        _decode(model, [prefixes[b] for b in batch], [rows[prefill[b]] for b in batch], pad_id, deadline)
    return [row.result(lps) for row, lps in zip(rows, draft_logprobs)]


class _Resume:
    """The unfinished rows of one verification forward and its KV cache, cut to those rows.

    A row's cache holds its prompt and its whole draft; the draft tokens after the first
    disagreement are masked out (zeros in the attention mask, wherever they sit), and the row goes
    on from its last accepted token at the position after its verified prefix. Only plain growing
    layers (`DynamicLayer`) are reused: a sliding-window layer keeps only its window, so rows of
    models with one (Mistral, Gemma 2) are re-prefilled from their verified prefix instead."""

    def __init__(self, past: Any, mask: torch.Tensor, slots: list[int], indices: list[int],
                 requests: Sequence[tuple[TokenIds, TokenIds]], rows: Sequence[_Row]) -> None:
        self.indices = indices
        self.reusable = past is not None and all(type(layer) is DynamicLayer for layer in getattr(past, "layers", [None]))
        if not self.reusable:
            return
        index = torch.tensor(slots, dtype=torch.long, device=mask.device)
        past.batch_select_indices(index)
        self.past, self.mask = past, mask[index].clone()
        width = self.mask.shape[1]
        last, position = [], []
        for row, i in enumerate(indices):
            prompt, draft = requests[i]
            agree = len(rows[i].tokens) - 1  # the tokens are draft[:agree] and one more
            if len(draft) > agree:
                self.mask[row, width - (len(draft) - agree) :] = 0
            last.append(rows[i].tokens[-1])
            position.append(len(prompt) + agree)
        self.last = torch.tensor(last, dtype=torch.long, device=mask.device)
        self.position = torch.tensor(position, dtype=torch.long, device=mask.device)


def _take_group(resumes: list[_Resume], batch_size: int) -> list[_Resume]:
    """The first resumes, in order, up to ``batch_size`` rows together (at least one), removed."""
    group, size = [], 0
    while resumes and (not group or size + len(resumes[0].indices) <= batch_size):
        size += len(resumes[0].indices)
        group.append(resumes.pop(0))
    return group


def _decode_cached(model: torch.nn.Module, group: list[_Resume], rows: Sequence[_Row], deadline: Deadline) -> None:
    """`_decode_from` over several resumes' rows: caches and masks left-padded to one width."""
    width = max(r.mask.shape[1] for r in group)
    past = group[0].past
    for layer, *others in zip(past.layers, *(r.past.layers for r in group[1:])):
        parts = [layer, *others]
        layer.keys = torch.cat([_pad_time(p.keys, width) for p in parts])
        layer.values = torch.cat([_pad_time(p.values, width) for p in parts])
    mask = torch.cat([torch.nn.functional.pad(r.mask, (width - r.mask.shape[1], 0)) for r in group])
    ids = torch.cat([r.last for r in group]).unsqueeze(-1)
    positions = torch.cat([r.position for r in group]).unsqueeze(-1)
    mask = torch.cat([mask, mask.new_ones((len(ids), 1))], dim=-1)
    _decode_from(model, [rows[i] for r in group for i in r.indices], ids, mask, positions, past, deadline)


def _pad_time(states: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, heads, time, dim) states left-padded with zeros to ``width`` time steps."""
    return torch.nn.functional.pad(states, (0, 0, width - states.shape[-2], 0))


def _decode(model: torch.nn.Module, prefixes: list[TokenIds], rows: list[_Row], pad_id: int, deadline: Deadline) -> None:
    """`_decode_from` the given prefixes (one prefill forward, then the steps)."""
    ids, mask, positions = _left_padded(prefixes, pad_id, next(model.parameters()).device)
    _decode_from(model, rows, ids, mask, positions, None, deadline)


def _decode_from(model: torch.nn.Module, rows: list[_Row], ids: torch.Tensor, mask: torch.Tensor,
                 positions: torch.Tensor, past: Any, deadline: Deadline) -> None:
    """Greedy steps with a KV cache until every row has ended; rows that end leave the batch and
    the cache, so late steps cost only what is still generating. ``ids``/``positions``: the first
    forward's input (a prefill, or one token per row on a given cache); ``mask`` covers cache + ids."""
    deadline.check()
    positions_next = positions[:, -1:] + 1
    live = list(range(len(rows)))
    name = _cache_name(model)
    while True:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **{name: past}, use_cache=True,
                    logits_to_keep=_last_columns(ids.shape[1], 1, ids.device))
        past = getattr(out, name)
        tokens = _greedy(out.logits[:, -1, :])
        for r, token in zip(live, tokens.tolist()):
            rows[r].accept([token])
        still = [slot for slot, r in enumerate(live) if not rows[r].done]
        if not still:
            return
        if len(still) < len(live):
            index = torch.tensor(still, dtype=torch.long, device=mask.device)
            past.batch_select_indices(index)
            mask, tokens, positions_next = mask[index], tokens[index], positions_next[index]
            live = [live[s] for s in still]
        deadline.check()
        ids, positions = tokens.unsqueeze(-1), positions_next
        positions_next = positions_next + 1
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)


@torch.inference_mode()
def continuation_logprobs(
    model: torch.nn.Module,
    pairs: Sequence[tuple[TokenIds, TokenIds]],
    *,
    pad_id: int,
    batch_size: int,
    deadline: Deadline,
) -> list[list[float]]:
    """log p(c_t | prefix, c_<t) for every continuation token, in batched teacher-forced forwards."""
    results: list[list[float]] = [[] for _ in pairs]
    todo = [i for i, (_, cont) in enumerate(pairs) if cont]  # an empty continuation scores nothing
    for batch in length_batches([len(pairs[i][0]) + len(pairs[i][1]) - 1 for i in todo], batch_size):
        deadline.check()
        conts = [pairs[todo[b]][1] for b in batch]
        keep = max(len(c) for c in conts)
        logits = _teacher_forced(model, [pairs[todo[b]][0] + c[:-1] for b, c in zip(batch, conts)], keep, pad_id)[0]
        spans = [(row, keep - len(cont), cont) for row, cont in enumerate(conts)]
        for b, lps in zip(batch, _selected_logprobs(logits, spans)):
            results[todo[b]] = lps
    return results
