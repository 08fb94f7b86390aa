"""The zoo manifest: reading it back and rendering its accuracy table.

The manifest is the contract with the rest of the project (paths relative to the zoo
directory, accuracies keyed by model name), so reading and formatting live apart from the
builder that writes it.
"""
from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "manifest.json"


def load_manifest(zoo_dir: str | Path) -> dict:
    """The parsed ``manifest.json`` of a built zoo (raises FileNotFoundError if not built)."""
    return json.loads((Path(zoo_dir) / MANIFEST).read_text(encoding="utf-8"))


def write_manifest(zoo_dir: Path, manifest: dict) -> None:
    (Path(zoo_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def format_accuracy_table(manifest: dict, models: list[str] | None = None) -> str:
    """Exact-match accuracy (percent) of every model (rows) on every skill (columns).

    Rows follow manifest order: base, experts, LoRA experts, merges, then pool adapters.
    """
    skills: list[str] = list(manifest["skills"])
    acc: dict[str, dict[str, float]] = manifest["accuracy"]
    names = list(acc) if models is None else models
    width = max([len("model")] + [len(n) for n in names])
    cols = [max(6, len(s)) for s in skills]
    head = "model".ljust(width) + "".join(f"  {s:>{c}}" for s, c in zip(skills, cols)) + "    mean"
    lines = [head, "-" * len(head)]
    for n in names:
        row = acc[n]
        vals = [row.get(s) for s in skills]
        cells = "".join(f"  {('-' if v is None else f'{100 * v:.1f}'):>{c}}" for v, c in zip(vals, cols))
        known = [v for v in vals if v is not None]
        mean = f"{100 * sum(known) / len(known):.1f}" if known else "-"
        lines.append(n.ljust(width) + cells + f"  {mean:>6}")
    return "\n".join(lines)
