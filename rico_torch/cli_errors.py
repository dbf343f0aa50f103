"""How the command-line tools end on a user's mistake: ``error: <message>``, one line, exit 1.

Every :class:`~rico_torch.errors.UserError` is reported that way, also when a DataLoader worker
raised it (torch re-raises a worker's exception with the worker's traceback as its message).
Set ``RICO_TORCH_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import UserError

DEBUG_ENV = "RICO_TORCH_DEBUG"
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def debugging() -> bool:
    """Whether ``RICO_TORCH_DEBUG`` asks for tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def user_message(exc: BaseException) -> str | None:
    """The one-line message of a user error (``exc`` or what it wraps); None for other errors."""
    seen = 0
    while exc is not None and seen < 8:
        text = str(exc)
        if _WORKER_TRACEBACK in text:  # the last line is "<module>.<Class>: <message>"
            name, _, message = text.rstrip().splitlines()[-1].partition(": ")
            if name.startswith("rico_torch.errors."):
                return message
        elif isinstance(exc, UserError):
            return text
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def report(exc: BaseException) -> int:
    """Print a user error as ``error: <message>`` and return exit code 1; re-raise any other
    error, and every error when debugging."""
    message = None if debugging() else user_message(exc)
    if message is None:
        raise exc
    print(f"error: {message}", file=sys.stderr)
    return 1


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user error inside the block into ``error: <message>`` and ``SystemExit(1)``."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 -- report() re-raises what is not a user error
        code = report(e)
        raise SystemExit(code) from None


def program(module: str, script: str) -> str:
    """The name usage lines show: ``python -m <module>`` when run so, else the script's name."""
    return f"python -m {module}" if os.path.basename(sys.argv[0]) == "__main__.py" else script
