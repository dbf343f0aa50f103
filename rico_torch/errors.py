"""Error types with one-line messages that name the path or value and what is wrong.

Every error meant for a user derives from :class:`UserError`: the command-line tools print its
message as one line and exit 1 (a traceback only with ``RICO_TORCH_DEBUG=1``). The classes also
derive from the built-in type a Python caller would catch (``FileNotFoundError``, ``ValueError``,
``KeyError``, ``TypeError``), so library use keeps working with plain ``except`` clauses.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and, where it helps, what to run."""

    def __str__(self) -> str:  # KeyError would quote the message; FileNotFoundError may drop it
        return str(self.args[0]) if self.args else ""


class InputError(UserError):
    """A source file or directory is missing or not what the dataset expects.

    The message is one line: ``<path>: <what is wrong>``.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # keep both fields across process boundaries
        return (type(self), (self.path, self.problem))


class TargetError(UserError):
    """The target directory cannot be used (holds something else, locked, unwritable)."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """An encoded dataset (or a file it needs) is not where it was expected; the message says how
    to create it."""


class IncompleteDatasetError(UserError, RuntimeError):
    """The LMDB belongs to an encode that has not finished (``manifest.json`` says ``complete: false``)."""


class ConfigError(UserError, ValueError):
    """An argument that cannot be right (unknown band, empty key list, a size that is not a size)."""


class ArgumentTypeError(UserError, TypeError):
    """An argument of the wrong type (``bands="B04"``, keys given as bytes)."""


class UnknownKeyError(UserError, KeyError):
    """A key that is not in the LMDB."""


class FormatError(UserError, ValueError):
    """A file that is not what the format says: a corrupt ``manifest.json``, a value that is not
    safetensors, a ``data.mdb`` LMDB cannot open."""


class StaleDatasetError(UserError, RuntimeError):
    """The LMDB was replaced (re-encoded) after the dataset was created, or the dataset was closed."""


class MissingBandError(UserError, KeyError):
    """A patch lacks a band that was asked for (e.g. keys of another source among the items)."""


class GridError(UserError, ValueError):
    """A target grid that cannot be built (an unknown CRS, a grid too large for its resolution):
    bad input like a broken source, so the command exits 1, not 2 as for a malformed argument."""
