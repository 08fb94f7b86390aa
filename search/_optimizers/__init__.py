"""Optimizer adapters behind one interface: optuna samplers (native on the ledger's study),
nevergrad optimizers and the baselines (behind a checkpointing coordinator)."""

from __future__ import annotations

from typing import Any

from ._base import Candidate, Failure, Optimizer, Result
from ._baselines import GridSearch, RandomSearch
from ._coordinator import CoordinatedOptimizer, ResumeError
from ._nevergrad import NEVERGRAD_OPTIMIZERS, NevergradOptimizer, nevergrad_refusal
from ._optuna import CATEGORICAL, OPTUNA_SAMPLERS, OptunaOptimizer

METHOD_CHOICE_OPTIMIZERS: tuple[str, ...] = (*(f"optuna:{s}" for s in CATEGORICAL), "random")
"""The `make_optimizer` specs that draw a method choice (`SpaceTemplate.methods`): optuna samplers
that model categorical, conditional params define-by-run, and the random baseline. The others
search floats only and refuse such a space in ``bind``."""


def make_optimizer(spec: str, **kwargs: Any) -> Optimizer:
    """An optimizer from a short spec: ``nevergrad:<Class>`` (or ``ng:<Class>``),
    ``optuna:<sampler>``, ``random`` or ``grid``; ``kwargs`` go to its constructor."""
    family, _, name = spec.partition(":")
    if family in ("nevergrad", "ng") and name:
        return NevergradOptimizer(name, **kwargs)
    if family == "optuna" and name:
        return OptunaOptimizer(name, **kwargs)
    if spec == "random":
        return RandomSearch(**kwargs)
    if spec == "grid":
        return GridSearch(**kwargs)
    raise ValueError(
        f"unknown optimizer {spec!r}; expected nevergrad:<{'|'.join(NEVERGRAD_OPTIMIZERS)}>, "
        f"optuna:<{'|'.join(OPTUNA_SAMPLERS)}>, random or grid"
    )


__all__ = [
    "Candidate", "CoordinatedOptimizer", "Failure", "GridSearch", "METHOD_CHOICE_OPTIMIZERS", "NEVERGRAD_OPTIMIZERS",
    "NevergradOptimizer", "OPTUNA_SAMPLERS", "Optimizer", "OptunaOptimizer", "RandomSearch", "ResumeError", "Result",
    "make_optimizer", "nevergrad_refusal",
]
