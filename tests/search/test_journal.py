"""The journal ledger's file discipline: a writer cuts a torn last line before appending, a reader
leaves the file as it found it, a damaged line is one error naming file and line, and reopening a
study (a resume) appends nothing and refuses a study recorded for another search."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from evomerge.search import Ledger, LedgerError, ObjectiveSpec, storage_for

OBJECTIVES = [ObjectiveSpec("loss", "minimize"), ObjectiveSpec("kept", "minimize")]


def _ledger_with_a_trial(folder: Path, space: dict | None = None) -> Path:
    ledger = Ledger(folder, objectives=OBJECTIVES, study_name="search", space=space)
    trial = ledger.study.ask()
    ledger.study.tell(trial, [1.0, 0.5])
    return folder / "ledger.log"


def _trials(path: Path, *, read_only: bool) -> list[optuna.trial.FrozenTrial]:
    storage, _ = storage_for(path, read_only=read_only)
    return optuna.load_study(study_name="search", storage=storage).get_trials()


def test_a_reader_leaves_a_torn_last_line_and_reads_up_to_it(tmp_path: Path) -> None:
    path = _ledger_with_a_trial(tmp_path)
    torn = path.read_bytes() + b'{"op_code": 5, "worker_id": "x", "tri'
    path.write_bytes(torn)
    assert [t.values for t in _trials(path, read_only=True)] == [[1.0, 0.5]]
    assert path.read_bytes() == torn


def test_a_writer_cuts_a_torn_last_line_before_it_appends(tmp_path: Path) -> None:
    path = _ledger_with_a_trial(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code": 5, "worker_id": "x", "tri')
    ledger = Ledger(tmp_path, objectives=OBJECTIVES, study_name="search")
    assert path.read_bytes() == whole  # cut, and reopening the study appended nothing
    ledger.study.tell(ledger.study.ask(), [2.0, 0.25])
    assert [t.values for t in _trials(path, read_only=False)] == [[1.0, 0.5], [2.0, 0.25]]


def test_a_damaged_line_names_the_file_and_line(tmp_path: Path) -> None:
    path = _ledger_with_a_trial(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    lines.insert(2, b"garbage{not json\n")
    path.write_bytes(b"".join(lines))
    for read_only in (True, False):
        with pytest.raises(LedgerError, match=rf"{path}: line 3 is not a journal record"):
            _trials(path, read_only=read_only)


def test_a_reader_of_a_missing_ledger_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        storage_for(tmp_path / "run" / "ledger.log", read_only=True)
    assert not (tmp_path / "run").exists()


def test_a_study_recorded_for_another_space_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    path = _ledger_with_a_trial(tmp_path, space={"fingerprint": "aaaa"})
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="space_fingerprint 'aaaa', the spec now gives 'bbbb'"):
        Ledger(tmp_path, objectives=OBJECTIVES, study_name="search", space={"fingerprint": "bbbb"})
    assert path.read_bytes() == before
