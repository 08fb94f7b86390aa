"""The run folder's layout and its small state file; the one place that knows where things go.

```
<run>/spec.yaml              the resolved spec (zoo expanded, absolute paths): what resume reads
<run>/state.json             status, current stage, elapsed seconds, budget, exit reason
<run>/ledger.db              the ledger (an Optuna study per stage) unless `storage` says otherwise
<run>/<stage>.optimizer.pkl  checkpoint of a coordinated optimizer (nevergrad, baselines)
<run>/results/<stage>/       trials and front as CSV + JSON, front.png, hypervolume.png
<run>/comparison.json        held-out scores of the best merges, the experts and the grid baseline
<run>/exports/trial-<N>/     models exported with `evomerge export`
<run>/report.html            the self-contained report
```
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import UserError
from ._spec import ExperimentSpec
from ._spec_io import SpecError, load_spec


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def spec_file(self) -> Path:
        return self.path / "spec.yaml"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def comparison_file(self) -> Path:
        return self.path / "comparison.json"

    @property
    def report_file(self) -> Path:
        return self.path / "report.html"

    def results_dir(self, stage: str) -> Path:
        return self.path / "results" / stage

    def export_dir(self, trial: int) -> Path:
        return self.path / "exports" / f"trial-{trial}"

    def storage(self, spec: ExperimentSpec) -> str:
        """The ledger's storage URL: the spec's, else SQLite inside the run folder."""
        return spec.storage or f"sqlite:///{self.path / 'ledger.db'}"

    def exists(self) -> bool:
        return self.spec_file.is_file()

    def load_spec(self, *, check_paths: bool = True) -> ExperimentSpec:
        """The resolved spec of an existing run (a missing or foreign folder is a one-line error).

        Reading results (status, front, report) passes ``check_paths=False``: a run copied off the
        GPU box, or whose models moved, must stay inspectable.
        """
        if not self.exists():
            raise UserError(f"{self.path}: not a run folder (no spec.yaml); start one with `evomerge run SPEC`")
        try:
            return load_spec(self.spec_file, check_paths=check_paths)
        except SpecError as exc:
            raise UserError(f"{self.path}: the run's spec.yaml no longer validates ({exc})") from None

    def read_state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text(encoding="utf-8")) if self.state_file.exists() else {}

    def write_state(self, **changes: Any) -> dict[str, Any]:
        """Merge ``changes`` into state.json atomically (a crash never leaves half a file)."""
        state = {**self.read_state(), **changes, "updated": time.time()}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.state_file)
        return state
