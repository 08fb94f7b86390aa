"""optuna samplers, running natively on the ledger's study.

The sampler is the study's sampler and the run loop claims trials with ``study.ask``, so optuna
sees every trial as in any optuna program, and resume is reopening the study. The sampler's random
state is not persisted: a resumed run reseeds it with the run seed plus the finished trials
(deterministic for a given interruption point); workers sharing a study seed their samplers apart.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import FloatDistribution

from ._base import Optimizer, genome_distributions, method_distributions

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.trial import Trial

    from .._ledger import Ledger
    from .._space import SearchSpace

_SAMPLER_CLASSES = {
    "tpe": "TPESampler", "cmaes": "CmaEsSampler", "nsga2": "NSGAIISampler", "nsga3": "NSGAIIISampler",
    "gp": "GPSampler", "qmc": "QMCSampler", "random": "RandomSampler",
}
"""Short name -> class in ``optuna.samplers``."""
OPTUNA_SAMPLERS = tuple(_SAMPLER_CLASSES)
SINGLE_OBJECTIVE = ("cmaes",)
"""Samplers that need one value: use them with a `Scalarization` when there are several objectives."""
CATEGORICAL = ("tpe", "nsga2", "nsga3", "random")
"""Samplers that model a categorical, conditional search space (a method choice, `SearchSpace.categorical`);
the others fall back to independent random draws for it, so they are refused one."""


def _make_sampler(kind: str, seed: int, kwargs: dict[str, Any], *, workers: bool, conditional: bool = False) -> optuna.samplers.BaseSampler:
    """The sampler ``kind`` (constraints reach it through ``Trial.set_constraint``, which the ledger sets)."""
    if kind == "tpe":
        # Workers (a shared database): constant_liar spreads concurrent proposals, and multivariate
        # reads the study once per trial instead of once per parameter (docs/scale-out.md#overhead);
        # ``group`` draws a method choice's conditional parameters jointly, as optuna advises. One
        # process keeps optuna's defaults. The user's options override.
        kwargs = {"constant_liar": workers, "multivariate": workers, "group": workers and conditional, **kwargs}
    with warnings.catch_warnings():
        # NSGA-III and QMC are "experimental" in optuna's API sense; the user chose them by name
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return getattr(optuna.samplers, _SAMPLER_CLASSES[kind])(seed=seed, **kwargs)


class OptunaOptimizer(Optimizer):
    """An optuna sampler by short name: tpe, cmaes, nsga2, nsga3, gp, qmc, random."""

    def __init__(self, sampler: str = "tpe", **sampler_kwargs: Any) -> None:
        if sampler not in OPTUNA_SAMPLERS:
            raise ValueError(f"unknown optuna sampler {sampler!r}; expected one of {', '.join(OPTUNA_SAMPLERS)}")
        _make_sampler(sampler, 0, sampler_kwargs, workers=False)  # unknown or invalid options fail here, before a run starts
        self.sampler = sampler
        self.sampler_kwargs = sampler_kwargs
        self.name = f"optuna:{sampler}"

    def bind(
        self, space: "SearchSpace", ledger: "Ledger", *, budget: int | None = None, batch_size: int = 1, seed_offset: int = 0,
    ) -> None:
        """Make this sampler the study's; ``seed_offset``: workers sharing a study set their own,
        or samplers with one seed and one history would propose the same points."""
        if space.categorical and self.sampler not in CATEGORICAL:
            raise ValueError(f"optuna sampler {self.sampler!r} searches floats only; a method choice needs one of {', '.join(CATEGORICAL)}")
        if self.sampler in SINGLE_OBJECTIVE and len(ledger.study.directions) > 1:
            raise ValueError(f"optuna sampler {self.sampler!r} is single-objective; give the run a Scalarization")
        seed = ledger.seed + seed_offset + len(ledger.finished())
        ledger.study.sampler = _make_sampler(self.sampler, seed, self.sampler_kwargs, workers=ledger.heartbeat is not None,
                                             conditional=space.categorical)

    def ask_distributions(self, space: "SearchSpace") -> dict[str, "BaseDistribution"]:
        """The genome; none under a method choice, whose trials are drawn define-by-run (`suggest`)."""
        return {} if space.categorical else genome_distributions(space)

    def suggest(self, space: "SearchSpace", trial: "Trial") -> None:
        """Under a method choice, define-by-run: ``method`` first, then only that method's
        parameters, so a sampler never sees (nor models) a parameter the chosen method ignores."""
        if not space.categorical:
            return
        for name, distribution in method_distributions(space, str(trial.suggest_categorical("method", space.methods))).items():
            if isinstance(distribution, FloatDistribution):
                trial.suggest_float(name, distribution.low, distribution.high)
