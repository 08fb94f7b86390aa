"""The toy model zoo: a small base LM, skill experts, LoRA adapters and data, built locally.

It is the test data of the whole project (merge engine, scorers, search, demo). See
``build.py`` for why it is a genuine merging problem and how it stays deterministic.

>>> from evomerge.experiments.zoo import build_zoo, load_manifest, format_accuracy_table
>>> zoo = build_zoo("tiny", progress=False)          # doctest: +SKIP
>>> print(format_accuracy_table(load_manifest(zoo)))  # doctest: +SKIP
>>> fixture = build_real_shape("qwen2.5")              # doctest: +SKIP  (real_shapes.py)
"""
from ._cache import is_complete
from .build import BUILDER_VERSION, ZooBuildError, build_zoo, default_zoo_dir
from .evaluation import accuracy, exact_match
from .manifest import format_accuracy_table, load_manifest
from .real_shapes import FAMILIES, RealShapeError, build_real_shape, default_real_shape_dir
from .sizes import ZOO_SIZES, ZooSize
from .skills import SKILLS, read_jsonl

__all__ = [
    "BUILDER_VERSION",
    "FAMILIES",
    "RealShapeError",
    "SKILLS",
    "ZOO_SIZES",
    "ZooBuildError",
    "ZooSize",
    "accuracy",
    "build_real_shape",
    "build_zoo",
    "default_real_shape_dir",
    "default_zoo_dir",
    "exact_match",
    "format_accuracy_table",
    "is_complete",
    "load_manifest",
    "read_jsonl",
]
