"""nevergrad optimizers behind the coordinator.

Classes are named explicitly: with one worker the ``NGOpt`` family picks Cobyla, which runs scipy
in a thread, so its asks are no function of the told history and a resume could not replay them
(`CoordinatedOptimizer`). Several losses are told as a list (nevergrad's multi-objective mode).
Only candidates this optimizer asked are told (DE and TwoPointsDE in multi-objective mode crash on
others); a failure is told as an infinite loss to one objective and not at all to several (a
penalty vector would distort nevergrad's hypervolume bounds). Start point and step size:
docs/search.md ("Optimizers").
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from ._base import genome_distributions
from ._coordinator import CheckpointStore, CoordinatedOptimizer, Proposal

if TYPE_CHECKING:
    from .._space import SearchSpace

NEVERGRAD_OPTIMIZERS = ("CMA", "DE", "TwoPointsDE", "PSO", "OnePlusOne", "NgIohTuned", "RandomSearch")
"""Tested here (ask/tell, pickling, determinism); any other explicit registry name is accepted."""

_AUTO_SELECTING = ("NGOpt", "NgIoh", "Shiwa", "NGO")
"""Prefixes of meta-optimizers that choose an algorithm themselves (NgIohTuned is allowed: its
choice is made at construction through ``enable_pickling``, a deterministic function of the budget)."""


def nevergrad_refusal(optimizer: str) -> str | None:
    """Why ``optimizer`` cannot drive a search (None when it can): the one rule for the spec's
    check and the optimizer's constructor."""
    if optimizer in NEVERGRAD_OPTIMIZERS:
        return None  # registry classes that choose nothing themselves: no 1.3 s import to check a spec
    import nevergrad as ng

    if optimizer not in ng.optimizers.registry:
        return f"{optimizer!r} is not one of {', '.join(NEVERGRAD_OPTIMIZERS)} (or another explicit nevergrad class)"
    if optimizer != "NgIohTuned" and optimizer.startswith(_AUTO_SELECTING):
        return (f"{optimizer!r} picks its algorithm itself (with one worker: Cobyla, which a resume cannot "
                f"replay); use NgIohTuned (its tuned successor) or name a class such as {', '.join(NEVERGRAD_OPTIMIZERS[:5])}")
    return None


class NevergradOptimizer(CoordinatedOptimizer):
    """A nevergrad optimizer by registry name, e.g. ``NevergradOptimizer("TwoPointsDE")``."""

    def __init__(self, optimizer: str = "CMA", *, checkpoint: str | os.PathLike[str] | CheckpointStore | None = None) -> None:
        refusal = nevergrad_refusal(optimizer)
        if refusal is not None:
            raise ValueError(refusal)
        super().__init__(checkpoint=checkpoint)
        self.optimizer = optimizer
        self.name = f"nevergrad:{optimizer}"

    def _start(self, space: "SearchSpace", seed: int, budget: int | None, batch_size: int) -> Any:
        if self.optimizer == "NgIohTuned" and budget is None:
            raise ValueError("NgIohTuned chooses its algorithm from the budget; give budget_evals")
        opt = self._fresh(space, seed, budget, batch_size)
        # The first candidate is exactly x0 for every class (nevergrad's public `suggest`), unless
        # the class asks it first by itself (OnePlusOne), which a twin of the same seed tells: a
        # function of the seed alone, so a resume's replay makes the same choice.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            natural = np.asarray(self._fresh(space, seed, budget, batch_size).ask().value, dtype=float)
        if not np.array_equal(natural, space.x0):
            opt.suggest(space.x0)
        inner = getattr(opt, "optim", opt)  # the class a CMA meta-optimizer picked
        if hasattr(type(inner), "es"):
            # CMA builds its strategy (and imports ``cma``, ~20 ms) on the first ask: here, at bind,
            # it stays out of the trials; it draws no random numbers, so the asks are the same.
            inner.es  # noqa: B018
        return opt

    def _fresh(self, space: "SearchSpace", seed: int, budget: int | None, batch_size: int) -> Any:
        """A new backend of this class on the space's box, seeded, starting at ``space.x0``."""
        import nevergrad as ng

        low, high, x0 = *space.bounds, space.x0
        sigma = (high - low) / 6  # every coordinate at the same relative scale; x0 +- 3 sigma spans the box
        if self.optimizer == "CMA":
            # nevergrad's CMA shrinks that step 3-7 fold on a bounded parametrization (issue 16):
            # plain CMA-ES on the unbounded array, with pycma's own `bounds` (in (x - x0) / sigma)
            param = ng.p.Array(init=x0).set_mutation(sigma=sigma)
            cls = ng.families.ParametrizedCMA(inopts={"bounds": [list((low - x0) / sigma), list((high - x0) / sigma)]})
        else:
            param = ng.p.Array(init=x0, lower=low, upper=high).set_mutation(sigma=sigma)
            cls = ng.optimizers.registry[self.optimizer]
        param.random_state = np.random.RandomState(seed)
        opt = cls(parametrization=param, budget=budget, num_workers=batch_size)
        opt.enable_pickling()  # meta-optimizers pick their inner class now, not at the first ask
        return opt

    def _propose(self, space: "SearchSpace") -> tuple[Any, Proposal]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # budget / worker-count notices, once per ask otherwise
            cand = self._backend.ask()
        low, high = space.bounds
        x = np.clip(np.asarray(cand.value, dtype=float), low, high)  # pycma's bounds, to the last bit
        return cand, Proposal(params=space.describe(x), distributions=genome_distributions(space), x=x)

    def _observe(self, token: Any, losses: np.ndarray | None) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if losses is None:
                if self._backend.num_objectives <= 1:
                    self._backend.tell(token, float("inf"))
                return
            self._backend.tell(token, float(losses[0]) if len(losses) == 1 else [float(v) for v in losses])
