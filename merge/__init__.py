"""evomerge.merge: checkpoints and LoRA adapters in, compatibility checks, task vectors, tensor
grouping, in-place merging of recipes, export (HF folder, PEFT adapter, mergekit YAML), and mergekit
YAML read back as a recipe."""

from __future__ import annotations

from ._lazy import lazy_members

# Loaded on first use (`merge._lazy`): submodule -> the public names it provides.
__getattr__, __all__ = lazy_members(__name__, {
    "._atomic": ["atomic_dir", "atomic_file", "write_atomic"],
    "._compat": ["VOCAB_POLICIES", "VocabPolicy"],
    "._allocator": ["fixed_mmap_threshold"],
    "._engine": ["MergeEngine", "MergeStats"],
    "._errors": ["MergeError", "RuleError"],
    "._export": ["check_export_target"],
    "._io": ["CheckpointReader", "quiet_transformers"],
    "._layout": ["KIND_PATTERNS", "LAYER_PATTERN", "ModelLayout", "TensorSlot", "classify"],
    "._lora": ["LoraAdapter", "LoraModule"],
    "._mergekit": ["recipe_to_mergekit"],
    "._mergekit_read": ["model_refs", "recipe_from_mergekit"],
    "._recipe": ["ExpertParams", "GroupRule", "LoraMode", "MergeRecipe", "ModuleKind", "RescalePolicy", "Section"],
})
