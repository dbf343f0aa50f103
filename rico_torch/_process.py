"""Worker processes that die with their parent (the encoder's pool, the PatchLoader's workers)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Call first in a worker: on Linux the kernel kills the worker when its parent dies; elsewhere
    (and should that fail) a thread polls for the parent and ends the worker."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:  # also catches a parent that died before prctl took effect
        time.sleep(0.5)
    os._exit(1)
