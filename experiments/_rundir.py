"""The run folder's layout and its small state file; the one place that knows where things go.

```
<run>/spec.yaml              the resolved spec (zoo expanded, absolute paths): what resume reads
<run>/state.json             status, current stage, elapsed seconds, budgets, what stopped each stage and the run
<run>/events.jsonl           one JSON event per line: run start, stage start/end, each finished trial, the stop
<run>/ledger.log             the ledger (an Optuna journal file, a study per stage) of a single-process run,
<run>/ledger.db              or SQLite for `run --workers`, unless the spec's `storage` says otherwise
<run>/<stage>.optimizer.json history of a coordinated optimizer (JSON, replayed on resume)
<run>/results/<stage>/       trials and front as CSV + JSON, front.png, hypervolume.png
<run>/comparison.json        held-out scores of the best merges, the experts and the grid baseline
<run>/exports/trial-<N>/     models exported with `evomerge export`
<run>/report.html            the self-contained report
```
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.merge import write_atomic

from ._errors import UserError
from ._spec import ExperimentSpec
from ._spec_io import SpecError, read_yaml, validate_spec


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
    def events_file(self) -> Path:
        return self.path / "events.jsonl"

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

    @property
    def journal_file(self) -> Path:
        return self.path / "ledger.log"

    @property
    def sqlite_file(self) -> Path:
        return self.path / "ledger.db"

    def has_ledger(self, spec: ExperimentSpec) -> bool:
        """Whether the run has a ledger to read (a spec ``storage`` URL always counts)."""
        return bool(spec.storage) or self.journal_file.exists() or self.sqlite_file.exists()

    def storage(self, spec: ExperimentSpec, *, shared: bool = True) -> str:
        """The ledger's storage: the spec's, else the ledger file the run folder already has, else
        a new one: the journal file for a single-process run (``shared=False``: one writer, about
        4 ms per trial at 64 parameters where SQLite costs about 90 ms), SQLite when several
        processes write it (`run --workers`, which needs database heartbeats)."""
        if spec.storage:
            return spec.storage
        sqlite = f"sqlite:///{self.sqlite_file}"
        if self.sqlite_file.exists():
            return sqlite
        if self.journal_file.exists():
            if shared:
                raise UserError(
                    f"{self.path}: this run's ledger is a journal file (a single-process run); several "
                    "workers need a database: start them in a new run folder, or set `storage`"
                )
            return str(self.journal_file)
        return sqlite if shared else str(self.journal_file)

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
            data = read_yaml(self.spec_file, str(self.spec_file))
            # a run folder from before `data_seed` existed drew its calibration subsets with
            # `seed`; resuming it must score the same items
            data.setdefault("data_seed", data.get("seed", 0))
            return validate_spec(data, root=self.spec_file.resolve().parent, label=str(self.spec_file), check_paths=check_paths)
        except SpecError as exc:
            raise UserError(f"{self.path}: the run's spec.yaml no longer validates ({exc})") from None

    def read_state(self) -> dict[str, Any]:
        """state.json (empty before the first write); a damaged one is a one-line `UserError`."""
        return read_json_object(self.state_file, fix="delete it: progress is rebuilt from the ledger") if self.state_file.exists() else {}

    def start_stage(self, stage: str, budget: dict[str, Any], **changes: Any) -> tuple[dict[str, float], float]:
        """Mark ``stage`` running in state.json, with its budget and start time (`status` counts the
        time of a trial still running from it); returns every stage's elapsed seconds so far and this
        stage's (a resumed stage goes on counting from there)."""
        state = self.read_state()
        elapsed = dict(state.get("elapsed", {}))
        before = float(elapsed.get(stage, 0.0))
        self.write_state(status="running", stage=stage, budgets={**state.get("budgets", {}), stage: budget},
                         stage_started=time.time(), stage_elapsed_before=before, **changes)
        return elapsed, before

    def write_state(self, **changes: Any) -> dict[str, Any]:
        """Merge ``changes`` into state.json atomically (a crash never leaves half a file). Not
        fsynced: it is written after every trial, and the ledger, not this file, is the truth."""
        state = {**self.read_state(), **changes, "updated": time.time()}
        write_atomic(self.state_file, json.dumps(state, indent=2) + "\n", durable=False)
        return state


def read_json_object(path: Path, *, fix: str) -> dict[str, Any]:
    """A JSON object a run folder holds (state, comparison), or a one-line `UserError` naming the
    file, what is wrong and ``fix``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds a JSON {type(data).__name__}, not an object; {fix}")
    return data
