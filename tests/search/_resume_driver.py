"""Driver for the SIGKILL resume test: runs (or resumes) one tiny-zoo search in a run folder.

    python tests/search/_resume_driver.py RUN_DIR ZOO --optimizer nevergrad:CMA --budget 30

Prints ``ready`` once the scorer is loaded (the test starts its kill timer then) and ``done N``
when the budget is reached.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evomerge.search import Ledger, SearchResult, make_optimizer, run_search

if __package__:
    from ._problem import build_problem
else:  # run as a script by the test's subprocess
    sys.path.insert(0, str(Path(__file__).parent))
    from _problem import build_problem


def drive(run_dir: Path, zoo: Path, optimizer: str, budget: int, *, seed: int = 0) -> SearchResult:
    """Run or resume the search in ``run_dir`` (the test also calls this in-process)."""
    _, scorer, space = build_problem(zoo)
    ledger = Ledger(run_dir, objectives=scorer.objectives, seed=seed, space=space.to_dict())
    print("ready", flush=True)
    return run_search(space, scorer, make_optimizer(optimizer), ledger, budget_evals=budget, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("zoo", type=Path)
    parser.add_argument("--optimizer", default="nevergrad:CMA")
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = drive(args.run_dir, args.zoo, args.optimizer, args.budget, seed=args.seed)
    print("done", result.n_finished, result.stopped_by, flush=True)


if __name__ == "__main__":
    main()
