"""Turn a spec's symbolic references (the toy zoo, LoRA pool folders, Hugging Face ids) into concrete paths.

The run folder keeps the *resolved* spec, so a run can be resumed, audited or reproduced without
knowing which zoo, pool or hub revision it came from: every model and data path in it is absolute
(a hub id becomes its cache snapshot folder, whose name is the commit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._hub import ModelIdError, parse_model_id, resolve_model_id
from ._spec import ZOO_PREFIX, ExperimentSpec, ZooRef
from ._spec_io import SpecError, validate_spec


def zoo_dir(ref: ZooRef, *, progress: bool = True) -> Path:
    """The zoo a spec refers to, built on first use (cached afterwards)."""
    from evomerge.experiments.zoo import build_zoo

    return build_zoo(ref.size, seed=ref.seed, arch=ref.arch, out=ref.path, progress=progress)


def _zoo_models(zoo: Path, ref: ZooRef) -> dict[str, Any]:
    from evomerge.experiments.zoo import load_manifest

    manifest = load_manifest(zoo)
    if ref.experts == "pool":
        experts = {entry["name"]: str(zoo / entry["path"]) for entry in manifest["pool"]}
    else:
        table = manifest["experts" if ref.experts == "full" else "lora_experts"]
        experts = {name: str(zoo / rel) for name, rel in table.items()}
    return {"base": str(zoo / manifest["base"]), "experts": experts}


def pool_adapters(pool: Path) -> dict[str, str]:
    """Adapters of a LoRA pool folder: every subfolder holding an ``adapter_config.json``."""
    found = {p.parent.name: str(p.parent) for p in sorted(pool.glob("*/adapter_config.json"))}
    if not found:
        raise SpecError(f"models.pool: {str(pool)!r} holds no LoRA adapters (subfolders with adapter_config.json)")
    return found


def _unzoo(value: Any, zoo: Path) -> Any:
    """Replace every ``zoo:rel/path`` string inside a spec mapping by ``<zoo>/rel/path``."""
    if isinstance(value, str) and value.startswith(ZOO_PREFIX):
        return str(zoo / value[len(ZOO_PREFIX):])
    if isinstance(value, dict):
        return {k: _unzoo(v, zoo) for k, v in value.items()}
    if isinstance(value, list):
        return [_unzoo(v, zoo) for v in value]
    return value


def _per_skill(objectives: list[dict[str, Any]], zoo: Path) -> list[dict[str, Any]]:
    """Expand objectives named with ``{skill}`` into one per zoo skill (in manifest order)."""
    from evomerge.experiments.zoo import load_manifest

    skills = load_manifest(zoo)["skills"]
    out: list[dict[str, Any]] = []
    for obj in objectives:
        if "{skill}" not in obj["name"]:
            out.append(obj)
            continue
        for skill in skills:
            out.append({k: v.replace("{skill}", skill) if isinstance(v, str) else v for k, v in obj.items()})
    return out


def _model_folder(value: str, *, field: str, label: str, allow_pickle: bool) -> str:
    """``value`` itself when it is a path, else the cache folder of the hub id it names."""
    model = parse_model_id(value)
    if model is None:
        return value
    try:
        return str(resolve_model_id(model, allow_pickle=allow_pickle))
    except ModelIdError as exc:
        raise SpecError(f"{label}: {field}: {exc}") from None


def _hub_models(models: dict[str, Any], *, label: str) -> dict[str, Any]:
    """``models`` with every hub id among base and experts replaced by its local folder."""
    pickle = bool(models.get("allow_pickle"))
    out = dict(models)
    if out.get("base") is not None:
        out["base"] = _model_folder(out["base"], field="models.base", label=label, allow_pickle=pickle)
    out["experts"] = {
        name: _model_folder(ref, field=f"models.experts.{name}", label=label, allow_pickle=pickle)
        for name, ref in out.get("experts", {}).items()
    }
    return out


def resolve(spec: ExperimentSpec, *, label: str, progress: bool = True) -> ExperimentSpec:
    """The spec with the zoo built and expanded, pools listed and hub ids found in the cache: plain
    base + experts, absolute paths.

    Re-validated, so a zoo that lacks a referenced file is a one-line error naming the field.
    """
    data = spec.model_dump(mode="json", by_alias=True)
    models = data["models"] = _hub_models(data["models"], label=label)
    if spec.models.zoo is not None:
        zoo = zoo_dir(spec.models.zoo, progress=progress)
        data["objectives"] = _per_skill(data["objectives"], zoo)
        data = _unzoo(data, zoo)
        data["models"] = {**models, **_zoo_models(zoo, spec.models.zoo), "zoo": None}
    elif spec.models.pool is not None:
        adapters = pool_adapters(Path(spec.models.pool))
        clash = sorted(set(adapters) & set(models["experts"]))
        if clash:  # the pool's adapter would replace the listed expert without a word
            raise SpecError(f"models.experts: {', '.join(map(repr, clash))} is also the name of an adapter in models.pool "
                            f"({spec.models.pool}); rename the expert")
        data["models"] = {**models, "experts": {**models["experts"], **adapters}, "pool": None}
    return validate_spec(data, root=Path.cwd(), label=label)
