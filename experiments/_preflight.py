"""Checks that need more than the spec's schema, run before anything is written.

The spec's pydantic models check each field on its own; these check what the fields point at: the
run folder can be created, the storage URL opens, every stage's optimizer can be constructed with
its options; the scorer's device exists; every objective's calibration and held-out files read
cleanly and hold the kind of set its metric needs; `report_remote_code` names models that ship
code (``auto_map``) once they loaded. Models are checked where they are loaded
(`evomerge.merge.MergeEngine.load`), which also happens before the run folder exists. A failure is
a `UserError` or a `CalibrationError`: one line, exit status 2, and no file or folder created.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ._errors import UserError, first_line
from ._rundir import RunDir
from ._spec import ExperimentSpec

_SQLITE_MAGIC = b"SQLite format 3\x00"
_CONNECT_TIMEOUT_S = 10


def preflight(spec: ExperimentSpec, rd: RunDir) -> None:
    """Every check of this module for ``spec`` run in ``rd`` (a new or an existing run folder)."""
    if rd.exists():
        check_ledger_kept(spec, rd, rd.read_state())  # a corrupt state.json is reported now, not after loading
    else:
        check_run_dir(rd.path)
    if spec.storage:
        check_ledger_location(spec.storage)
    check_optimizers(spec)
    check_device(spec)
    check_backend(spec)
    check_objective_data(spec)
    check_custom_metrics(spec)


# ---------------------------------------------------------------------------------------- run folder


def check_ledger_kept(spec: ExperimentSpec, rd: RunDir, state: dict) -> None:
    """A run folder whose state records finished stages keeps its local ledger: without it a resume would
    start over from no trials and, for a finished run, write an empty comparison and report over
    the results (the ledger, not state.json, is the record of the trials)."""
    if spec.storage or not state.get("stages_done"):
        return
    ledgers = [f for f in (rd.journal_file, rd.sqlite_file) if f.exists()]
    if not ledgers or all(f.stat().st_size == 0 for f in ledgers):
        raise UserError(f"{rd.journal_file}: missing or empty, but {rd.state_file.name} records finished stages; "
                        "restore the ledger from a backup, or start the run again in a new run folder")


def writable_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor of ``path`` is a folder this process may create files in."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} {path}: {parent} is a file, not a folder; pick a path under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: folder {parent} is not writable; pick a writable location")


def check_run_dir(path: Path) -> None:
    """A new run folder: absent or empty, and creatable."""
    if path.exists() and not path.is_dir():
        raise UserError(f"run folder {path} is a file; pick a new folder with --run-dir")
    if path.is_dir():
        if any(path.iterdir()):
            raise UserError(f"run folder {path} holds files but no spec.yaml (not a run folder); pick a new or empty folder with --run-dir")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"run folder {path} is not writable; pick a writable location with --run-dir")
        return
    writable_parent(path, "run folder")


# ------------------------------------------------------------------------------------------- storage


def check_ledger_location(storage: str) -> None:
    """The ledger storage of ``storage`` (a URL or a file path, as `evomerge.search.storage_for`
    reads it) can be opened: files can be created where they go and hold the right format, and a
    database answers a connection. Nothing is created."""
    if storage.startswith("sqlite:///"):
        _check_sqlite(Path(storage[len("sqlite:///"):]), storage)
    elif "://" in storage:
        _check_database(storage)
    elif Path(storage).suffix in (".db", ".sqlite", ".sqlite3"):
        _check_sqlite(Path(storage), storage)
    else:
        path = Path(storage)
        if path.suffix not in (".log", ".journal"):
            if path.exists() and not path.is_dir():
                raise UserError(f"storage: {storage!r} is a file without a .log/.journal suffix; name the journal file ledger.log")
            path = path / "ledger.log"
        _check_file(path, storage, "journal file")
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as f:
                head = f.readline()
            try:
                json.loads(head.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise UserError(f"storage: {path} is not an optuna journal file (first line is not JSON); pick another path") from None


def _check_file(path: Path, storage: str, kind: str) -> None:
    if path.exists() and not path.is_file():
        raise UserError(f"storage: {storage!r}: {path} is not a file; point it at a {kind}")
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise UserError(f"storage: {storage!r}: {path} is not readable and writable; fix its permissions")
        return
    writable_parent(path, "storage")


def _check_sqlite(path: Path, storage: str) -> None:
    _check_file(path, storage, "SQLite database")
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            if f.read(len(_SQLITE_MAGIC)) != _SQLITE_MAGIC:
                raise UserError(f"storage: {path} is not an SQLite database; point storage at a new file or an optuna SQLite ledger")


def _check_database(url: str) -> None:
    import sqlalchemy as sa
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
    from sqlalchemy.pool import NullPool

    try:
        parsed = sa.engine.make_url(url)
    except (ArgumentError, ValueError):
        raise UserError(f"storage: {url!r} is not a database URL; use e.g. sqlite:///ledger.db or postgresql+psycopg2://user@host/db") from None
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    connect_args = {"connect_timeout": _CONNECT_TIMEOUT_S} if backend in ("postgresql", "mysql") else {}
    try:
        engine = sa.create_engine(parsed, poolclass=NullPool, connect_args=connect_args)
    except NoSuchModuleError:
        raise UserError(f"storage: {shown!r}: {parsed.drivername!r} is not a database sqlalchemy knows; use sqlite:/// or postgresql+psycopg2://") from None
    except ImportError as exc:
        raise UserError(f"storage: {shown!r}: its driver is not installed ({exc.name or first_line(exc)}); install it (PostgreSQL: pip install 'evomerge[postgres]')") from None
    except (ArgumentError, TypeError, ValueError) as exc:
        raise UserError(f"storage: {shown!r}: {first_line(exc)}") from None
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        raise UserError(f"storage: cannot connect to {shown} ({first_line(cause)}); check host, port, database, user and that the server runs") from None
    finally:
        engine.dispose()


# ----------------------------------------------------------------------------------------- optimizers


def check_optimizers(spec: ExperimentSpec) -> None:
    """Construct every stage's optimizer with its options (the run constructs them again later)."""
    from evomerge.search import METHOD_CHOICE_OPTIMIZERS, make_optimizer

    for i, stage in enumerate(spec.resolved_stages()):
        opt = stage.optimizer
        assert opt is not None and stage.budget is not None
        own = spec.stages is not None and spec.stages[i].optimizer is not None
        where = f"stages[{i}].optimizer" if own else "optimizer"
        if stage.space is not None and stage.space.methods is not None and opt.factory_name not in METHOD_CHOICE_OPTIMIZERS:
            own_space = spec.stages is not None and spec.stages[i].space is not None
            raise UserError(f"{f'stages[{i}].space' if own_space else 'space'}.methods: {opt.factory_name} searches floats only; "
                            f"use {', '.join(METHOD_CHOICE_OPTIMIZERS)} (or a single space.method)")
        if opt.library == "nevergrad" and opt.name == "NgIohTuned" and stage.budget.evaluations is None:
            raise UserError(f"{where}.name: NgIohTuned picks its algorithm from the evaluation budget; set budget.evaluations")
        try:
            make_optimizer(opt.factory_name, **opt.options)
        except (TypeError, ValueError) as exc:
            raise UserError(
                f"{where}.options: {opt.options!r} is refused by {opt.factory_name} ({first_line(exc)}); "
                "use the keywords its sampler/optimizer documents"
            ) from None


# ------------------------------------------------------------------------------------------- device


def check_device(spec: ExperimentSpec) -> None:
    """``scorer.device`` names a device this torch has (``cpu`` and ``auto`` always do)."""
    device = spec.scorer.device
    if device in ("cpu", "auto"):
        return
    import torch

    if device == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("scorer.device: 'mps' but torch has no MPS (Apple GPU) device here; use cpu or auto")
        return
    if not torch.cuda.is_available():
        raise UserError(f"scorer.device: {device!r} but torch has no CUDA device here; use cpu (or auto)")
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise UserError(f"scorer.device: {device!r} but torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1}); "
                        "use one of those, or cuda")


def check_backend(spec: ExperimentSpec) -> None:
    """``scorer.backend: vllm`` has a vLLM to import and, unless ``scorer.options.allow_cpu``, a GPU:
    found now rather than after the models loaded."""
    if spec.scorer.backend != "vllm":
        return
    from evomerge.objectives import vllm_problem

    problem = vllm_problem(allow_cpu=bool(spec.scorer.options.get("allow_cpu")))
    if problem is not None:
        raise UserError(f"scorer.backend: vllm: {problem}; or use backend: transformers"
                        + (", or scorer.options: {allow_cpu: true} for vLLM's CPU build" if "allow_cpu" in problem else ""))


# ------------------------------------------------------------------------------------ objective data


def check_custom_metrics(spec: ExperimentSpec) -> None:
    """Each ``metric: custom`` objective's ``function`` imports and is callable (it would
    otherwise fail after the models loaded)."""
    from evomerge.objectives import load_custom_metric

    for i, obj in enumerate(spec.objectives):
        if obj.metric == "custom":
            try:
                load_custom_metric(obj.function)
            except ValueError as exc:
                raise UserError(f"objectives[{i}].function: {exc}; give an importable 'package.module:function'") from None



def check_objective_data(spec: ExperimentSpec) -> None:
    """Every objective's ``data`` and ``holdout`` file reads as a calibration set (a broken line is
    a `CalibrationError` naming file and line) of the kind its metric needs, before the models load:
    a held-out set is otherwise first read after the whole search."""
    from evomerge.objectives import METRICS, CalibrationSet

    for i, obj in enumerate(spec.objectives):
        for field in ("data", "holdout"):
            path = getattr(obj, field)
            if path is None:
                continue
            full = CalibrationSet.load(path, name=obj.name)
            if field == "data":
                check_item_count(spec, i, path, len(full.items))
            kind, need = full.kind, (METRICS[obj.metric][0] if obj.metric in METRICS else None)
            if need is None or kind == need:
                continue
            fits = ", ".join(m for m, (k, _) in METRICS.items() if k == kind)
            where = f"objectives[{i}].metric" if field == "data" else f"objectives[{i}].holdout"
            fix = (f"use a metric for {kind} sets ({fits}) or a {need} file" if field == "data"
                   else f"point it at a {need} file like data")
            raise UserError(f"{where}: objective {obj.name!r}: metric {obj.metric!r} needs a {need} set, "
                            f"but {path} is a {kind} set; {fix}")


def check_item_count(spec: ExperimentSpec, index: int, path: str, items: int) -> None:
    """A ``size`` above the calibration file's items scores every item, fewer than the spec says:
    a warning, since the search's noise is that of the smaller set."""
    obj = spec.objectives[index]
    if obj.size is not None and obj.size > items:
        click.echo(f"warning: objectives[{index}].size: objective {obj.name!r} asks for {obj.size} items and "
                   f"{path} has {items}: all {items} are scored", err=True)


# ---------------------------------------------------------------------------------------- remote code


def report_remote_code(spec: ExperimentSpec) -> None:
    """Name every model whose config.json ships code (``auto_map``): it is never run (evomerge has
    no trust_remote_code), the model loads as transformers' built-in class of its model_type."""
    folders = [spec.models.base, *spec.models.experts.values()]
    for folder in folders:
        if folder is None:
            continue
        config = Path(folder) / "config.json"
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a missing or broken config is reported where the model is loaded
        if isinstance(data, dict) and data.get("auto_map"):
            names = ", ".join(sorted(map(str, data["auto_map"]))) if isinstance(data["auto_map"], dict) else "?"
            click.echo(
                f"evomerge: note: {config} has auto_map ({names}): code shipped with the model is never run; "
                f"it loads as transformers' built-in model_type {data.get('model_type')!r}",
                err=True,
            )
