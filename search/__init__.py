"""evomerge.search: search spaces, optimizers, the ledger, Pareto archive, run loop and exports.

Public API::

    SpaceTemplate(method, methods=None, params=None, bounds={}, init={}, fixed={}, granularity="global",
                  modules="all", sections="attach", smoothing=None, normalize=True, lambda_=1.0,
                  rescale="mergekit", lora_mode="materialized")
    SearchSpace(layout, experts, template)  # .dim .names .bounds .x0 .decode(x, *, seed, trial) .encode(recipe)
                                            # method choice: .categorical .methods .sub(m) .start_params() .decode_params(params, *, seed, trial)
    Scalarization(kind="weighted_sum"|"chebyshev", weights=None, ideal=None, rho=1e-3)
    Ledger(storage, *, objectives, study_name="evomerge", seed=0, scalarization=None,
           reference_point=None, space=None, heartbeat=None)  # .records() -> [TrialRecord]
    ParetoArchive(directions, reference_point=None)  # .add(number, values, *, feasible) .front .hypervolume() .history
    make_optimizer("nevergrad:CMA" | "optuna:tpe" | "random" | "grid", **kwargs) -> Optimizer
    NevergradOptimizer(optimizer="CMA"), OptunaOptimizer(sampler="tpe", **kw), RandomSearch(), GridSearch(...)
    run_search(space, scorer, optimizer, ledger, *, budget_evals=None, budget_seconds=None,
               constraints=None, callbacks=(), progress=True,
               worker_id=None, queue=4, lease_ttl=10.0, poll=0.2, fidelity=None, budget_items=None)
               -> SearchResult  # one process, or a worker
    Fidelity(rungs, eta, score)  # successive halving over calibration items (`_fidelity`)
    export_results(ledger, out_dir) -> {name: path}   # trials/front as CSV + JSON
    export_trial_model(ledger, engine, number, out_dir) -> Path

Layout: the space (`_space`), the optimizers (`_optimizers`, fed through `_queue` when coordinated),
the loop (`_loop`, multi-fidelity rungs in `_fidelity`), the ledger (`_ledger`, `_journal`), the archive (`_pareto`, `_scalarize`),
exports (`_export`), and scale-out (`scaleout`: heartbeats, stale retries, the coordinator lease).
"""

from __future__ import annotations

from evomerge.merge._lazy import lazy_members

# Loaded on first use (`merge._lazy`): submodule -> the public names it provides.
__getattr__, __all__ = lazy_members(__name__, {
    "._fidelity": ["Fidelity", "full_fidelity"],
    "._export": ["export_results", "export_trial_model", "trial_recipe"],
    "._ledger": ["MAX_DETAIL_ITEMS", "Ledger", "ObjectiveSpec", "TrialRecord", "read_records", "storage_for"],
    "._loop": ["SearchResult", "run_search"],
    "._optimizers": [
        "METHOD_CHOICE_OPTIMIZERS", "NEVERGRAD_OPTIMIZERS", "OPTUNA_SAMPLERS", "Candidate", "Failure", "GridSearch", "NevergradOptimizer",
        "Optimizer", "OptunaOptimizer", "RandomSearch", "ResumeError", "make_optimizer", "nevergrad_refusal",
    ],
    "._pareto": ["ParetoArchive", "ParetoPoint", "hypervolume", "pareto_mask"],
    "._scalarize": ["Scalarization", "to_losses"],
    "._space": ["DEFAULT_BOUNDS", "METHOD_KINDS", "ParamKind", "SearchSpace", "SpaceTemplate"],
})
