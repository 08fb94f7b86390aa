"""The toy model zoo: a small base LM, skill experts, LoRA adapters and data, built locally.

It is the test data of the whole project (merge engine, scorers, search, demo). See
``build.py`` for why it is a genuine merging problem and how it stays deterministic.

>>> from evomerge.experiments.zoo import build_zoo, load_manifest, format_accuracy_table
>>> zoo = build_zoo("tiny", progress=False)          # doctest: +SKIP
>>> print(format_accuracy_table(load_manifest(zoo)))  # doctest: +SKIP
>>> fixture = build_real_shape("qwen2.5")              # doctest: +SKIP  (real_shapes.py)
"""
import importlib
from typing import Any

#: Where each public name lives. The package loads them on first use (PEP 562), so that the CLI,
#: which registers the zoo commands, starts without importing torch and transformers.
_HOMES = {
    "is_complete": "._cache",
    "BUILDER_VERSION": ".build", "ZooBuildError": ".build", "build_zoo": ".build", "default_zoo_dir": ".build",
    "accuracy": ".evaluation", "exact_match": ".evaluation",
    "format_accuracy_table": ".manifest", "load_manifest": ".manifest",
    "FAMILIES": ".real_shapes", "RealShapeError": ".real_shapes", "build_real_shape": ".real_shapes",
    "default_real_shape_dir": ".real_shapes",
    "ZOO_SIZES": ".sizes", "ZooSize": ".sizes",
    "SKILLS": ".skills", "read_jsonl": ".skills",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)


__all__ = sorted(_HOMES)
