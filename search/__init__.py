"""evomerge.search: search spaces, optimizers, the ledger, Pareto archive, run loop and exports.

Public API::

    SpaceTemplate(method, params=None, bounds={}, init={}, fixed={}, granularity="global",
                  modules="all", sections="attach", smoothing=None, normalize=True, lambda_=1.0,
                  rescale="mergekit", lora_mode="materialized")
    SearchSpace(layout, experts, template)  # .dim .names .bounds .x0 .decode(x, *, seed, trial) .encode(recipe)
    Scalarization(kind="weighted_sum"|"chebyshev", weights=None, ideal=None, rho=1e-3)
    Ledger(storage, *, objectives, study_name="evomerge", seed=0, scalarization=None,
           reference_point=None, space=None)
    run_worker(space, scorer, optimizer, ledger, *, budget_evals, worker_id, ...) -> WorkerResult  # docs/scale-out.md
    ParetoArchive(directions, reference_point=None)  # .add(number, values, *, feasible) .front .hypervolume() .history
    make_optimizer("nevergrad:CMA" | "optuna:tpe" | "random" | "grid", **kwargs) -> Optimizer
    NevergradOptimizer(optimizer="CMA"), OptunaOptimizer(sampler="tpe", **kw), RandomSearch(), GridSearch(...)
    run_search(space, scorer, optimizer, ledger, *, budget_evals=None, budget_seconds=None,
               batch_size=1, constraints=None, callbacks=(), progress=True) -> SearchResult
    export_results(ledger, out_dir) -> {name: path}   # trials/front as CSV + JSON
    plot_run(ledger, out_dir) -> {name: path}         # front.png, hypervolume.png
    export_trial_model(ledger, engine, number, out_dir) -> Path
"""

from ._export import export_results, export_trial_model, trial_recipe
from ._ledger import MAX_DETAIL_ITEMS, Ledger, ObjectiveSpec, resolve_storage
from ._loop import SearchResult, TrialRecord, run_search
from ._optimizers import (
    NEVERGRAD_OPTIMIZERS,
    OPTUNA_SAMPLERS,
    Candidate,
    Failure,
    GridSearch,
    NevergradOptimizer,
    Optimizer,
    OptunaOptimizer,
    RandomSearch,
    ResumeError,
    make_optimizer,
)
from ._plots import plot_front, plot_hypervolume, plot_run
from ._pareto import ParetoArchive, ParetoPoint, hypervolume, pareto_mask
from ._scalarize import Scalarization, to_losses
from ._workers import WorkerResult, run_worker
from ._space import DEFAULT_BOUNDS, METHOD_KINDS, ParamKind, SearchSpace, SpaceTemplate

__all__ = [
    "Candidate",
    "DEFAULT_BOUNDS",
    "Failure",
    "GridSearch",
    "Ledger",
    "MAX_DETAIL_ITEMS",
    "METHOD_KINDS",
    "NEVERGRAD_OPTIMIZERS",
    "NevergradOptimizer",
    "OPTUNA_SAMPLERS",
    "ObjectiveSpec",
    "Optimizer",
    "OptunaOptimizer",
    "ParetoArchive",
    "ParamKind",
    "ParetoPoint",
    "RandomSearch",
    "ResumeError",
    "Scalarization",
    "SearchResult",
    "SearchSpace",
    "SpaceTemplate",
    "TrialRecord",
    "WorkerResult",
    "export_results",
    "export_trial_model",
    "hypervolume",
    "make_optimizer",
    "pareto_mask",
    "plot_front",
    "plot_hypervolume",
    "plot_run",
    "resolve_storage",
    "run_search",
    "run_worker",
    "to_losses",
    "trial_recipe",
]
