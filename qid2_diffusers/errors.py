"""Errors and warnings a user can act on by changing their input."""

from __future__ import annotations

__all__ = ["QID2InputError", "QID2InputWarning"]


def _one_line(path, problem: str) -> str:
    return f"{path}: {problem}" if path else problem


class QID2InputError(ValueError):
    """Bad input, described in one line that names the file and the problem.

    Subclasses ``ValueError`` so library callers can catch it like any other
    argument error; the CLI prints it without a traceback and exits non-zero.
    """

    def __init__(self, path, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(_one_line(self.path, problem))


class QID2InputWarning(UserWarning):
    """Input that is used, but not as given (a dropped volume, NaN voxels, rescaled b-values...), in one line.

    The CLI prints it as ``qid2 COMMAND: warning: ...``; the demo shows it as a
    notice; library callers can filter it like any warning.
    """

    def __init__(self, path, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(_one_line(self.path, problem))
