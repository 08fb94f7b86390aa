"""Character-level tokenizer of the toy zoo, saved as an ordinary HF fast tokenizer.

One token per character keeps the synthetic skills learnable by a tiny model (a reversal is
a permutation of tokens) and needs no trained vocabulary, so the tokenizer is fully
determined by :data:`~evomerge.experiments.zoo.skills.CHARSET`.
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast

from .skills import CHARSET

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
#: Embedding rows in the model; a little headroom above the real vocabulary (46) keeps the
#: matrix a round size and leaves room for later tokens without changing shapes.
MODEL_VOCAB_SIZE = 64


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The zoo tokenizer: char-level, BOS prepended, left padding (for batched generation)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARSET))}
    assert len(vocab) <= MODEL_VOCAB_SIZE
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=256,
    )


def build_byte_level_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab_size`` entries whose ids for the zoo's characters are
    those of :func:`encode` (the real-shaped fixtures reuse the zoo's skills and training code).

    Why byte-level: ``AutoTokenizer`` loads a Qwen2 folder with ``Qwen2Tokenizer`` whatever the
    saved class, and that class rebuilds the pipeline with a byte-level pre-tokenizer, which drops
    the character tokenizer's spaces; a byte-level vocabulary reads the same in every class, as
    real Qwen/Llama-3 vocabularies do. No merges (every byte is a token: the skills are
    character-level), the 256 byte symbols after the zoo's characters, then ``<reserved_N>``
    entries up to ``vocab_size`` so the tokenizer's length equals the embedding rows.
    """
    to_symbol = ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in CHARSET:
        vocab[to_symbol.pre_tokenize_str(c)[0][0]] = len(vocab)
    for symbol in sorted(ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(vocab)} byte-level tokens")
    vocab.update({f"<reserved_{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = to_symbol
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", model_max_length=256,
    )


def encode(text: str) -> list[int]:
    """Token ids of ``text`` without BOS (the fixed char->id map, no tokenizer object needed)."""
    return [_CHAR_IDS[c] for c in text]


_CHAR_IDS = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(CHARSET)}
_ID_CHARS = {i: c for c, i in _CHAR_IDS.items()}


def decode(ids: list[int]) -> str:
    """Text of ``ids`` up to the first EOS (or PAD), dropping special tokens."""
    out = []
    for i in ids:
        if i in (EOS_ID, PAD_ID):
            break
        out.append(_ID_CHARS.get(int(i), ""))
    return "".join(out)
