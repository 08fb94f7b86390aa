"""Which exceptions mean "bad input" (one line, exit 2) rather than a bug (traceback).

The packages raise their own typed errors (`MergeError`, `CalibrationError`, `ZooBuildError`);
they are collected here so the CLI has one place that decides what a user error is.
"""

from __future__ import annotations


class UserError(ValueError):
    """An experiments-level input problem (bad run folder, unknown trial, ...); one-line message."""

    @staticmethod
    def message_of(exc: BaseException) -> str:
        """The message of a user error: one line per problem (file errors name the path)."""
        from ._spec_io import SpecError

        if isinstance(exc, FileNotFoundError) and exc.filename:
            return f"{exc.filename}: no such file or directory"
        lines = str(exc).splitlines() if isinstance(exc, SpecError) else [str(exc)]
        return "\n".join(" ".join(line.split()) for line in lines if line.strip())


def first_line(exc: BaseException) -> str:
    """A library exception's message cut to its first line (sqlalchemy's and torch's run to pages)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types reported as one line with exit status 2."""
    from evomerge.experiments.zoo import ZooBuildError
    from evomerge.merge import MergeError
    from evomerge.objectives import CalibrationError, LmEvalError
    from evomerge.search import LedgerError, ResumeError

    from ._spec_io import SpecError

    return (UserError, SpecError, MergeError, CalibrationError, LmEvalError, ZooBuildError, ResumeError, LedgerError,
            FileNotFoundError)
