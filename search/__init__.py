"""evomerge.search: search spaces, optimizers, the ledger, Pareto archive, run loop and exports.

The public API (the names below, loaded on first use) is described in docs/search.md, the
scale-out in docs/scale-out.md. Layout: the space (`_space`), the optimizers (`_optimizers`, fed
through `_queue` when coordinated), the loop (`_loop`, multi-fidelity rungs in `_fidelity`), the
ledger (`_ledger`, `_journal`), the archive (`_pareto`, `_scalarize`), exports (`_export`), and
scale-out (`scaleout`: heartbeats, stale retries, the coordinator lease).
"""

from __future__ import annotations

from evomerge.merge._lazy import lazy_members

# Loaded on first use (`merge._lazy`): submodule -> the public names it provides.
__getattr__, __all__ = lazy_members(__name__, {
    "._fidelity": ["Fidelity", "full_fidelity"],
    "._export": ["export_results", "export_trial_model", "trial_recipe"],
    "._journal": ["LedgerError"],
    "._ledger": ["MAX_DETAIL_ITEMS", "Ledger", "ObjectiveSpec", "TrialRecord", "read_records", "storage_for"],
    "._loop": ["SearchResult", "run_search"],
    "._optimizers": [
        "METHOD_CHOICE_OPTIMIZERS", "NEVERGRAD_OPTIMIZERS", "OPTUNA_SAMPLERS", "Candidate", "Failure", "GridSearch", "NevergradOptimizer",
        "Optimizer", "OptunaOptimizer", "RandomSearch", "ResumeError", "make_optimizer", "nevergrad_refusal",
    ],
    "._pareto": ["ParetoArchive", "ParetoPoint", "hypervolume", "pareto_mask"],
    "._scalarize": ["Scalarization", "to_losses"],
    "._space": ["DEFAULT_BOUNDS", "METHOD_KINDS", "ParamKind", "SearchSpace", "SpaceTemplate", "kind_of"],
})
