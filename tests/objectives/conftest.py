"""Fixtures for the objectives tests: a tiny random Llama with a char tokenizer, built in scratch.

The inference primitives are tested on this model without the merge engine; scorer tests use the
engine on the toy zoo.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 =+-\n"


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="left"
    )


@pytest.fixture(scope="session")
def tiny_lm() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    # Random init is near-uniform; sharpen the head so greedy decoding has clear winners.
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model, char_tokenizer()


@pytest.fixture(scope="session")
def zoo_dir():
    """The tiny toy zoo (built once, then cached by the zoo builder)."""
    from evomerge.experiments.zoo import build_zoo

    return build_zoo("tiny", progress=False)


@pytest.fixture(scope="session")
def zoo_experts(zoo_dir) -> dict[str, str]:
    from evomerge.experiments.zoo import load_manifest

    return {name: str(zoo_dir / path) for name, path in load_manifest(zoo_dir)["experts"].items()}


@pytest.fixture(scope="session")
def zoo_engine(zoo_dir, zoo_experts):
    from evomerge.merge import MergeEngine

    return MergeEngine.load(zoo_dir / "base", zoo_experts, progress=False)


@pytest.fixture(scope="session")
def zoo_objectives(zoo_dir) -> list:
    """Generation, loss, multiple-choice, perplexity and cost objectives over the zoo's skills.

    The multiple-choice and perplexity sets are derived from the calibration data, so every
    metric kind runs on text the models were trained on.
    """
    from evomerge.objectives import CalibrationSet, Objective

    objectives = []
    for skill in ("rev", "sort"):
        cal = CalibrationSet.load(zoo_dir / "data" / skill / "calib.jsonl", size=8, seed=0)
        objectives += [
            Objective(f"{skill}_acc", "exact_match", cal),
            Objective(f"{skill}_loss", "answer_loss", cal),
        ]
        if skill == "rev":
            objectives.append(Objective("rev_len", "response_length", cal))
            items = cal.items
            rows = [
                {"prompt": it.prompt, "choices": [items[(i + 1) % len(items)].answer, it.answer], "label": 1}
                for i, it in enumerate(items)
            ]
            objectives.append(Objective("rev_mc", "mc_accuracy", CalibrationSet.from_items("rev_mc", rows)))
            ppl = CalibrationSet.from_items("rev_text", [{"text": it.prompt + it.answer} for it in items])
            objectives.append(Objective("rev_ppl", "perplexity", ppl))
    objectives += [Objective("kept", "kept_fraction"), Objective("l1", "l1_distance"), Objective("changed", "changed_params")]
    return objectives
