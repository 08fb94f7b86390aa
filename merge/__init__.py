"""evomerge.merge: checkpoints and LoRA adapters in, compatibility checks, task vectors, tensor
grouping, in-place merging of recipes, export (HF folder, PEFT adapter, mergekit YAML), and mergekit
YAML read back as a recipe."""

from ._atomic import atomic_dir, atomic_file, write_atomic
from ._compat import VOCAB_POLICIES, VocabPolicy
from ._engine import MergeEngine, MergeStats, fixed_mmap_threshold
from ._errors import MergeError
from ._io import CheckpointReader
from ._layout import KIND_PATTERNS, LAYER_PATTERN, ModelLayout, TensorSlot, classify
from ._lora import LoraAdapter, LoraModule
from ._mergekit import recipe_to_mergekit
from ._mergekit_read import model_refs, recipe_from_mergekit
from ._recipe import ExpertParams, GroupRule, LoraMode, MergeRecipe, ModuleKind, RescalePolicy, Section

__all__ = [
    "fixed_mmap_threshold",
    "CheckpointReader",
    "ExpertParams",
    "GroupRule",
    "KIND_PATTERNS",
    "LAYER_PATTERN",
    "LoraAdapter",
    "LoraMode",
    "LoraModule",
    "MergeEngine",
    "MergeError",
    "MergeRecipe",
    "MergeStats",
    "ModelLayout",
    "ModuleKind",
    "RescalePolicy",
    "Section",
    "TensorSlot",
    "VOCAB_POLICIES",
    "VocabPolicy",
    "atomic_dir",
    "atomic_file",
    "classify",
    "model_refs",
    "recipe_from_mergekit",
    "recipe_to_mergekit",
    "write_atomic",
]
