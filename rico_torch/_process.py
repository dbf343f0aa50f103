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


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).
    A DataModule's setup at millions of keys frees ~150 MB of parse temporaries that glibc keeps
    otherwise, in every rank, for the whole run."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:  # also catches a parent that died before prctl took effect
        time.sleep(0.5)
    os._exit(1)


#: the notice the resource tracker prints when its parent was killed (``kill -9``): it then
#: removes the pool's semaphores itself, as it should, so the notice only alarms
TRACKER_NOTICE = "ignore:resource_tracker:UserWarning"


def quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (if not running yet) without its "leaked
    semaphore" notice after a ``kill -9`` of this process; the tracker still cleans up.

    The tracker is a separate interpreter that takes its warning filters from
    ``PYTHONWARNINGS``; only it sees the changed variable.
    """
    from multiprocessing import resource_tracker

    old = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = TRACKER_NOTICE if not old else f"{old},{TRACKER_NOTICE}"
    try:
        resource_tracker.ensure_running()
    finally:
        if old is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = old


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def reuse_freed_memory(largest: int = 256 << 20, keep: int = 512 << 20) -> bool:
    """Have glibc's malloc keep freed memory for the next allocation rather than return it to the
    kernel: blocks up to ``largest`` bytes come from the heap (not a fresh ``mmap`` each, every 4 KiB
    page of it faulted in and zeroed again), and up to ``keep`` freed bytes stay mapped. For the
    encoder's processes, which allocate and free megabytes per patch (decoded bands; LMDB's page
    buffers, which it zeroes itself where it must). False where there is no glibc ``mallopt``."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, largest)) and bool(mallopt(M_TRIM_THRESHOLD, keep))
