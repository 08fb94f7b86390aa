"""Reading specs from YAML, finding presets, and turning validation failures into one-line errors.

A user who mistypes one key in an overnight spec should see exactly which field, which value and
what is allowed, on one line, before anything is loaded or written. Pydantic's multi-line reports
are converted here; the CLI prints the message and exits with status 2.
"""

from __future__ import annotations

import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ._spec import ExperimentSpec


class SpecError(ValueError):
    """A spec is unusable; the message is one line per problem: ``<file>: <field>: <problem>``."""


# ------------------------------------------------------------------------------------------------ YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML would silently let the last one win."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def read_yaml(path: Path, label: str) -> dict[str, Any]:
    """The YAML mapping in ``path``; syntax errors become one-line `SpecError`s with the line number."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{label}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise SpecError(f"{label}:{line}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); save the spec as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{label}{where}: invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{label}: expected a mapping of sections (name, models, space, ...), got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------- specs


def load_spec(path: str | Path, *, label: str | None = None, check_paths: bool = True) -> ExperimentSpec:
    """Validate the spec in ``path``; relative paths resolve against its folder.

    Raises `SpecError` (one line) for unreadable files, bad YAML and invalid fields.
    """
    path = Path(path)
    label = label or str(path)
    data = read_yaml(path, label)
    return validate_spec(data, root=path.resolve().parent, label=label, check_paths=check_paths)


def validate_spec(data: dict[str, Any], *, root: Path, label: str, check_paths: bool = True) -> ExperimentSpec:
    """Validate an already parsed spec mapping (see `load_spec`)."""
    try:
        return ExperimentSpec.model_validate(data, context={"root": root, "check_paths": check_paths})
    except ValidationError as exc:
        raise SpecError("\n".join(f"{label}: {problem}" for problem in validation_problems(exc))) from None


def dump_spec(spec: ExperimentSpec, path: Path) -> None:
    """Write ``spec`` as YAML (absolute paths), the run folder's record of what was run (atomically:
    a run folder whose spec.yaml exists is a run folder, so it must never be half written)."""
    from evomerge.merge import write_atomic

    data = spec.model_dump(mode="json", by_alias=True, exclude_defaults=False)
    write_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


# --------------------------------------------------------------------------------------------- presets


def presets_dir() -> Path:
    """The folder of shipped presets (package data ``evomerge/experiments/configs``)."""
    return Path(str(resources.files("evomerge.experiments") / "configs"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name``; an unknown name lists the presets."""
    path = presets_dir() / f"{name}.yaml"
    if not path.is_file():
        raise SpecError(f"--preset: {name!r} is not one of {', '.join(preset_names())}")
    return path


# -------------------------------------------------------------------------------------- error messages

# Pydantic puts union members and validator wrappers into error locations
# (e.g. "function-before[...]", "list[literal[...]]", "bool"); they mean nothing to a spec author.
_TYPE_TAG = re.compile(
    r"^(bool|int|float|str|none|list\[.*|dict\[.*|tuple\[.*|set\[.*|literal\[.*|union\[.*|function-.*|"
    r"json-or-python\[.*|lax-or-strict\[.*|chain\[.*|constrained-.*)$"
)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif not _TYPE_TAG.match(str(part)):
            parts.append(("." if parts else "") + str(part))
    return "".join(parts) or "spec"


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X | None``, ``list[X]`` or ``dict[str, X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap_model(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, dict, tuple):
        for arg in typing.get_args(annotation):
            found = _unwrap_model(arg)
            if found is not None:
                return found
    return None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The spec section (model class) that holds the field at ``loc``."""
    model: type[BaseModel] | None = ExperimentSpec
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int) or part not in model.model_fields:
            continue
        model = _unwrap_model(model.model_fields[part].annotation)
    return model


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    where = _field_path(loc)
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = f"; allowed: {', '.join(_allowed_keys(parent))}" if parent else ""
        return f"{where}: unknown key{allowed}"
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", ""))) or [str(ctx.get("expected"))]
        return f"{where}: {_short(value)} is not one of {', '.join(options)}"
    if kind in ("value_error", "assertion_error"):
        return f"{where}: {str(ctx.get('error', err['msg']))}"
    return f"{where}: {_short(value)}: {err['msg'][0].lower()}{err['msg'][1:]}"


def _alternative(err: dict[str, Any]) -> str:
    """What one member of a union accepts, phrased to follow "is not"."""
    if err["type"] == "literal_error":
        options = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
        return f"one of {', '.join(options)}"
    msg = err["msg"]
    return msg[len("Input should be "):] if msg.startswith("Input should be ") else msg


def validation_problems(exc: ValidationError) -> list[str]:
    """One line per field with a problem, in spec order: field, bad value, what is allowed.

    All of them at once, so a spec is fixed in one edit rather than one run per typo. A union
    field (e.g. granularity: a name or an integer) reports one error per member; they are folded
    into one "is not A or B" sentence.
    """
    by_field: dict[str, list[dict[str, Any]]] = {}
    for err in exc.errors(include_url=False):
        by_field.setdefault(_field_path(tuple(err["loc"])), []).append(err)
    problems = []
    for where, same in by_field.items():
        if len(same) > 1 and all(e["type"] not in ("value_error", "extra_forbidden", "missing") for e in same):
            problems.append(f"{where}: {_short(same[0].get('input'))} is not {' or '.join(_alternative(e) for e in same)}")
        else:
            problems.append(_describe(same[0]))
    return problems
