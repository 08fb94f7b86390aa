"""Lazy package members (PEP 562), so that a command that only reads a spec or a run folder does
not pay for importing torch, transformers and optuna it never calls (a CLI error answers in a
fraction of a second instead of seconds)."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence


def lazy_members(package: str, members: Mapping[str, Sequence[str]]) -> tuple[Callable[[str], Any], list[str]]:
    """(``__getattr__``, ``__all__``) of ``package``, whose public names live in its submodules:
    ``members`` maps a submodule (relative, e.g. ``"._engine"``) to the names it provides; each is
    imported on first access."""
    homes = {name: module for module, names in members.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(homes[name], package), name)

    return __getattr__, sorted(homes)
