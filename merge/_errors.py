"""The exception type of `evomerge.merge`, and its kind for one rule of a recipe.

Every problem a user can fix (a missing file, mismatched checkpoints, a bad recipe) raises
`MergeError` with a one-line message naming the culprit and the fix, so the CLI can print it
and exit with code 2 instead of showing a traceback.
"""

from __future__ import annotations


class MergeError(ValueError):
    """A user-fixable problem with checkpoints, adapters or a recipe."""


class RuleError(MergeError):
    """A rule of a recipe the engine cannot merge: ``rule <index>: <problem>``. ``field`` names the
    rule's culprit (``method``, ``experts``, ``lora_mode``), so a caller that built the recipe from
    its own input (a spec's search space) can name that input's field instead of a rule number."""

    def __init__(self, index: int, field: str, problem: str) -> None:
        super().__init__(f"rule {index}: {problem}")
        self.index, self.field, self.problem = index, field, problem
