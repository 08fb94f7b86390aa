"""The one exception type of `evomerge.merge`.

Every problem a user can fix (a missing file, mismatched checkpoints, a bad recipe) raises
`MergeError` with a one-line message naming the culprit and the fix, so the CLI can print it
and exit with code 2 instead of showing a traceback.
"""

from __future__ import annotations


class MergeError(ValueError):
    """A user-fixable problem with checkpoints, adapters or a recipe."""
