"""Export of a chosen recipe: an HF model folder, or the adapter-mode merge as a PEFT adapter.

Both are built in a hidden temporary sibling folder and renamed into place when complete
(`atomic_dir`): a killed export leaves no folder that looks like a model, and exporting over an
old folder replaces it only once the new one is whole.

Exports stream tensors from `MergeEngine.iter_merged` into safetensors shards, so exporting needs
one shard of extra memory, not a second model. The folder carries everything needed to reproduce
or re-run the merge elsewhere: recipe.json, mergekit.yaml (when mergekit can express the recipe)
and a README.md model card stating both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ._atomic import atomic_dir
from ._errors import MergeError
from ._io import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from ._mergekit import recipe_to_mergekit
from ._recipe import MergeRecipe

if TYPE_CHECKING:
    from ._engine import MergeEngine

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
"""Files copied from the base folder so the export loads with `AutoTokenizer` as the base did."""

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size: str | int) -> int:
    """'2GB' / '500MB' / '64KiB' / int bytes -> bytes."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * _UNITS[unit])
            except ValueError:
                break
    raise MergeError(f"shard_size {size!r} is not a size; use e.g. '2GB', '500MB' or a number of bytes")


def _save_shard(shard: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, its I/O failures (a full disk) raised as the OSError they are."""
    try:
        save_file(shard, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        raise OSError(str(exc)) from exc


def _write_shards(tensors: Iterable[tuple[str, torch.Tensor]], out: Path, limit: int) -> None:
    """safetensors shards of at most `limit` bytes (one oversized tensor gets its own shard) + index.

    Each shard is written as soon as it is full, so an export holds at most one shard of merged
    tensors beside the engine; shards get their final `model-i-of-n` names once n is known.
    """
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = out / f"shard-{len(written) + 1:05d}.partial"
        _save_shard(shard, path)
        written.append((path, list(shard)))

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > limit:
            flush()
            shard, size = {}, 0
        shard[name] = tensor.detach().cpu().contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        written[0][0].rename(out / SAFETENSORS_SINGLE)
        return
    weight_map: dict[str, str] = {}
    for i, (path, names) in enumerate(written, start=1):
        fname = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        path.rename(out / fname)
        weight_map.update({name: fname for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))


EXPORT_MARKER = "recipe.json"
"""Every export writes it: a folder holding it is an earlier export that a new one may replace."""


def check_export_target(out: Path) -> None:
    """Refuse an `out` that is a file, or a non-empty folder that is not an earlier export: an
    export replaces its folder whole, and a user's own files there must not go with it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MergeError(f"export: {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise MergeError(f"export: {out} is a folder with other files in it, which an export would replace; "
                         "give a new or empty folder (an earlier export, with its recipe.json, is replaced)")


def _check_free_space(engine: "MergeEngine", out: Path) -> None:
    """Refuse before merging when the destination cannot hold the weights (a full disk midway costs minutes)."""
    needed = engine.weight_bytes()
    folder = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise MergeError(
            f"export: {out} needs {needed / 1e9:.2f} GB for the weights, {folder} has {free / 1e9:.2f} GB free; "
            "free space there or export to another disk (--out)"
        )


def _mergekit_yaml(engine: "MergeEngine", recipe: MergeRecipe) -> tuple[str | None, str | None]:
    """(yaml, None) or (None, why mergekit cannot express the recipe)."""
    lora = frozenset(engine.lora_expert_names)
    try:
        return recipe_to_mergekit(
            recipe, engine.layout, str(engine.base_path), {n: str(p) for n, p in engine.expert_paths.items()},
            lora_experts=lora, dtype=str(engine.dtype).removeprefix("torch."),
        ), None
    except MergeError as exc:
        return None, str(exc)


def model_card(engine: "MergeEngine", recipe: MergeRecipe, mergekit: str | None, why_not: str | None) -> str:
    """README.md: what was merged, how, and how to reproduce it."""
    experts = "\n".join(f"- `{n}`: `{engine.expert_paths[n]}`" for n in engine.expert_names)
    methods = ", ".join(sorted({r.method for r in recipe.rules}))
    reproduce = (f"## mergekit\n\n```yaml\n{mergekit}```\n" if mergekit else f"## mergekit\n\nNot expressible: {why_not}\n")
    return (
        "---\nlibrary_name: transformers\ntags:\n- merge\n- evomerge\n---\n"
        f"# Merged model\n\nMerged with evomerge from base `{engine.base_path}` and experts:\n\n{experts}\n\n"
        f"Methods: {methods}; {len(recipe.rules)} rule(s); LoRA mode: {recipe.lora_mode}; seed {recipe.seed}, "
        f"trial {recipe.trial}.\n\n## Recipe (recipe.json)\n\n```json\n{json.dumps(json.loads(recipe.to_json()), indent=2)}\n```\n\n"
        f"{reproduce}"
    )


def export_model(engine: "MergeEngine", recipe: MergeRecipe, out: Path, *, shard_size: str | int = "2GB") -> Path:
    """HF folder: config, weights (sharded above `shard_size`), tokenizer, recipe.json, mergekit.yaml, README.md."""
    limit = parse_size(shard_size)
    engine.check(recipe)
    check_export_target(out)
    _check_free_space(engine, out)
    try:
        with atomic_dir(out) as tmp:
            engine.config.save_pretrained(tmp)
            _write_shards(engine.iter_merged(recipe), tmp, limit)
            for fname in TOKENIZER_FILES:
                if (engine.base_path / fname).is_file():
                    shutil.copy2(engine.base_path / fname, tmp / fname)
            (tmp / EXPORT_MARKER).write_text(json.dumps(json.loads(recipe.to_json()), indent=2))
            mergekit, why_not = _mergekit_yaml(engine, recipe)
            if mergekit:
                (tmp / "mergekit.yaml").write_text(mergekit)
            (tmp / "README.md").write_text(model_card(engine, recipe, mergekit, why_not))
    except OSError as exc:
        raise OSError(f"cannot write the export {out}: {exc}") from exc
    return out


def export_adapter(engine: "MergeEngine", recipe: MergeRecipe, out: Path) -> Path:
    """The adapter-mode merge as a PEFT LoRA folder (scales folded into B, so lora_alpha = r)."""
    if recipe.lora_mode != "adapter":
        raise MergeError("export_lora needs a recipe with lora_mode='adapter'; export a materialized merge with export()")
    modules = engine.merged_adapter(recipe)
    if not modules:
        raise MergeError("the recipe merges no LoRA module; its rules select no tensor a LoRA expert targets")
    ranks = {m.rank for m in modules.values()}
    if len(ranks) > 1:
        raise MergeError(f"merged LoRA modules have different ranks {sorted(ranks)}; PEFT needs rank_pattern, not supported")
    check_export_target(out)
    rank = ranks.pop()
    first = engine.adapter(engine.lora_expert_names[0])
    state: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for name, module in modules.items():
        stem = name.removesuffix(".weight")
        kind = "lora_embedding_" if module.embedding else "lora_"
        state[f"base_model.model.{stem}.{kind}A.weight"] = module.a.to(engine.dtype).cpu().contiguous()
        state[f"base_model.model.{stem}.{kind}B.weight"] = module.b.to(engine.dtype).cpu().contiguous()
        targets.add(stem.rsplit(".", 1)[-1])
    config = {
        "peft_type": "LORA", "task_type": first.config.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": str(engine.base_path), "r": rank, "lora_alpha": rank, "use_rslora": False,
        "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": bool(first.config.get("fan_in_fan_out", False)), "inference_mode": True,
    }
    with atomic_dir(out) as tmp:
        _save_shard(state, tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (tmp / EXPORT_MARKER).write_text(json.dumps(json.loads(recipe.to_json()), indent=2))
    return out
