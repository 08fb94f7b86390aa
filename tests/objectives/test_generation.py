"""The greedy loop and teacher-forced log-probs against unbatched references on a real model."""

import itertools
import math

import pytest
import torch

from evomerge.objectives import Deadline, EvaluationTimeout
from evomerge.objectives._generation import FORWARD_OVERHEAD_TOKENS, continuation_logprobs, greedy_generate, length_batches

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
    gens = greedy_generate(model, [(p, []) for p in prompts], decode=lambda x: tok.decode(x, skip_special_tokens=True), pad_id=0,
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
    gen = greedy_generate(model, [(p, [])], decode=decode, pad_id=0, eos_ids=frozenset({ref[2]}), stop=(),
                          max_new_tokens=8, batch_size=1, deadline=Deadline(None))[0]
    first = ref.index(ref[2])  # the EOS id may already occur earlier
    assert gen.num_tokens == first and gen.text == decode(ref[:first])
    # stop string: the 2nd generated character; the text is cut before it, the token counted
    stop_char = decode([ref[1]])
    gen = greedy_generate(model, [(p, [])], decode=decode, pad_id=0, eos_ids=frozenset(), stop=(stop_char,),
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
        greedy_generate(model, [(ids(tok, "a"), [])], decode=tok.decode, pad_id=0, eos_ids=frozenset(), stop=(),
                        max_new_tokens=4, batch_size=1, deadline=Deadline(0.0))


def _generate(model, tok, requests, **kw):
    args = dict(decode=lambda x: tok.decode(x, skip_special_tokens=True), pad_id=0, eos_ids=frozenset(), stop=(),
                max_new_tokens=6, batch_size=3, deadline=Deadline(None))
    return greedy_generate(model, requests, **{**args, **kw})


@pytest.mark.parametrize("stop", [(), ("\n",)])
def test_drafts_change_the_work_not_the_generation(tiny_lm, stop):
    """Right, partly right, wrong, over-long and empty drafts give the undrafted greedy text, and
    their log-probs are the teacher-forced ones."""
    model, tok = tiny_lm
    prompts = [ids(tok, p) for p in PROMPTS]
    plain = _generate(model, tok, [(p, []) for p in prompts], stop=stop)
    drafts = []
    for i, p in enumerate(prompts):
        ref = reference_greedy(model, p, 8)
        drafts += [ref, ref[:3] + [(ref[3] + 1) % 40 + 4] + ref[4:], [(ref[0] + 7) % 40 + 4], ref + [5, 6, 7, 8], []][i % 5 : i % 5 + 1]
    drafts += [reference_greedy(model, prompts[0], 2)]
    requests = list(zip(prompts + prompts[:1], drafts))
    drafted = _generate(model, tok, requests, stop=stop)
    for want, got in zip(plain + plain[:1], drafted):
        assert (got.text, got.num_tokens) == (want.text, want.num_tokens)
    teacher = continuation_logprobs(model, requests, pad_id=0, batch_size=2, deadline=Deadline(None))
    for got, lp in zip(drafted, teacher):
        assert got.draft_logprobs == pytest.approx(lp, abs=1e-5)


def test_draft_stops_at_eos_and_stop_strings_inside_it(tiny_lm):
    model, tok = tiny_lm
    p = ids(tok, PROMPTS[1])
    ref = reference_greedy(model, p, 8)
    decode = lambda x: tok.decode(x, skip_special_tokens=True)  # noqa: E731
    gen = _generate(model, tok, [(p, ref)], eos_ids=frozenset({ref[3]}), max_new_tokens=8)[0]
    first = ref.index(ref[3])
    assert (gen.num_tokens, gen.text) == (first, decode(ref[:first]))
    stop_char = decode([ref[2]])
    full = decode(ref)
    gen = _generate(model, tok, [(p, ref)], stop=(stop_char,), max_new_tokens=8)[0]
    assert (gen.text, gen.num_tokens) == (full[: full.index(stop_char)], full.index(stop_char) + 1)
    gen = _generate(model, tok, [(p, ref)], max_new_tokens=2)[0]
    assert (gen.text, gen.num_tokens) == (decode(ref[:2]), 2)


def _padded_work(batches, lengths, overhead):
    return sum(len(b) * max(lengths[i] for i in b) + overhead for b in batches)


@pytest.mark.parametrize("overhead", [FORWARD_OVERHEAD_TOKENS, 4])
@pytest.mark.parametrize("lengths", [[5, 5, 5, 40, 90, 91], [3, 9, 9, 10, 30, 31, 2], [7] * 9, [1], []])
def test_length_batches_minimize_padded_work(lengths, overhead):
    """The DP's batches cover every index once, respect the size cap, and match the best
    contiguous split of the sorted lengths found by brute force."""
    cap = 3
    batches = length_batches(lengths, cap, overhead)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(0 < len(b) <= cap for b in batches)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = min(
        (_padded_work([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, overhead)
         for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k)
         if all(b - a <= cap for a, b in zip((0, *cuts), (*cuts, len(order))))),
        default=0,
    )
    assert _padded_work(batches, lengths, overhead) == best


def test_drafts_on_a_trained_model(zoo_dir):
    """On a model trained on the task, wrong drafts are in-context garbage it would copy: the
    verified prefix and positions must exclude them exactly."""
    from transformers import AutoModelForCausalLM

    from evomerge.objectives import CalibrationSet
    from evomerge.objectives._transformers_scorer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(zoo_dir / "experts" / "rev").eval()
    tok = load_tokenizer(zoo_dir / "experts" / "rev")
    items = CalibrationSet.load(zoo_dir / "data" / "rev" / "calib.jsonl", size=12, seed=0).items
    prompts = [ids(tok, it.prompt) for it in items]
    answers = [tok(it.answer, add_special_tokens=False)["input_ids"] for it in items]
    wrong = [a[:1] + [a[0]] * 3 + a[1:] for a in answers]  # right first token, then a wrong run
    kw = dict(eos_ids=frozenset({tok.eos_token_id}), stop=("\n",), max_new_tokens=12, batch_size=5)
    plain = _generate(model, tok, [(p, []) for p in prompts], **kw)
    assert sum(g.text == it.answer for g, it in zip(plain, items)) >= 6  # the expert mostly answers right
    for drafts in (answers, wrong, [a[::-1] for a in answers]):
        drafted = _generate(model, tok, list(zip(prompts, drafts)), **kw)
        assert [(g.text, g.num_tokens) for g in drafted] == [(g.text, g.num_tokens) for g in plain]


ARCHS = {
    "qwen2": lambda: __import__("transformers").Qwen2Config(),
    "mistral-sliding": lambda: __import__("transformers").MistralConfig(head_dim=32, sliding_window=6),
    "gemma2": lambda: __import__("transformers").Gemma2Config(head_dim=32, sliding_window=6),
    "phi3": lambda: __import__("transformers").Phi3Config(),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_drafted_generation_on_other_architectures(arch, tiny_lm):
    """Left padding, position ids, `logits_to_keep` and the shrinking KV cache on the other supported
    decoder families (sliding-window caches included): drafted == undrafted == unbatched generate."""
    from transformers import AutoModelForCausalLM

    config = ARCHS[arch]()
    for key, value in dict(vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, tie_word_embeddings=False).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    tok = tiny_lm[1]
    prompts = [ids(tok, p) for p in PROMPTS]
    refs = [reference_greedy(model, p, 8) for p in prompts]
    drafts = [refs[0], refs[1][:2] + [(refs[1][2] + 1) % 40 + 4], [], refs[3] + [9, 9], [(refs[4][0] + 3) % 40 + 4]]
    for requests in ([(p, []) for p in prompts], list(zip(prompts, drafts))):
        gens = _generate(model, tok, requests, max_new_tokens=8, batch_size=3)
        assert [g.text for g in gens] == [tok.decode(r, skip_special_tokens=True) for r in refs]


def test_greedy_takes_the_first_maximum_like_argmax():
    """`_greedy` uses max(-1).indices for speed; on ties it must pick the first index like argmax."""
    from evomerge.objectives._generation import _greedy

    logits = torch.tensor([[0.5, 2.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0], [-1.0, -2.0, -1.0, -5.0]], dtype=torch.bfloat16)
    assert _greedy(logits).tolist() == logits.float().argmax(-1).tolist() == [1, 0, 0]


def test_kept_logits_are_the_model_head_s_own_on_gemma2():
    """`logits_to_keep` as an index tensor keeps the model's own head: Gemma 2's final logit
    soft-capping included (bf16 too), so log-probs equal a plain full forward's."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=32, final_logit_softcapping=0.5, sliding_window=8,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Gemma2ForCausalLM(config).eval()
    pairs = [([1, 5, 6, 7], [8, 9, 10]), ([1, 11], [12]), ([1, 13, 14, 15, 16, 17], [18, 19])]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        model.to(dtype)
        got = continuation_logprobs(model, pairs, pad_id=0, batch_size=3, deadline=Deadline(None))
        for (prefix, cont), lp in zip(pairs, got):
            with torch.no_grad():
                logits = model(torch.tensor([prefix + cont])).logits[0].float()
            assert logits.abs().max() <= 0.5  # capped
            want = [logits[len(prefix) - 1 + t].log_softmax(-1)[c].item() for t, c in enumerate(cont)]
            assert lp == pytest.approx(want, abs=tol)


def test_generation_uses_transformers_current_cache_api(tiny_lm):
    """Plain and drafted generation (a prefill cache handed to the decode loop) pass and read the KV
    cache under the name the model's forward takes: current transformers logs "`past_key_values`
    ... deprecated. Use `cache` instead" for the old name, once per process, into every run's log."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    model, tok = tiny_lm
    prompts = [ids(tok, p) for p in PROMPTS]
    collect = Collect()
    hf_logging.add_handler(collect)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _generate(model, tok, [(p, []) for p in prompts] + [(prompts[0], [5, 6])], stop=())
    finally:
        hf_logging.remove_handler(collect)
    said = collect.messages + [str(w.message) for w in caught]
    assert not [m for m in said if "deprecated" in m.lower()], said
