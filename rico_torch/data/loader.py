"""``PatchLoader``: batches from worker processes through recycled shared-memory slots.

A torch ``DataLoader`` hands every batch over in new shared memory, which the kernel faults in
page by page on first touch and tears down after use: on the benchmark machine a float32 batch
of 256 costs more to page in than to fill. Here each worker process owns a ring of batch slots
in shared memory, created once and mapped by the main process once. The main process sends
index batches from the sampler; a worker fills the slot it is told to in place
(``read_batch(into=)``) and answers with one small message; the main process yields tensors
that view the slot and gives the slot back once nothing views it any more (checked by the
slot's storage use counts when the next batch is asked for). A batch still referenced a
batch later (``list(loader)``, ``torch.cat`` over batches) keeps its memory: its slot gets new
shared memory, so no batch ever shows another batch's pixels.

The shared memory is a ``memfd`` (anonymous: nothing in ``/dev/shm``, nothing to unlink; the
kernel frees it once the last process mapping it is gone, however that process ends) that the
worker passes to the main process over its pipe. Workers die with the main process
(``PR_SET_PDEATHSIG``) and are stopped by :meth:`PatchLoader.close`, ``del``, garbage
collection and interpreter exit.
"""

from __future__ import annotations

import logging
import math
import mmap
import multiprocessing
import os
import pickle
import random
import signal
import threading
import traceback
import warnings
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import numpy as np
import torch

from .._process import die_with_parent
from ..errors import ArgumentTypeError, ConfigError
from .dataset import LMDBPatchDataset

log = logging.getLogger(__name__)
_ALIGN = 64  # bytes between the tensors of one slot
_STOP_WAIT = 2.0  # seconds a stopping worker gets before it is killed


class WorkerError(RuntimeError):
    """A PatchLoader worker's exception whose type cannot be rebuilt from a message."""


class WorkerLostError(WorkerError):
    """A PatchLoader worker died (SIGKILL, out of memory) or sent nothing within ``timeout``; the loader
    has stopped its workers (the next iteration starts new ones)."""


# --- slots: the tensors of one batch at fixed offsets in shared memory --------------------------


@dataclass(frozen=True)
class _Entry:
    where: tuple[str, ...]  # ("image",), ("mask",) or ("native", group name)
    shape: tuple[int, ...]  # with the batch dimension (full batch size)
    dtype: str  # numpy dtype string
    offset: int  # bytes from the slot's start


def _layout(probe: dict[str, Any], rows: int) -> tuple[tuple[_Entry, ...], int]:
    """Where the tensors of a ``_read(fields=False)`` output of ``rows`` items go in a slot; the
    slot's bytes (whole pages)."""
    tensors = []  # every output the dataset fills (image or native groups, mask, crop), never the fields
    for name, value in probe.items():
        if isinstance(value, dict):
            tensors += [((name, group), t) for group, t in value.items()]
        elif isinstance(value, torch.Tensor):
            tensors.append(((name,), value))
    entries, at = [], 0
    for where, tensor in tensors:
        dtype = tensor.numpy().dtype
        shape = (rows, *tensor.shape[1:])
        entries.append(_Entry(where, shape, dtype.str, at))
        at += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    return tuple(entries), -(-at // mmap.PAGESIZE) * mmap.PAGESIZE


def _slot_views(buffer: mmap.mmap, entries: tuple[_Entry, ...], slot_bytes: int, slot: int) -> dict[str, Any]:
    """Full-size tensors viewing slot ``slot`` of a ring, keyed as ``read_batch`` keys them."""
    out: dict[str, Any] = {}
    for e in entries:
        array = np.frombuffer(buffer, np.dtype(e.dtype), math.prod(e.shape), slot * slot_bytes + e.offset)
        tensor = torch.from_numpy(array.reshape(e.shape))
        if len(e.where) == 2:  # a native group
            out.setdefault(e.where[0], {})[e.where[1]] = tensor
        else:
            out[e.where[0]] = tensor
    return out


def _each_tensor(batch: dict[str, Any], fn) -> dict[str, Any]:
    """``batch`` with ``fn`` applied to every tensor (also a native group's); other fields as they are."""
    return {k: ({g: fn(t) for g, t in v.items()} if isinstance(v, dict) else fn(v) if isinstance(v, torch.Tensor)
                else v) for k, v in batch.items()}


def _uses(tensors: dict[str, Any]) -> int:
    """How many tensors view the storages of a slot's (or a reused batch's) tensors, summed: more
    than when the slot was made means a batch yielded from it is still referenced somewhere."""
    count = 0
    for value in tensors.values():
        for t in value.values() if isinstance(value, dict) else (value,):
            if isinstance(t, torch.Tensor):
                count += torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    return count


def _rows(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` rows of a slot (a last, shorter batch); contiguous views."""
    return _each_tensor(batch, lambda t: t[:n])


def _shared_memory(size: int) -> int:
    """A descriptor of ``size`` bytes of shared memory that no name refers to."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("rico_torch-batches", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return fd
    from multiprocessing import shared_memory  # no memfd (macOS): a POSIX segment, unlinked at once

    segment = shared_memory.SharedMemory(create=True, size=size)
    fd = os.dup(segment._fd)
    segment.close()
    segment.unlink()
    return fd


# --- the worker process ---------------------------------------------------------------------


def _work(conn, dataset: LMDBPatchDataset, batch_size: int, slots: int, parent: int, seed: int) -> None:
    """A worker's loop: fill the slot each task names, answer ``("done", seq)`` or ``("error", ...)``.

    The ring is created at the first task, shaped like that task's first item (native groups
    depend on the stored layout), and its descriptor sent to the main process once. ``seed``
    differs per worker (random crops and views must not repeat across workers), as DataLoader's.
    """
    die_with_parent(parent)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    torch.set_num_threads(1)
    ring: list[dict[str, Any]] | None = None
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        seq, slot, indices, fresh = task
        try:
            if ring is None:
                entries, slot_bytes = _layout(dataset._read(indices[:1], fields=False), batch_size)
                fd = _shared_memory(slots * slot_bytes)
                buffer = mmap.mmap(fd, slots * slot_bytes)
                ring = [_slot_views(buffer, entries, slot_bytes, s) for s in range(slots)]
                conn.send(("ring", entries, slot_bytes))
                send_handle(conn, fd, parent)
                os.close(fd)
            elif fresh:  # the main process's batch of this slot is kept: new memory for the slot
                fd = _shared_memory(slot_bytes)
                ring[slot] = _slot_views(mmap.mmap(fd, slot_bytes), entries, slot_bytes, 0)
                conn.send(("slot", slot))
                send_handle(conn, fd, parent)
                os.close(fd)
            dataset._read(indices, into=_rows(ring[slot], len(indices)), fields=False)  # keys: made in main
            conn.send(("done", seq))
        except Exception as e:  # noqa: BLE001  (re-raised in the main process)
            kind = type(e)
            try:
                pickle.dumps(kind)
            except Exception:  # noqa: BLE001  (a class pickle cannot name: a local class)
                kind = WorkerError
            conn.send(("error", seq, kind, traceback.format_exc(), _failing_keys(dataset, indices)))


def _failing_keys(dataset: LMDBPatchDataset, indices: Sequence[int]) -> str:
    """Which key of a failed batch fails on its own (each is read again), for the message."""
    for i in indices:
        try:
            dataset.read_batch([i])
        except Exception:  # noqa: BLE001
            return f"key {dataset.key(i)!r} (item {i})"
    return f"a batch of {len(indices)} items from key {dataset.key(indices[0])!r} (item {indices[0]})"


# --- pinning -------------------------------------------------------------------------------


class _Pinning:
    """``pin_memory=True``: the rings registered as page-locked (``cudaHostRegister``) in the main
    process, a CUDA event per slot recorded when the slot is given back, waited on before a worker
    may write into it again; where registration fails, a copy into torch's caching pinned
    allocator (and the slot is given back at once); without CUDA, nothing (said once)."""

    _warned = False

    def __init__(self, wanted: bool) -> None:
        self.mode = None
        if wanted and torch.cuda.is_available():
            self.mode = "register"
        elif wanted and not _Pinning._warned:
            _Pinning._warned = True
            warnings.warn("PatchLoader(pin_memory=True): no CUDA device, batches are not pinned", stacklevel=3)

    def register(self, buffer: mmap.mmap, size: int) -> int | None:
        """Page-lock a ring in place; its address, or None when it stays pageable."""
        if self.mode != "register":
            return None
        ptr = np.frombuffer(buffer, np.uint8, 1).ctypes.data
        code = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 1))  # 1: cudaHostRegisterPortable
        if code == 0:
            return ptr
        self.mode = "copy"
        warnings.warn(f"PatchLoader(pin_memory=True): cudaHostRegister failed (cudaError {code}); each batch is "
                      "copied into pinned memory instead", stacklevel=2)
        return None

    @staticmethod
    def unregister(ptr: int) -> None:
        torch.cuda.cudart().cudaHostUnregister(ptr)

    @staticmethod
    def event() -> Any:
        """Recorded on the current stream: done once the copies queued so far (the batch's) are."""
        event = torch.cuda.Event()
        event.record()
        return event


def _pinned_copy(batch: dict[str, Any]) -> dict[str, Any]:
    return _each_tensor(batch, torch.Tensor.pin_memory)


# --- the workers, seen from the main process -------------------------------------------------


@contextmanager
def _ctrl_c_after() -> Iterator[None]:
    """A Ctrl-C during the block takes effect after it. A KeyboardInterrupt raised while
    ``os.fork`` runs CPython's at-fork hooks (logging's, for one) is printed and dropped, so a
    Ctrl-C landing there would be lost and a whole epoch would run. Blocking the signal
    (``pthread_sigmask``) does not do: it is per thread, and the signal then goes to another
    thread (torch's) while the Python handler still runs in this one. So the handler only notes
    it during the block, and the signal is raised again afterwards under the previous handler
    (a KeyboardInterrupt here, or whatever the program set)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


@dataclass
class _Held:
    """A slot whose batch was yielded and may still be referenced."""

    worker: int
    slot: int
    batch: int  # its number among the batches these workers yielded


class _Workers:
    """The worker processes, their pipes and rings, and which slots are free.

    A yielded batch's slot is held until nothing views it (:meth:`recycle`): the batch of the
    caller's loop variable is still referenced when the next one is asked for, so a slot comes
    back a batch later; one still referenced then is kept by the caller and the slot gets new
    memory (``fresh``) instead of being written under the caller's tensors.
    """

    def __init__(self, dataset: LMDBPatchDataset, count: int, batch_size: int, slots: int, context,
                 pinning: _Pinning, timeout: float) -> None:
        self.slots, self.pinning, self.timeout = slots, pinning, timeout
        self.procs: list = []
        self.conns: list = []
        self.rings: list[list[dict[str, Any]] | None] = [None] * count
        self.registered: list[int] = []  # addresses of page-locked rings
        self.layouts: list[tuple[tuple[_Entry, ...], int] | None] = [None] * count  # entries, slot bytes
        self.idle: list[list[int]] = [[] for _ in range(count)]  # _uses of each slot with no batch out
        # (slot, event, fresh): event, the last copy out of it; fresh, give it new memory first
        self.free: list[deque] = [deque((s, None, False) for s in range(slots)) for _ in range(count)]
        self.pending: list[deque] = [deque() for _ in range(count)]  # (seq, slot) sent, not answered
        self.held: list[_Held] = []  # yielded batches' slots, oldest first
        self.kept = 0  # batches kept past the next one (their slots got new memory)
        self.yielded = 0  # batches yielded, over every iteration
        self.closed = False
        parent = os.getpid()
        base_seed = int(torch.empty((), dtype=torch.int64).random_().item())  # as DataLoader: per start
        try:
            with _ctrl_c_after():
                for worker in range(count):
                    ours, theirs = context.Pipe(duplex=True)
                    proc = context.Process(target=_work, args=(theirs, dataset, batch_size, slots, parent,
                                                               base_seed + worker), daemon=True,
                                           name="PatchLoader worker")
                    proc.start()
                    theirs.close()
                    self.procs.append(proc)
                    self.conns.append(ours)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def has_free(self, w: int) -> bool:
        return bool(self.free[w])

    def submit(self, w: int, seq: int, indices: list[int]) -> None:
        slot, event, fresh = self.free[w].popleft()
        if event is not None:
            event.synchronize()  # the last copy out of this slot has finished
        try:
            self.conns[w].send((seq, slot, indices, fresh))
        except (BrokenPipeError, ConnectionResetError):
            self._lost(w)
        self.pending[w].append((seq, slot))

    def hold(self, w: int, slot: int) -> None:
        """Slot ``slot`` of worker ``w`` holds the batch being yielded."""
        self.held.append(_Held(w, slot, self.yielded))
        self.yielded += 1

    def release(self, held: _Held) -> None:
        """Give back a slot whose batch nothing views (once its copy to the GPU is done)."""
        event = self.pinning.event() if self.registered and self.pinning.mode == "register" else None
        self.free[held.worker].append((held.slot, event, False))

    def recycle(self) -> None:
        """Give back the held slots that no tensor views any more; a slot whose batch is still
        referenced though a later batch was yielded since gets new memory instead (the caller's
        loop variable holds only the last one, also across iterations)."""
        if self.closed:
            self.held = []
            return
        still = []
        for held in self.held:
            if _uses(self.rings[held.worker][held.slot]) == self.idle[held.worker][held.slot]:
                self.release(held)
            elif held.batch < self.yielded - 1:
                self.kept += 1
                self.free[held.worker].append((held.slot, None, True))
            else:
                still.append(held)
        self.held = still

    def settle(self) -> None:
        """Give back the held slots, wait for every task still in flight (an abandoned iteration's)
        and free its slot; their errors no longer matter, a lost worker does."""
        self.recycle()
        for w in range(len(self.procs)):
            while self.pending[w]:
                try:
                    self.free[w].append((self.result(w, self.pending[w][0][0]), None, False))
                except WorkerLostError:
                    raise
                except Exception:  # noqa: BLE001  (a failed batch of an abandoned iteration)
                    pass

    def result(self, w: int, seq: int) -> int:
        """Wait for worker ``w``'s answer to task ``seq`` (its oldest in flight); the slot it filled.
        Raises the worker's exception, or WorkerLostError when the worker died."""
        conn, proc = self.conns[w], self.procs[w]
        while True:
            ready = wait([conn, proc.sentinel], self.timeout or None)
            if not ready:
                self._lost(w, f"sent no batch within timeout={self.timeout:g} s")
            if conn not in ready:
                self._lost(w)
            try:
                message = conn.recv()
                if message[0] == "ring":
                    self._map_ring(w, message[1], message[2])
                    continue
                if message[0] == "slot":
                    self._map_slot(w, message[1])
                    continue
            except (EOFError, OSError):
                self._lost(w)
            except BaseException:  # Ctrl-C in the middle of a message: the pipe is no longer in step
                self.close()
                raise
            done_seq, slot = self.pending[w].popleft()
            if message[1] != done_seq or done_seq != seq:
                raise WorkerError(f"PatchLoader worker {w} answered task {message[1]}, expected {done_seq}")
            if message[0] == "error":
                self.free[w].append((slot, None, False))
                _, _, kind, text, where = message
                raise _worker_exception(kind, f"PatchLoader worker {w} (pid {proc.pid}) failed reading {where}:\n"
                                              f"{text}")
            return slot

    def _receive_map(self, w: int, size: int) -> mmap.mmap:
        """The shared memory whose descriptor worker ``w`` sends next, mapped."""
        fd = recv_handle(self.conns[w])
        try:
            buffer = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if hasattr(mmap, "MADV_DONTFORK"):
            buffer.madvise(mmap.MADV_DONTFORK)  # workers forked later (another loader's) do not map it
        return buffer

    def _map_ring(self, w: int, entries: tuple[_Entry, ...], slot_bytes: int) -> None:
        buffer = self._receive_map(w, self.slots * slot_bytes)
        ptr = self.pinning.register(buffer, self.slots * slot_bytes)
        if ptr is not None:
            self.registered.append(ptr)
        self.layouts[w] = (entries, slot_bytes)
        self.rings[w] = [_slot_views(buffer, entries, slot_bytes, s) for s in range(self.slots)]
        self.idle[w] = [_uses(views) for views in self.rings[w]]

    def _map_slot(self, w: int, slot: int) -> None:
        """New memory for one slot (its old memory stays with the batch the caller kept); pageable
        (page-locking each would cost more than the copy it saves)."""
        entries, slot_bytes = self.layouts[w]
        self.rings[w][slot] = _slot_views(self._receive_map(w, slot_bytes), entries, slot_bytes, 0)
        self.idle[w][slot] = _uses(self.rings[w][slot])

    def _lost(self, w: int, how: str | None = None):
        proc = self.procs[w]
        if how is None:
            proc.join(1.0)
            code = proc.exitcode
            how = (f"was killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 else
                   f"exited with code {code}" if code is not None else "closed its pipe")
            if code == -signal.SIGKILL:
                how += " (perhaps the kernel's out-of-memory killer: fewer workers or slots, or smaller batches)"
        self.close()
        raise WorkerLostError(f"PatchLoader worker {w} (pid {proc.pid}) {how}; the loader stopped its workers "
                              "(iterate again to start new ones)")

    def close(self) -> None:
        """Stop the workers (a stop message, then SIGKILL after a grace period) and drop the rings."""
        if self.closed:
            return
        self.closed = True
        for conn in self.conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(_STOP_WAIT)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        for ptr in self.registered:
            _Pinning.unregister(ptr)
        self.registered, self.held = [], []
        # the maps themselves go when the last batch viewing them does (unmapping memory that a
        # tensor still views would crash); the kernel frees the memfds then
        self.rings = [None] * len(self.procs)
        self.free = [deque() for _ in self.procs]
        self.pending = [deque() for _ in self.procs]


def _worker_exception(kind: type, message: str) -> BaseException:
    """The worker's exception as the same type (so ``except FormatError`` still works), with its
    traceback and key in the message; WorkerError where the type cannot be built from a message."""
    try:
        error = kind(message)
        if str(error) == message:
            return error
    except Exception:  # noqa: BLE001  (a constructor wanting other arguments)
        pass
    return WorkerError(f"{kind.__name__}: {message}")


# --- sampling -----------------------------------------------------------------------------


class EpochSampler(torch.utils.data.Sampler[int]):
    """Every index once per epoch: in order, or shuffled. With a ``seed`` epoch ``e``'s order is a
    function of ``(seed, e)`` (as ``DistributedSampler``'s); without one it is drawn from torch's
    default generator (as ``RandomSampler``, so ``torch.manual_seed`` / ``seed_everything`` fix it).
    Each iteration moves on to the next epoch; :meth:`set_epoch` (Lightning calls it) sets it."""

    def __init__(self, n: int, shuffle: bool = False, seed: int | None = None) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if not self.shuffle:
            return iter(range(self.n))
        generator = torch.Generator()
        if self.seed is None:
            generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        else:
            generator.manual_seed(self.seed + epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


# --- the loader ------------------------------------------------------------------------------


class PatchLoader:
    """Batches of an :class:`LMDBPatchDataset` from worker processes, through reused shared memory.

    Args:
        dataset: the dataset (float or native mode; per-sample ``transforms`` are not applied:
            transform batches on the device instead, e.g. in ``on_after_batch_transfer``).
        batch_size: items per batch.
        shuffle: a new order each epoch (see :class:`EpochSampler`); not with ``sampler``.
        sampler: the indices of an epoch, in order (e.g. ``DistributedSampler``); its
            ``set_epoch`` is called by :meth:`set_epoch`.
        num_workers: worker processes; 0 reads in this process into two batches used in turn.
        drop_last: leave out a last, shorter batch.
        pin_memory: page-lock the slots for fast, asynchronous copies to a CUDA device (move batches
            with ``.to(device, non_blocking=True)``); with ``num_workers=0`` each batch is copied into
            pinned memory; a no-op, said once, without CUDA.
        seed: shuffling seed (reproducible epochs); ``None``: torch's default generator.
        slots: batch slots per worker; ``None``: 2, or 3 with one worker. A slot comes back a batch
            late (the caller's loop variable still holds the last batch when the next is asked
            for), so one worker needs 3 to fill one batch while the caller's step runs on another.
        timeout: seconds to wait for one batch before raising (0: no limit; a dead worker is
            noticed at once either way).
        multiprocessing_context: how workers start: ``"fork"`` (default where available: no
            interpreter start, no re-import of ``__main__``), ``"spawn"`` or ``"forkserver"``.

    A batch is the dict ``read_batch`` returns (``image`` or ``native``, ``mask``, ``key``,
    ``label``). Its tensors view a slot, which is written again only once no tensor views it (its
    storage's use count, checked when a batch is asked for). A batch still referenced a batch
    later (``list(loader)``, ``torch.cat`` over batches, a row kept) keeps its memory, and its
    slot gets new shared memory: every batch keeps its own pixels however long it is kept.

    Batches come in the sampler's order whatever the worker count (batch ``i`` is read by
    worker ``i % num_workers``). Workers start at the first iteration and stay until
    :meth:`close` (or ``del``, garbage collection, interpreter exit); an exception in a worker is
    raised here with its traceback and key; a worker that dies (SIGKILL, out of memory) raises
    :class:`WorkerLostError` at once and stops the others.
    """

    #: DataLoader-like: Lightning looks here and at ``sampler`` (for ``set_epoch``)
    batch_sampler = None

    def __init__(
        self,
        dataset: LMDBPatchDataset,
        batch_size: int = 1,
        shuffle: bool = False,
        sampler: torch.utils.data.Sampler | Sequence[int] | None = None,
        num_workers: int = 2,
        drop_last: bool = False,
        pin_memory: bool = False,
        seed: int | None = None,
        slots: int | None = None,
        timeout: float = 0.0,
        multiprocessing_context: str | None = None,
    ) -> None:
        if not isinstance(dataset, LMDBPatchDataset):
            raise ArgumentTypeError(f"PatchLoader reads an LMDBPatchDataset, not a {type(dataset).__name__}; use a "
                                    "torch DataLoader for other datasets")
        if dataset.transforms is not None:
            raise ConfigError("PatchLoader does not apply per-sample transforms (dataset.transforms); transform "
                              "batches on the device, or use a torch DataLoader")
        if slots is None:
            slots = 3 if num_workers == 1 else 2
        for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                   ("slots", slots, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{name}={value!r}: give an int >= {least}")
        if sampler is not None and shuffle:
            raise ConfigError("give shuffle=True or a sampler, not both (the sampler decides the order)")
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.drop_last, self.pin_memory, self.slots, self.timeout = drop_last, pin_memory, slots, timeout
        self.sampler = sampler if sampler is not None else EpochSampler(len(dataset), shuffle, seed)
        if multiprocessing_context is None:
            multiprocessing_context = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.context = multiprocessing.get_context(multiprocessing_context)
        self._pinning = _Pinning(pin_memory)
        self._workers: _Workers | None = None
        self._finalizer: weakref.finalize | None = None
        self._iteration = 0

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads (the sampler's ``set_epoch``)."""
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes' ids (empty before the first iteration and after :meth:`close`)."""
        return [] if self._workers is None or self._workers.closed else self._workers.pids

    def close(self) -> None:
        """Stop the workers; the next iteration starts new ones."""
        if self._finalizer is not None:
            self._finalizer()  # runs _Workers.close once
        self._workers, self._finalizer = None, None

    def __enter__(self) -> "PatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_workers": None, "_finalizer": None}  # a copy starts its own workers

    def _index_batches(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for index in self.sampler:
            batch.append(int(index))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def _finish(self, batch: dict[str, Any], indices: list[int]) -> dict[str, Any]:
        """The small fields, made here: the same as ``read_batch`` makes them."""
        batch.update(self.dataset.fields(indices))
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._iteration += 1
        if self.num_workers == 0:
            return self._read_here(self._iteration)
        return self._read_in_workers(self._iteration)

    def _read_here(self, iteration: int) -> Iterator[dict[str, Any]]:
        # two full batches filled in turn (the caller's loop variable holds the last one), each
        # again once nothing views it; while both are viewed (batches kept) a batch is read anew
        buffers: list[tuple[dict[str, Any], int]] = []  # the outputs, their _uses with no batch out
        for indices in self._index_batches():
            if iteration != self._iteration:
                raise RuntimeError("this PatchLoader iterator was replaced by a newer one (one at a time)")
            free = next((tensors for tensors, idle in buffers if _uses(tensors) == idle), None)
            if free is None and len(buffers) < 2 and len(indices) == self.batch_size:
                free = self.dataset._read(indices, fields=False)  # the fields are made per batch
                buffers.append((free, _uses(free)))
            elif free is not None:
                self.dataset._read(indices, into=_rows(free, len(indices)), fields=False)
            tensors = self.dataset._read(indices, fields=False) if free is None else _rows(free, len(indices))
            batch = self._finish(tensors, indices)
            yield _pinned_copy(batch) if self._pinning.mode else batch
            del batch, tensors, free  # only the caller's references count

    def _start(self) -> _Workers:
        if self._workers is None or self._workers.closed:
            if self._finalizer is not None:
                self._finalizer()
            self._workers = _Workers(self.dataset, self.num_workers, self.batch_size, self.slots, self.context,
                                     self._pinning, self.timeout)
            self._finalizer = weakref.finalize(self, self._workers.close)
        return self._workers

    def _read_in_workers(self, iteration: int) -> Iterator[dict[str, Any]]:
        workers = self._start()
        count = self.num_workers
        batches = self._index_batches()
        queue: deque[list[int]] = deque()  # index batches sent, not yet yielded
        sent = received = 0
        exhausted = False
        try:
            workers.settle()  # the slots of an abandoned iteration
            while True:
                if iteration != self._iteration:
                    raise RuntimeError("this PatchLoader iterator was replaced by a newer one (one at a time)")
                workers.recycle()
                while not exhausted and workers.has_free(sent % count):  # read ahead as far as slots allow
                    indices = next(batches, None)
                    if indices is None:
                        exhausted = True
                        break
                    workers.submit(sent % count, sent, indices)
                    queue.append(indices)
                    sent += 1
                if not queue:
                    return
                w = received % count
                slot = workers.result(w, received)
                indices = queue.popleft()
                received += 1
                batch = self._finish(_rows(workers.rings[w][slot], len(indices)), indices)
                if self._pinning.mode == "copy":
                    batch = _pinned_copy(batch)
                    workers.free[w].append((slot, None, False))
                else:
                    workers.hold(w, slot)
                yield batch
                del batch  # only the caller's references count when the slot comes round again
        except KeyboardInterrupt:
            # Ctrl-C while this code ran (not while the caller's loop body did) may have cut a send
            # or a receive short: which tasks are in flight is no longer known, so stop the workers
            # (the next iteration starts new ones) rather than misread a late answer
            workers.close()
            raise
