"""PEFT LoRA adapters as experts: key mapping, scaling and the dense delta they stand for.

A LoRA expert for base tensor W holds A (r x in) and B (out x r); PEFT adds scale * B @ A with
scale = lora_alpha / r (or lora_alpha / sqrt(r) with rslora, and per-module `rank_pattern` /
`alpha_pattern` overrides). Embedding adapters store A (r x vocab) and B (dim x r) and add
(B @ A)^T. Keys such as `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` map to
the base tensor `model.layers.0.self_attn.q_proj.weight`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._errors import MergeError
from ._io import read_json, require_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?:embedding_)?(?P<which>[AB])(?:\.[^.]+)?(?:\.weight)?$")


def is_adapter(folder: str | Path) -> bool:
    """Whether a folder is a PEFT adapter rather than a full model."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


@dataclass
class LoraModule:
    """The low-rank factors for one base tensor; `delta()` is what PEFT would add to it."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    embedding: bool = False
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale * B @ A in the base tensor's orientation, computed in fp32."""
        product = (self.b.float() @ self.a.float()) * self.scale
        if self.embedding or self.fan_in_fan_out:
            product = product.T
        return product.contiguous().to(dtype)


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter: its config and a `LoraModule` per base tensor name."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    """`modules_to_save` tensors: full replacements for base tensors (e.g. a retrained lm_head)."""

    @classmethod
    def load(cls, folder: str | Path, label: str = "adapter") -> "LoraAdapter":
        path = require_dir(folder, label)
        config = read_json(path / ADAPTER_CONFIG)
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise MergeError(f"{label} {path}: peft_type {peft_type} is not supported; only LoRA adapters merge")
        if config.get("use_dora"):
            raise MergeError(f"{label} {path}: DoRA adapters are not supported (use_dora=true); merge LoRA adapters")
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise MergeError(f"{label} {path} has no {ADAPTER_WEIGHTS}; re-save it with PEFT's save_pretrained")
        from safetensors.torch import load_file

        from safetensors import SafetensorError

        _check_numbers(config, path / ADAPTER_CONFIG)
        adapter = cls(path=path, config=config)
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as exc:
            raise MergeError(f"{label}: {weights} is not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); re-save the adapter") from None
        adapter._parse(state, label)
        return adapter

    def _parse(self, state: dict[str, torch.Tensor], label: str) -> None:
        factors: dict[str, dict[str, torch.Tensor]] = {}
        embedding: set[str] = set()
        for key, tensor in state.items():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            match = _LORA_KEY.match(name)
            if match is None:
                if ".lora_" in name:
                    raise MergeError(f"{label} {self.path}: unsupported LoRA tensor {key}")
                # modules_to_save copies are stored under the base tensor's own name.
                self.full[name.replace(".modules_to_save.default", "")] = tensor
                continue
            module = match.group("module")
            factors.setdefault(module, {})[match.group("which")] = tensor
            if ".lora_embedding_" in name:
                embedding.add(module)
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        for module, ab in factors.items():
            if set(ab) != {"A", "B"}:
                raise MergeError(f"{label} {self.path}: module {module} lacks lora_{'A' if 'A' not in ab else 'B'}")
            self._check_rank(module, ab["A"], ab["B"])
            self.modules[f"{module}.weight"] = LoraModule(
                a=ab["A"], b=ab["B"], scale=self.scale_for(module, ab["A"].shape[0]),
                embedding=module in embedding, fan_in_fan_out=fan_in_fan_out,
            )

    def _check_rank(self, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """A's rows, B's columns and the config's rank agree, as PEFT's loading requires: the
        scale is alpha over that rank, so a config that disagrees with its tensors would scale
        every delta wrongly without a word."""
        config_file = self.path / ADAPTER_CONFIG
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise MergeError(f"{self.path / ADAPTER_WEIGHTS}: module {module}: lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)} do not multiply (A is rank x in, B is out x rank); re-save the adapter")
        rank = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r"))
        if rank is not None and rank != a.shape[0]:
            raise MergeError(f"{config_file}: r (or rank_pattern) says rank {rank} for {module}, but its lora_A has "
                             f"{a.shape[0]} rows; fix r to the trained rank, or re-save the adapter with PEFT")

    def scale_for(self, module: str, rank: int) -> float:
        """PEFT's scaling for one module: alpha / r, or alpha / sqrt(r) under rslora."""
        alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8)))
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank


def _check_numbers(config: dict[str, Any], path: Path) -> None:
    """``r`` and ``lora_alpha`` (and the values of their per-module patterns) are positive
    numbers, ``r`` whole: PEFT's scale alpha / r is computed from them."""
    fields: list[tuple[str, Any]] = [(key, config[key]) for key in ("r", "lora_alpha") if key in config]
    for pattern in ("rank_pattern", "alpha_pattern"):
        table = config.get(pattern) or {}
        if not isinstance(table, dict):
            raise MergeError(f"{path}: {pattern} is a {type(table).__name__}, not a mapping of module names to numbers")
        fields += [(f"{pattern}[{name!r}]", value) for name, value in table.items()]
    for name, value in fields:
        whole = name == "r" or name.startswith("rank_pattern")
        kind = int if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
            raise MergeError(f"{path}: {name} is {value!r}; it must be a positive {'whole number' if whole else 'number'}")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches the module name exactly or as a suffix."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default
