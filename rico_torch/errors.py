"""Error types with one-line messages that name the path and what is wrong."""

from __future__ import annotations


class InputError(Exception):
    """A source file or directory is missing or not what the dataset expects.

    The message is one line: ``<path>: <what is wrong>``.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # keep both fields across process boundaries
        return (type(self), (self.path, self.problem))


class TargetError(Exception):
    """The target directory cannot be used (holds something else, locked, unwritable)."""


class DatasetNotFoundError(FileNotFoundError):
    """An encoded dataset is not where it was expected; the message says how to create it."""
