"""Errors a user can fix by changing their input."""

from __future__ import annotations

__all__ = ["QID2InputError"]


class QID2InputError(ValueError):
    """Bad input, described in one line that names the file and the problem.

    Subclasses ``ValueError`` so library callers can catch it like any other
    argument error; the CLI prints it without a traceback and exits non-zero.
    """

    def __init__(self, path, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
