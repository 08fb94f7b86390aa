"""Calibration sets: the small, fixed data a candidate merge is scored on.

A set is one JSONL file whose rows all have the same shape:

* generation: ``{"prompt": ..., "answer": ...}`` (scored by generating from the prompt, or by the
  teacher-forced loss of the answer);
* multiple choice: ``{"prompt": ..., "choices": [...], "label": int}`` (scored by the
  log-likelihood of each choice after the prompt);
* perplexity: ``{"text": ...}``.

Sets are validated strictly at load time, because a bad row found in the middle of a search would
waste every candidate scored before it; the error names file, line and problem on one line. A
fixed subset (by ``seed`` and ``size``) keeps the per-candidate cost bounded while every candidate
of a run sees the same items.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

SetKind = Literal["generation", "multiple_choice", "perplexity"]

_KEYS: dict[SetKind, frozenset[str]] = {
    "generation": frozenset({"prompt", "answer"}),
    "multiple_choice": frozenset({"prompt", "choices", "label"}),
    "perplexity": frozenset({"text"}),
}


class CalibrationError(ValueError):
    """A calibration file is malformed; the message is one line: ``file:line: problem``."""


@dataclass(frozen=True)
class CalibrationItem:
    """One row. Fields that the set's kind does not use are None."""

    prompt: str | None = None
    answer: str | None = None
    choices: tuple[str, ...] | None = None
    label: int | None = None
    text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if v is not None}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


@dataclass(frozen=True)
class CalibrationSet:
    """A validated calibration set, optionally a seeded subset of its file.

    ``chat_template`` asks the scorer to wrap each prompt in the tokenizer's chat template (a user
    turn, after an optional ``system_prompt``) before tokenizing; without it the prompt is used
    verbatim, which is what base models and the toy zoo expect.
    """

    name: str
    kind: SetKind
    items: tuple[CalibrationItem, ...]
    path: str | None = None
    size: int | None = None
    seed: int = 0
    chat_template: bool = False
    system_prompt: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        name: str | None = None,
        size: int | None = None,
        seed: int = 0,
        chat_template: bool = False,
        system_prompt: str | None = None,
    ) -> "CalibrationSet":
        """Read and validate a JSONL file; keep ``size`` items drawn with ``seed`` (all if None).

        The kind is inferred from the first row's keys; every other row must match it.
        """
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise CalibrationError(f"{path}: cannot read calibration set ({exc.strerror or exc})") from None
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[: exc.start].count(b"\n") + 1
            raise CalibrationError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); save the calibration set as UTF-8 JSONL") from None
        kind: SetKind | None = None
        items: list[CalibrationItem] = []
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise CalibrationError(f"{where}: expected a JSON object, got {type(row).__name__}")
            row_kind = _infer_kind(row, where)
            if kind is None:
                kind = row_kind
            elif row_kind != kind:
                raise CalibrationError(f"{where}: row is a {row_kind} item but the set is {kind} (from its first row)")
            items.append(_parse_item(row, kind, where))
        if kind is None:
            raise CalibrationError(f"{path}: calibration set is empty")
        full = cls(
            name=name or _default_name(path),
            kind=kind,
            items=tuple(items),
            path=str(path),
            chat_template=chat_template,
            system_prompt=system_prompt,
        )
        return full.subset(size, seed) if size is not None else full

    @classmethod
    def from_items(
        cls,
        name: str,
        rows: Sequence[dict[str, Any]],
        *,
        chat_template: bool = False,
        system_prompt: str | None = None,
    ) -> "CalibrationSet":
        """Build a set from in-memory rows (same validation as files; errors say ``<name>:row``)."""
        if not rows:
            raise CalibrationError(f"{name}: calibration set is empty")
        kind = _infer_kind(rows[0], f"{name}:1")
        items = []
        for i, row in enumerate(rows, start=1):
            where = f"{name}:{i}"
            row_kind = _infer_kind(row, where)
            if row_kind != kind:
                raise CalibrationError(f"{where}: row is a {row_kind} item but the set is {kind} (from its first row)")
            items.append(_parse_item(row, kind, where))
        return cls(name=name, kind=kind, items=tuple(items), chat_template=chat_template, system_prompt=system_prompt)

    def subset(self, size: int | None, seed: int = 0) -> "CalibrationSet":
        """``size`` items drawn without replacement by ``seed``, in file order (stable across runs)."""
        if size is None or size >= len(self.items):
            return replace(self, size=size, seed=seed)
        if size <= 0:
            raise CalibrationError(f"{self.path or self.name}: subset size must be positive, got {size}")
        keep = sorted(random.Random(seed).sample(range(len(self.items)), size))
        return replace(self, items=tuple(self.items[i] for i in keep), size=size, seed=seed)

    def shuffled(self, seed: int) -> "CalibrationSet":
        """The same items in an order drawn by ``seed``: its first ``n`` items are a random subset
        of size ``n``, nested in every longer prefix (the rungs of multi-fidelity search)."""
        order = list(range(len(self.items)))
        random.Random(f"rungs:{seed}").shuffle(order)
        return replace(self, items=tuple(self.items[i] for i in order))

    def render_prompt(self, prompt: str, tokenizer: Any) -> str:
        """The prompt as the model sees it: verbatim, or inside the tokenizer's chat template."""
        if not self.chat_template:
            return prompt
        if getattr(tokenizer, "chat_template", None) is None:
            raise CalibrationError(f"{self.path or self.name}: chat_template=True but the tokenizer has no chat template")
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description; a set loaded from a file is stored by path, others inline."""
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "seed": self.seed,
            "chat_template": self.chat_template,
            "system_prompt": self.system_prompt,
        }
        if self.path is not None:
            out["path"] = self.path
        else:
            out["items"] = [item.to_dict() for item in self.items]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CalibrationSet":
        opts = dict(chat_template=data.get("chat_template", False), system_prompt=data.get("system_prompt"))
        if "path" in data:
            return cls.load(data["path"], name=data["name"], size=data.get("size"), seed=data.get("seed", 0), **opts)
        full = cls.from_items(data["name"], data["items"], **opts)
        return replace(full, size=data.get("size"), seed=data.get("seed", 0))


def _default_name(path: Path) -> str:
    """``data/rev/calib.jsonl`` -> ``rev`` (the zoo layout); ``gsm8k.jsonl`` -> ``gsm8k``."""
    return path.parent.name if path.stem in {"calib", "test", "train", "valid"} else path.stem


def _infer_kind(row: dict[str, Any], where: str) -> SetKind:
    if "text" in row:
        return "perplexity"
    if "choices" in row or "label" in row:
        return "multiple_choice"
    if "prompt" in row or "answer" in row:
        return "generation"
    raise CalibrationError(
        f"{where}: row has none of the expected keys (prompt+answer, prompt+choices+label, or text); got {sorted(row)}"
    )


def _parse_item(row: dict[str, Any], kind: SetKind, where: str) -> CalibrationItem:
    keys = set(row)
    missing = _KEYS[kind] - keys
    if missing:
        raise CalibrationError(f"{where}: {kind} item is missing {', '.join(sorted(missing))}")
    unknown = keys - _KEYS[kind] - {"id", "meta"}
    if unknown:
        raise CalibrationError(f"{where}: unexpected key(s) {', '.join(sorted(unknown))} for a {kind} item")
    for key in _KEYS[kind] - {"choices", "label"}:
        if not isinstance(row[key], str):
            raise CalibrationError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
    for key in _KEYS[kind] - {"choices", "label"}:  # an empty answer scores as a perfect item, an empty prompt asks nothing
        if not row[key].strip():
            raise CalibrationError(f"{where}: {key!r} is empty; give every item its text, or drop the line")
    if kind == "generation":
        return CalibrationItem(prompt=row["prompt"], answer=row["answer"])
    if kind == "perplexity":
        return CalibrationItem(text=row["text"])
    choices, label = row["choices"], row["label"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise CalibrationError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise CalibrationError(f"{where}: 'label' must be an integer index into choices (0..{len(choices) - 1}), got {label!r}")
    return CalibrationItem(prompt=row["prompt"], choices=tuple(choices), label=label)
