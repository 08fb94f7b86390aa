"""Synthetic skills of the toy zoo: deterministic prompt/answer generation.

Every skill is a pure string function with a short, unambiguous answer, so greedy
generation plus exact match is a natural metric. Prompts end in ``=`` and the model is
trained to emit the answer followed by EOS; the prompt prefix (``rev``, ``sort``, ...) tells
a merged model which skill is asked for, which is what lets merges trade skills.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
#: Every character a prompt or answer may contain; the tokenizer is built from it.
CHARSET = LETTERS + DIGITS + " =+-\n"


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair; ``prompt`` ends with ``=`` and ``answer`` has no EOS."""

    prompt: str
    answer: str

    def to_json(self) -> str:
        return json.dumps({"prompt": self.prompt, "answer": self.answer})


def _word(rng: np.random.Generator, lo: int, hi: int) -> str:
    n = int(rng.integers(lo, hi + 1))
    return "".join(LETTERS[i] for i in rng.integers(0, len(LETTERS), size=n))


def _rev(rng: np.random.Generator, lo: int, hi: int) -> Example:
    w = _word(rng, lo, hi)
    return Example(f"rev {w}=", w[::-1])


def _sort(rng: np.random.Generator, lo: int, hi: int) -> Example:
    w = _word(rng, lo, hi)
    return Example(f"sort {w}=", "".join(sorted(w)))


def _shift(rng: np.random.Generator, lo: int, hi: int) -> Example:
    w = _word(rng, lo, hi)
    return Example(f"shift {w}=", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w))


def _add(rng: np.random.Generator, lo: int, hi: int) -> Example:
    # lo/hi are digit counts of the operands.
    a_digits, b_digits = (int(rng.integers(lo, hi + 1)) for _ in range(2))
    a = int(rng.integers(0, 10**a_digits))
    b = int(rng.integers(0, 10**b_digits))
    return Example(f"add {a}+{b}=", str(a + b))


def _dup(rng: np.random.Generator, lo: int, hi: int) -> Example:
    w = _word(rng, lo, hi)
    return Example(f"dup {w}=", "".join(c + c for c in w))


def _copy(rng: np.random.Generator, lo: int, hi: int) -> Example:
    w = _word(rng, lo, hi)
    return Example(f"copy {w}=", w)


@dataclass(frozen=True)
class Skill:
    """A named generator; ``lo``/``hi`` bound the operand length (letters or digits)."""

    name: str
    make: Callable[[np.random.Generator, int, int], Example]
    lo: int
    hi: int

    def sample(self, rng: np.random.Generator, lo: int | None = None, hi: int | None = None) -> Example:
        return self.make(rng, self.lo if lo is None else lo, self.hi if hi is None else hi)


#: The evaluated skills, in manifest order. ``copy`` is a generic warm-up task for the base only.
SKILLS: dict[str, Skill] = {
    "rev": Skill("rev", _rev, 3, 5),
    "sort": Skill("sort", _sort, 3, 5),
    "shift": Skill("shift", _shift, 3, 5),
    "dup": Skill("dup", _dup, 3, 5),
    "add": Skill("add", _add, 1, 2),
}
COPY = Skill("copy", _copy, 2, 8)


def skill_rng(seed: int, *keys: int) -> np.random.Generator:
    """A Generator that depends only on (seed, keys), so each split/model gets its own stream."""
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def sample_unique(
    skill: Skill,
    rng: np.random.Generator,
    n: int,
    exclude: Iterable[str] = (),
    lo: int | None = None,
    hi: int | None = None,
) -> list[Example]:
    """``n`` examples with distinct prompts, none of whose prompt is in ``exclude``.

    Held-out splits must not leak into training data, so splits are drawn with disjoint
    prompts. ``lo``/``hi`` override the skill's operand lengths (the base sees shorter ones).
    """
    seen = set(exclude)
    out: list[Example] = []
    tries = 0
    while len(out) < n:
        ex = skill.sample(rng, lo, hi)
        tries += 1
        if tries > 100 * n + 1000:
            raise RuntimeError(f"skill {skill.name!r} cannot provide {n} distinct prompts")
        if ex.prompt in seen:
            continue
        seen.add(ex.prompt)
        out.append(ex)
    return out


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(ex.to_json() + "\n" for ex in examples), encoding="utf-8")


def read_jsonl(path: Path) -> list[Example]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Example(r["prompt"], r["answer"]) for r in rows]
