"""The toy model zoo: a small base LM, skill experts, LoRA adapters and data, built locally.

It is the test data of the whole project (merge engine, scorers, search, demo). See
``build.py`` for why it is a genuine merging problem and how it stays deterministic.

>>> from evomerge.experiments.zoo import build_zoo, load_manifest, format_accuracy_table
>>> zoo = build_zoo("tiny", progress=False)          # doctest: +SKIP
>>> print(format_accuracy_table(load_manifest(zoo)))  # doctest: +SKIP
>>> fixture = build_real_shape("qwen2.5")              # doctest: +SKIP  (real_shapes.py)
"""
from evomerge.merge._lazy import lazy_members

# Loaded on first use (`merge._lazy`), so that the CLI, which registers the zoo commands, starts
# without importing torch and transformers: submodule -> the public names it provides.
__getattr__, __all__ = lazy_members(__name__, {
    "._cache": ["ZooBuildError", "cache_root", "is_complete"],
    ".build": ["BUILDER_VERSION", "build_zoo", "default_zoo_dir"],
    ".evaluation": ["accuracy", "exact_match"],
    ".manifest": ["format_accuracy_table", "load_manifest"],
    ".real_shapes": ["FAMILIES", "RealShapeError", "build_real_shape", "default_real_shape_dir"],
    ".sizes": ["ZOO_SIZES", "ZooSize"],
    ".skills": ["SKILLS", "read_jsonl"],
})
