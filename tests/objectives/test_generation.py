"""The greedy loop and teacher-forced log-probs against unbatched references on a real model."""

import math

import pytest
import torch

from evomerge.objectives import Deadline, EvaluationTimeout
from evomerge.objectives._generation import continuation_logprobs, greedy_generate

PROMPTS = ["rev abc=", "sort zyxw=", "add 1+2=", "shift q=", "a"]


def ids(tok, text):
    return tok(text)["input_ids"]


def reference_greedy(model, prompt_ids, n):
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_batched_greedy_equals_unbatched_generate(tiny_lm):
    model, tok = tiny_lm
    prompts = [ids(tok, p) for p in PROMPTS]
    gens = greedy_generate(model, prompts, decode=lambda x: tok.decode(x, skip_special_tokens=True), pad_id=0,
                           eos_ids=frozenset(), stop=(), max_new_tokens=6, batch_size=3, deadline=Deadline(None))
    for p, g in zip(prompts, gens):
        ref = reference_greedy(model, p, 6)
        assert g.num_tokens == 6
        assert g.text == tok.decode(ref, skip_special_tokens=True)


def test_stop_rules(tiny_lm):
    model, tok = tiny_lm
    p = ids(tok, PROMPTS[0])
    ref = reference_greedy(model, p, 8)
    decode = lambda x: tok.decode(x, skip_special_tokens=True)  # noqa: E731
    # EOS: make the 3rd generated token an EOS id -> 2 tokens, text of those 2 tokens
    gen = greedy_generate(model, [p], decode=decode, pad_id=0, eos_ids=frozenset({ref[2]}), stop=(),
                          max_new_tokens=8, batch_size=1, deadline=Deadline(None))[0]
    first = ref.index(ref[2])  # the EOS id may already occur earlier
    assert gen.num_tokens == first and gen.text == decode(ref[:first])
    # stop string: the 2nd generated character; the text is cut before it, the token counted
    stop_char = decode([ref[1]])
    gen = greedy_generate(model, [p], decode=decode, pad_id=0, eos_ids=frozenset(), stop=(stop_char,),
                          max_new_tokens=8, batch_size=1, deadline=Deadline(None))[0]
    full = decode(ref)
    assert gen.text == full[: full.index(stop_char)]
    assert gen.num_tokens == full.index(stop_char) + 1


def test_continuation_logprobs_match_manual_forward(tiny_lm):
    model, tok = tiny_lm
    pairs = [(ids(tok, "rev ab="), [5, 6, 7]), (ids(tok, "a"), [8]), (ids(tok, "sort x="), []), (ids(tok, "q"), [9, 9])]
    got = continuation_logprobs(model, pairs, pad_id=0, batch_size=2, deadline=Deadline(None))
    assert got[2] == []
    for (prefix, cont), lp in zip(pairs, got):
        if not cont:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prefix + cont])).logits[0].log_softmax(-1)
        want = [logits[len(prefix) - 1 + t, c].item() for t, c in enumerate(cont)]
        assert lp == pytest.approx(want, abs=1e-5)
        assert all(math.isfinite(x) and x <= 0 for x in lp)


def test_deadline_stops_generation(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(EvaluationTimeout, match="timeout"):
        greedy_generate(model, [ids(tok, "a")], decode=tok.decode, pad_id=0, eos_ids=frozenset(), stop=(),
                        max_new_tokens=4, batch_size=1, deadline=Deadline(0.0))
