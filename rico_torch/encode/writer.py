"""The ordered, deterministic, resumable LMDB writer.

Determinism (byte-identical ``data.mdb`` whatever the worker count, as rico-hdl): sources in
the dataset's fixed order, patches in sorted path order, 512 puts per write transaction
(chunks never span two sources), puts with overwrite forbidden, and a map size that is a pure
function of what is already committed.

Resumability: a transaction commits all of its chunk or none of it, so the LMDB itself says
which chunks are done: a chunk with any of its keys present is committed. Re-running the
same command skips those and redoes the rest in the same order, which yields the same bytes
as an uninterrupted run. ``manifest.json`` (``"complete": false`` until the end) records
which dataset and inputs the target belongs to.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import shutil
import sys
import tempfile
import time
from array import array
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import lmdb
import numpy as np

from .. import __version__
from .._process import die_with_parent, quiet_resource_tracker, reuse_freed_memory
from ..catalog import DATASETS, Dataset, Source, get_dataset
from ..errors import InputError, TargetError
from ..format import parse_header
from ..manifest import (INDEX, LOCK, MANIFEST, Entries, Extension, Manifest, build_columns, digest64, read, storage_problem,
                        write)
from .discover import Patch, SkipPatch, SourcePatches, WindowList, patch_keys
from .read import BandTable, parts_digest, read_patch, value_digest, value_parts

TXN_SIZE = 512  # puts per write transaction, as rico-hdl
TASK_SIZE = 32  # patches per worker task: amortises process-pool overhead
READ_AHEAD_BYTES = 1 << 30  # a chunk of more values than this is read ahead one chunk at a time, not two
AHEAD_BYTES = 256 << 20  # windows routed by source block: values read ahead so that no worker waits
AHEAD_CHUNKS = 256  # ... in at most this many chunks (each task's shared memory is a file of its own)
_IOV_MAX = 512  # buffers per pwritev call (POSIX guarantees at least 16; Linux takes 1024)
LMDB_FILES = ("data.mdb", "lock.mdb")
STAGING = ".overwrite"  # where --overwrite builds the replacement
SKIP_LOG = "skipped.jsonl"  # an unfinished encode's invalid patches, for a resumed run (see _SkipLog)
#: What an encode writes, the manifest an upgrade replaced and the demo's metadata
OUR_FILES = (*LMDB_FILES, MANIFEST, INDEX, LOCK, STAGING, SKIP_LOG, MANIFEST + ".v1", "metadata.parquet")
#: Where the catalog's side files are copied (e.g. SatlasPretrain's metadata/): ours too.
SIDE_FILE_ROOTS = tuple(sorted({Path(g).parts[0] for d in DATASETS.values() for g in d.side_files}))
MIN_MAP_SIZE = 64 << 20
DISK_MARGIN = 4 << 20  # free space below a transaction's bytes plus this when a commit fails: a full disk


@dataclass
class Chunk:
    source: Source
    patches: list[Patch]


@dataclass
class EncodeResult:
    target: Path
    written: int  # patches in the LMDB now, committed by this run or an earlier one
    skipped: list[dict]  # patches left out one by one (unreadable, --skip-invalid), as the manifest lists them
    seconds: float
    bytes: int
    counts: dict[str, int]
    already_complete: bool = False
    resumed: int = 0  # of ``written``, patches an earlier, interrupted run had committed
    repaired: str = ""  # what ``repair`` said, where a complete target's keys.index was rebuilt
    leftover: str = ""  # a half-built ``.overwrite/`` an interrupted ``--overwrite`` left
    skipped_nodata: dict[str, int] = field(default_factory=dict)  # per source: windows left out as nodata (counted)

    def nodata_and_invalid(self) -> tuple[int, list[dict]]:
        """How many patches were skipped as nodata, and the entries of those that were invalid (a
        manifest of an earlier version lists nodata windows one by one too: counted here)."""
        listed, invalid = split_skipped(self.skipped)
        return sum(self.skipped_nodata.values()) + len(listed), invalid

    def summary(self) -> str:
        if self.already_complete:
            done = (f"{self.repaired}; the encode was already complete ({self.written:,} patches)" if self.repaired
                    else f"{self.target}: already complete ({self.written:,} patches); nothing to do")
            return done + (f"; {self.leftover}" if self.leftover else "")
        per_source = ", ".join(f"{k} {v:,}" for k, v in self.counts.items())
        new = self.written - self.resumed
        rate = new / self.seconds if self.seconds > 0 else 0.0
        what = f"{new:,} patches"
        if self.resumed:
            what = f"{new:,} new patches, {self.resumed:,} already committed (resumed)"
        line = (
            f"wrote {what} ({per_source}) to {self.target} in {self.seconds:.1f} s "
            f"({rate:,.0f} patches/s, {self.bytes / 1e6:,.1f} MB)"
        )
        nodata, invalid = self.nodata_and_invalid()
        if nodata:
            line += f"; skipped {nodata:,} as nodata (too few valid pixels)"
        if invalid:
            line += f"; skipped {len(invalid):,} invalid: " + ", ".join(s["key"] for s in invalid[:5])
            line += " ..." if len(invalid) > 5 else ""
        return line


def split_skipped(skipped: list[dict]) -> tuple[list[dict], list[dict]]:
    """Listed skipped patches: those the reader left out as nodata (only in manifests of earlier
    versions: nodata skips are counted now, ``skipped_nodata``), and those that were invalid."""
    nodata = [s for s in skipped if s.get("kind") == "nodata"]
    return nodata, [s for s in skipped if s.get("kind") != "nodata"]


def map_size_for(used: int, incoming: int) -> int:
    """Map size for a transaction: a power of two >= 2x the data after it (a pure function)."""
    size = MIN_MAP_SIZE
    while size < 2 * (used + incoming):
        size <<= 1
    return size


# --- worker side ----------------------------------------------------------------------


class Block(NamedTuple):
    """Windows a maker cut and laid out together (e.g. one row of a scene's windows): each row of
    ``values`` is one whole value (header and bands), all with band table ``table``."""

    keys: list[str]
    values: np.ndarray  # (n, value length) uint8
    table: BandTable
    moments: np.ndarray | None  # (n, bands, 5): each window's statistics (``reader.moments``' rows)


@dataclass
class Batch:
    """A worker task's patches, column by column, so that no object per patch crosses the pool's
    pipe or lives in the writer: the written patches' keys, value lengths, 64-bit digests (the
    sidecar's) and statistics in order, the sum of their full digests (the content hash's share),
    their band tables, and the patches left out (key, why, whether the reader skipped it as nodata).

    The values lie one after the other: in ``data``, or (``data`` None) in the task's shared
    memory until the writer takes them (:meth:`_Handoff.take`). ``full``: each written patch's
    whole digest, kept only where no value is made (``verify``).
    """

    keys: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    digests: array = field(default_factory=lambda: array("Q"))
    content: int = 0
    tables: Counter = field(default_factory=Counter)
    moments: list = field(default_factory=list)  # (n, bands, 5) arrays: the written patches' statistics
    unmeasured: bool = False  # some written patch came without statistics
    skipped: list[tuple[str, str, bool]] = field(default_factory=list)
    data: bytes | memoryview | None = b""
    full: list[int] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return sum(self.lengths)

    def values(self) -> list[memoryview]:
        """Each written patch's value, a view of ``data``."""
        view, out, at = memoryview(self.data), [], 0
        for length in self.lengths:
            out.append(view[at : at + length])
            at += length
        return out

    def statistics(self) -> np.ndarray | None:
        """(n, bands, 5): each written patch's statistics, None where the reader made none."""
        if self.unmeasured or not self.moments:
            return None
        return np.concatenate(self.moments)


class _BatchWriter:
    """Builds a task's :class:`Batch`: values written into the shared memory ``fd`` in runs of up to
    :data:`_IOV_MAX` buffers (no system call per value), or gathered into ``data``."""

    def __init__(self, fd: int, values: bool) -> None:
        self.fd, self.values = fd, values
        self.batch = Batch(full=None if values else [])
        self.pending: list = []  # buffers not yet written
        self.at = 0  # bytes written into the shared memory

    def add(self, key: str, parts: list, table: BandTable, moments) -> None:
        digest = parts_digest(key.encode(), parts)
        self._count(key, digest, sum(memoryview(p).nbytes for p in parts), table)
        if moments is None:
            self.batch.unmeasured = True
        else:
            self.batch.moments.append(np.asarray(moments, np.float64)[None])
        if self.values:
            self._put(parts)

    def add_block(self, block: Block) -> None:
        values, b = block.values, self.batch
        digests = [parts_digest(key.encode(), [value]) for key, value in zip(block.keys, values)]
        b.keys.extend(block.keys)
        b.lengths.extend([values.shape[1]] * len(digests))
        b.digests.extend([digest64(d) for d in digests])
        b.content = (b.content + sum(digests)) % (1 << 256)
        if b.full is not None:
            b.full.extend(digests)
        b.tables[block.table] += len(block.keys)
        if block.moments is None:
            self.batch.unmeasured = True
        else:
            self.batch.moments.append(block.moments)
        if self.values and len(block.keys):
            self._put([values])

    def skip(self, key: str, why: str, nodata: bool) -> None:
        self.batch.skipped.append((key, why, nodata))

    def _count(self, key: str, digest: int, length: int, table: BandTable | None) -> None:
        b = self.batch
        b.keys.append(key)
        b.lengths.append(length)
        b.digests.append(digest64(digest))
        b.content = (b.content + digest) % (1 << 256)
        if b.full is not None:
            b.full.append(digest)
        if table is not None:
            b.tables[table] += 1

    def _put(self, parts: list) -> None:
        self.pending.extend(m.cast("B") for m in map(memoryview, parts) if m.nbytes)
        if len(self.pending) >= _IOV_MAX:
            self._flush()

    def _flush(self) -> None:
        if self.fd >= 0:
            self.at += _write_parts(self.fd, self.pending, self.at)
            self.pending = []

    def done(self) -> Batch:
        if not self.values:
            self.batch.data = None
        elif self.fd >= 0:
            self._flush()
            self.batch.data = None  # in the shared memory
        else:
            self.batch.data = b"".join(self.pending)
        return self.batch


def encode_task(dataset_name: str, source_name: str, patches: list[Patch], skip_invalid: bool,
                handoff: str | None = None, values: bool = True) -> Batch:
    """Read and encode patches into a :class:`Batch`; each value's digest and band table are made
    here, beside the value.

    ``handoff``: the path of the main process's shared memory (a memfd, see :class:`_Handoff`)
    for this task: the values are written into it one after the other (header and bands straight
    from the decoded arrays, no blob in between), so nothing large is pickled through the pool's
    pipe. Where it cannot be opened, values come back as bytes. ``values=False``: digests only
    (``verify``).
    """
    fd = -1
    if handoff is not None and values:
        try:
            fd = os.open(handoff, os.O_RDWR)
        except OSError:
            fd = -1  # e.g. /proc hidden: pickled values, slower but the same
    out = _BatchWriter(fd, values)
    try:
        for item in _encoded(dataset_name, source_name, patches, values):
            if isinstance(item, Block):
                out.add_block(item)
                continue
            key, parts, table, moments, error = item
            if isinstance(error, SkipPatch):  # the reader's own decision, whatever skip_invalid says
                out.skip(key, str(error), True)
            elif error is not None:
                if not skip_invalid:
                    raise error
                out.skip(key, str(error), False)
            else:
                out.add(key, parts, table, moments)
        return out.done()
    finally:
        if fd >= 0:
            os.close(fd)


#: one patch as :func:`encode_task` takes it: (key, the value's buffers, band table, statistics, error)
Item = tuple[str, list | None, BandTable | None, tuple | None, Exception | None]


def _encoded(dataset_name: str, source_name: str, patches, measure: bool):
    """Each patch as an :data:`Item`, in order: windows whose maker encodes them itself (from the
    source blocks they cover, read once) through it; other patches read one by one."""
    make = getattr(patches, "make", None)
    if hasattr(make, "encoded"):
        yield from make.encoded(patches.rows, measure)
        return
    prefetch = getattr(patches, "prefetch", None)  # windows: the source blocks they cover, read once
    if prefetch is not None:
        prefetch()
    source = None  # looked up only for patches read from the source's band files
    for patch in patches:
        if patch.reader is None:
            source = source or get_dataset(dataset_name).source(source_name)
        yield patch_item(source, patch, measure)


def patch_item(source: Source | None, patch: Patch, measure: bool) -> Item:
    """One patch read and laid out as its value's buffers (:func:`value_parts`), with the reader's
    statistics of it (``reader.moments``, where it has them and ``measure``); a patch the reader
    skips or cannot read gives its error instead."""
    try:
        arrays = patch_bands(source, patch)
        parts, table = value_parts(arrays)
        moments = getattr(patch.reader, "moments", None)
        return patch.key, parts, table, moments(arrays) if measure and moments is not None else None, None
    except (SkipPatch, InputError) as e:
        return patch.key, None, None, None, e


def patch_bands(source: Source | None, patch: Patch) -> dict[str, np.ndarray]:
    """A patch's bands, decoded: by its own reader, or from the source's band files."""
    return patch.reader() if patch.reader is not None else read_patch(source, patch.path, patch.band_files(source))


def _write_parts(fd: int, parts: list, at: int) -> int:
    """Write the buffers one after the other at offset ``at``; the bytes written."""
    views = [m.cast("B") for m in map(memoryview, parts) if m.nbytes]  # an empty band has nothing to write
    done = 0
    total = sum(len(v) for v in views)
    while done < total:
        n = os.pwritev(fd, views[:_IOV_MAX], at + done)
        if n == 0:
            raise OSError(f"shared memory took no more bytes ({done} of {total} written)")
        done += n
        while n and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]
    return total


def worker_pool(num_workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers exit when this process dies, even by ``kill -9``.

    Workers hold their task queue's write end, so they would wait on it forever, and keep the
    multiprocessing resource tracker (which exits once nobody holds its pipe) alive with them.
    """
    quiet_resource_tracker()  # a kill -9 of the encoder: no "leaked semaphore" notice
    # spawn: GDAL and LMDB state must not be inherited through fork
    return ProcessPoolExecutor(num_workers, mp_context=get_context("spawn"),
                               initializer=_start_worker, initargs=(os.getpid(),))


def _start_worker(parent: int) -> None:
    die_with_parent(parent)
    reuse_freed_memory()  # decoded bands: megabytes allocated and freed per patch


# --- target handling ------------------------------------------------------------------


def _fingerprint(dataset: Dataset, discovered: list[SourcePatches], identity: str = "") -> str:
    h = sha256(dataset.name.encode())
    if identity:
        h.update(b"\0options\0" + identity.encode())
    for sp in discovered:
        h.update(b"\0source\0" + sp.source.name.encode())
        keys = patch_keys(sp.patches)
        while block := list(islice(keys, 1 << 16)):  # "\0" + key, key after key: hashed in blocks
            h.update(b"\0" + "\0".join(block).encode())
    return h.hexdigest()


def read_manifest(target: Path, fix: str = "") -> Manifest | None:
    """The target's manifest (:func:`rico_torch.manifest.read`), None where there is none (an
    LMDB rico-hdl wrote); ``fix`` ends the error message of an unreadable one."""
    manifest = read(Path(target), fix, TargetError)
    if manifest is not None and not {"fingerprint", "dataset"} <= set(manifest):
        raise TargetError(f"{Path(target) / MANIFEST}: not a rico_torch manifest{fix}")
    return manifest


OVERWRITE_FIX = "; pass --overwrite to start afresh"


class TargetLock:
    """An exclusive lock on the target, so a second encoder is refused, not interleaved."""

    def __init__(self, target: Path) -> None:
        self.path = target / LOCK
        self.fd = -1

    def __enter__(self) -> "TargetLock":
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            raise TargetError(f"{self.path.parent}: no such directory") from None
        except OSError as e:  # read-only storage: say so, as encode does
            raise TargetError(f"{self.path.parent}: target is not writable ({e.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise TargetError(f"{self.path.parent}: another encoder is writing this target; wait for it") from None
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _ours(name: str) -> bool:
    """Files rico_torch puts in a target: the LMDB, manifest, lock, staging, temporary files, the
    catalog's side files (``metadata/``) and the DataModules' cached statistics (``stats-*.json``)."""
    return (name in OUR_FILES or name in SIDE_FILE_ROOTS or name.endswith(".tmp")
            or (name.startswith("stats-") and name.endswith(".json")))


def _prepare_target(target: Path, overwrite: bool) -> None:
    """Create the target, or check it holds nothing but a rico_torch encode (or, with
    ``overwrite``, nothing but an LMDB)."""
    if target.exists() and not target.is_dir():
        raise TargetError(f"{target}: target exists and is not a directory")
    if target.exists():
        foreign = sorted(p.name for p in target.iterdir() if not _ours(p.name))
        if foreign:
            raise TargetError(
                f"{target}: target holds other files ({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); "
                "choose an empty or new directory"
            )
        if not overwrite and (target / "data.mdb").exists() and not (target / MANIFEST).exists():
            raise TargetError(
                f"{target}: target holds an LMDB that rico_torch did not write; "
                "pass --overwrite to replace it or choose another directory"
            )
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / ".write-test.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TargetError(f"{target}: target is not writable ({e.strerror})") from None


# --- the writer -------------------------------------------------------------------------


class _KeyLog:
    """The written keys and their 64-bit digests, source by source in write order, kept in unlinked
    temporary files (memory does not grow with the key count; 10M keys take ~250 MB of disk beside
    the LMDB), and the sidecar's key and digest columns made from them (file-backed arrays)."""

    BUFFER = 1 << 20  # bytes gathered before they are written out
    BLOCK = 1 << 20  # keys laid out as fixed-width rows at a time

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self.files: tuple | None = None  # (key bytes, lengths, digests), opened on first use
        self.buffers = (bytearray(), array("H"), array("Q"))
        self.runs: list[list] = []  # [source, first row, end row]: runs of one source in write order
        self.rows = self.width = 0

    def add(self, source: str, keys: list[bytes], digests) -> None:
        if not keys:
            return
        if self.runs and self.runs[-1][0] == source:
            self.runs[-1][2] += len(keys)
        else:
            self.runs.append([source, self.rows, self.rows + len(keys)])
        self.rows += len(keys)
        raw, lengths, digest64s = self.buffers
        raw.extend(b"".join(keys))
        lengths.extend(map(len, keys))
        digest64s.extend(digests)
        self.width = max(self.width, max(map(len, keys)))
        if len(raw) >= self.BUFFER:
            self._flush()

    def count(self, source: str) -> int:
        return sum(end - first for s, first, end in self.runs if s == source)

    def _flush(self) -> None:
        if self.files is None:
            self.files = tuple(tempfile.TemporaryFile(dir=self.directory) for _ in range(3))
        for f, buffer in zip(self.files, self.buffers):
            f.write(buffer)
            del buffer[:]

    def _mapped(self, which: int, dtype) -> np.ndarray:
        f = self.files[which]
        f.flush()
        size = f.seek(0, os.SEEK_END)
        return np.memmap(f, dtype=dtype, mode="r") if size else np.zeros(0, dtype)

    def columns(self, order: list[str]) -> tuple[dict, np.ndarray, np.ndarray]:
        """(source -> row range, keys, digests) of the written keys, source by source in ``order``."""
        sources = list(dict.fromkeys([s for s in order if self.count(s)] + [r[0] for r in self.runs]))
        ranges, at = {}, 0
        for source in sources:
            ranges[source] = (at, at + self.count(source))
            at += ranges[source][1] - ranges[source][0]
        if not self.rows:
            return ranges, np.zeros(0, "S1"), np.zeros(0, np.uint64)
        self._flush()
        raw, lengths = self.files[0], self.files[1]
        raw.seek(0)
        lengths.seek(0)
        width = self.width
        out = tempfile.TemporaryFile(dir=self.directory)
        for start in range(0, self.rows, self.BLOCK):  # fixed-width rows, a block at a time (read, not mapped)
            n = np.frombuffer(lengths.read(2 * min(self.BLOCK, self.rows - start)), np.uint16).astype(np.int64)
            block = np.zeros((len(n), width), np.uint8)
            block[np.arange(width) < n[:, None]] = np.frombuffer(raw.read(int(n.sum())), np.uint8)
            out.write(block.data)
        out.flush()
        keys = np.memmap(out, dtype=f"S{width}", mode="r", shape=(self.rows,))
        digests = self._mapped(2, np.uint64)
        if [s for s, _, _ in self.runs] != sources:
            # a source's keys in several runs, or sources out of order (not an encode's): gathered in memory
            rows = np.concatenate([np.arange(first, end) for s in sources for r, first, end in self.runs if r == s])
            keys, digests = keys[rows], digests[rows]
        return ranges, keys, digests

    def close(self) -> None:
        for f in self.files or ():
            f.close()  # arrays mapped from it stay readable until they go
        self.files = None


@dataclass
class _Stats:
    """What the manifest reports, derived from the values actually written."""

    counts: Counter = field(default_factory=Counter)
    tables: Counter = field(default_factory=Counter)  # (source, band table) -> values with it
    log: _KeyLog = field(default_factory=_KeyLog)  # the written keys and digests
    content_hash: int = 0
    bytes: int = 0
    nodata: Counter = field(default_factory=Counter)  # source -> patches its reader skipped as nodata
    extensions: list = field(default_factory=list)  # Extensions that observe every value added
    pending: dict = field(default_factory=dict)  # (extension, source) -> the current chunk's statistics rows

    def add(self, source: str, key: str, value: bytes, digest: int | None = None,
            table: BandTable | None = None) -> None:
        """Count one value written (a resumed run's stored value; option II's survey); ``digest``
        and ``table`` (its band table), where known, save hashing and parsing it here."""
        for i, extension in enumerate(self.extensions):
            if hasattr(extension, "measure"):
                self._pending(i, source).append(np.asarray(extension.measure(source, key, value), np.float64)[None])
            else:
                extension.observe(source, key, value)
        raw = key.encode()
        if digest is None:
            digest = value_digest(raw, value)
        self.counts[source] += 1
        self.log.add(source, [raw], [digest64(digest)])
        self.bytes += len(value)
        self.content_hash = (self.content_hash + digest) % (1 << 256)
        if table is None:
            table = tuple((name, info.dtype.name, info.shape) for name, info in parse_header(value, key).items())
        self.tables[source, table] += 1

    def add_batch(self, source: str, batch: Batch, keys: list[bytes], values: list) -> None:
        """Count a worker task's values written (``keys``: its keys encoded; ``values``: views of the
        values; both in order)."""
        if not len(batch):
            return
        measured = batch.statistics()
        for i, extension in enumerate(self.extensions):
            if measured is not None and hasattr(extension, "measure"):
                self._pending(i, source).append(measured)
                continue
            for key, value in zip(batch.keys, values):  # it may keep the value: a copy, not a view
                if hasattr(extension, "measure"):
                    row = extension.measure(source, key, bytes(value))
                    self._pending(i, source).append(np.asarray(row, np.float64)[None])
                else:
                    extension.observe(source, key, bytes(value))
        self.counts[source] += len(batch)
        self.log.add(source, keys, batch.digests)
        self.bytes += batch.nbytes
        self.content_hash = (self.content_hash + batch.content) % (1 << 256)
        for table, count in batch.tables.items():
            self.tables[source, table] += count

    def _pending(self, extension: int, source: str) -> list:
        return self.pending.setdefault((extension, source), [])

    def end_chunk(self) -> None:
        """A write chunk is counted: its values' statistics go to their extension together (each
        extension reduces a chunk's rows in one fixed way, so that the result depends on the
        chunks, never on how the workers split them or on a resumed run)."""
        for (i, source), rows in self.pending.items():
            self.extensions[i].add_moments(source, np.concatenate(rows))
        self.pending.clear()

    def add_key(self, source: str, key: str) -> None:
        """Count a key (its value unread: option II's windows, rico_torch.data.live)."""
        self.counts[source] += 1
        self.log.add(source, [key.encode()], [0])

    def index(self, order: list[str]) -> tuple[dict, np.ndarray, np.ndarray]:
        """(source -> row range, keys, digests) of the written keys, source by source in ``order``."""
        return self.log.columns(order)

    def band_table(self) -> dict:
        by_band: dict = {}  # source -> band -> Counter of (dtype, shape)
        for (source, values), n in self.tables.items():
            for name, dtype, shape in values:
                by_band.setdefault(source, {}).setdefault(name, Counter())[(dtype, shape)] += n
        table = {}
        for source, bands in by_band.items():
            table[source] = {}
            for name, seen in sorted(bands.items()):
                (dtype, shape), _ = seen.most_common(1)[0]
                entry = {"dtype": dtype, "shape": list(shape)}
                if len(seen) > 1:  # e.g. UC Merced images that are not 256x256
                    entry["shape"] = None
                    entry["shapes"] = {"x".join(map(str, s)): n for (_, s), n in seen.most_common()}
                table[source][name] = entry
        return table


class _SkipLog:
    """The invalid patches an unfinished encode skipped, one JSON line each, written before the
    transaction of their chunk commits: a resumed run finds a committed chunk's missing patches
    here, and counts those it does not find as windows skipped as nodata (no record is kept of
    those, however many). Removed once the manifest lists them."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / SKIP_LOG

    def read(self) -> dict[str, dict]:
        """key -> entry of the invalid patches an earlier run skipped (its last entry per key)."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return {}
        entries = {}
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:  # blank, or cut short by a kill (its chunk never committed)
                continue
            entries[entry["key"]] = entry
        return entries

    def add(self, entries: list[dict]) -> None:
        with open(self.path, "a") as f:  # on a line of their own, whatever a kill cut short before
            f.write("".join("\n" + json.dumps(e) for e in entries) + "\n")
            f.flush()
            os.fsync(f.fileno())  # on disk before the chunk's commit is (only chunks with invalid patches)


def _chunks(discovered: list[SourcePatches]) -> list[Chunk]:
    return [
        Chunk(sp.source, sp.patches[i : i + TXN_SIZE])
        for sp in discovered
        for i in range(0, len(sp.patches), TXN_SIZE)
    ]


#: Off a terminal (a batch job's log), a progress line every this many seconds.
PROGRESS_SECONDS = 60.0


def progress_bar(total: int, quiet: bool, initial: int = 0):
    """A tqdm bar on stderr (patches done of total, rate, time left); off a terminal, a line every
    :data:`PROGRESS_SECONDS` (:class:`ProgressLines`); nothing with --quiet. ``initial``: done already
    (a resumed run's committed patches: not in the rate)."""
    from tqdm import tqdm

    if not quiet and not sys.stderr.isatty():
        return ProgressLines(total, initial)
    return tqdm(total=total, initial=initial, unit="patch", disable=True if quiet else None, dynamic_ncols=True,
                file=sys.stderr)


class ProgressLines:
    """Progress for a log file: ``12,288 of 480,038 patches (2.6%), 310 patches/s, about 25 min left``,
    one line every :data:`PROGRESS_SECONDS`, none for a run shorter than that."""

    def __init__(self, total: int, initial: int = 0) -> None:
        self.total, self.done, self.initial = total, initial, initial
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < PROGRESS_SECONDS or self.done >= self.total:
            return
        self.last = now
        rate = (self.done - self.initial) / max(now - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        when = f"{left / 60:,.0f} min" if left >= 120 else f"{left:,.0f} s"
        print(f"{self.done:,} of {self.total:,} patches ({100 * self.done / max(self.total, 1):.1f}%), "
              f"{rate:,.0f} patches/s, about {when} left", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def encode_dataset(
    dataset: Dataset,
    discovered: list[SourcePatches],
    target: Path,
    *,
    num_workers: int,
    overwrite: bool = False,
    skip_invalid: bool = False,
    quiet: bool = False,
    sources_info: dict[str, str] | None = None,
    shard: tuple[int, int] | None = None,
    extension: Extension | list[Extension] | None = None,
) -> EncodeResult:
    """Write the discovered patches into ``target`` (see the module docstring for guarantees).

    With ``overwrite``, the new LMDB is built in ``target/.overwrite`` and moved over the old
    one only once complete, so a failed or interrupted overwrite leaves the old data intact;
    re-running it with the same inputs resumes in ``.overwrite``. A target whose manifest says
    complete but whose ``data.mdb`` is missing or holds another number of keys is encoded
    again the same way (the user is told what was found). ``extension``: what callers add to the
    manifest (:class:`rico_torch.manifest.Extension`; a catalog's ``manifest_extra`` as
    :class:`~rico_torch.manifest.Entries`).
    """
    start = time.perf_counter()
    target = Path(target)
    _prepare_target(target, overwrite)
    extension = [] if extension is None else list(extension) if isinstance(extension, (list, tuple)) else [extension]
    fingerprint = _fingerprint(dataset, discovered, "".join(e.identity for e in extension))
    extra = {"shard": {"index": shard[0], "count": shard[1], "rule": "zlib.crc32(key) % count"}} if shard else {}
    with TargetLock(target):
        existing = any((target / name).exists() for name in (*LMDB_FILES, MANIFEST))
        rebuild = overwrite and existing
        if not overwrite:
            previous = read_manifest(target, OVERWRITE_FIX)
            if previous is not None and previous["fingerprint"] != fingerprint:
                what = f"{previous.get('dataset')} ({previous.get('patches', 'an unfinished set of')} patches)"
                raise TargetError(
                    f"{target}: target holds an encode of {what} from other inputs; "
                    "pass --overwrite to replace it or choose another directory"
                )
            if previous is not None and previous.get("complete"):
                problem = _disagreement(target, previous)
                if problem is None:
                    from .repair import index_problem  # a missing or damaged keys.index: rebuilt

                    broken = index_problem(target)
                    repaired = _rebuild_index(dataset, discovered, target, previous, broken, num_workers, skip_invalid,
                                              quiet, extension) if broken else ""
                    return EncodeResult(target, previous["patches"], previous.get("skipped", []), 0.0,
                                        previous.get("bytes", 0), previous.get("counts", {}), already_complete=True,
                                        repaired=repaired, leftover=_leftover(target),
                                        skipped_nodata=previous.get(NODATA_PER_SOURCE, {}))
                print(f"{target}: {problem}; encoding again (the old files are replaced once the new encode "
                      "is complete)", file=sys.stderr)
                rebuild = True
        if rebuild:
            result = _encode_into(dataset, discovered, _staging(target, fingerprint), fingerprint, num_workers,
                                  skip_invalid, quiet, sources_info, extra, extension)
            _swap_in(target)
        else:
            result = _encode_into(
                dataset, discovered, target, fingerprint, num_workers, skip_invalid, quiet, sources_info, extra,
                extension)
    manifest, stats, skipped, resumed = result
    return EncodeResult(target, manifest["patches"], skipped, time.perf_counter() - start, stats.bytes,
                        dict(stats.counts), resumed=resumed, skipped_nodata=manifest.get(NODATA_PER_SOURCE, {}))


def _disagreement(target: Path, manifest: dict) -> str | None:
    """Why a target whose manifest says complete is not (data.mdb gone or holding other keys), or None."""
    if not (target / "data.mdb").exists():
        return f"{MANIFEST} says complete, but there is no data.mdb"
    try:
        env = lmdb.open(str(target), readonly=True, lock=False, subdir=True, max_dbs=0)
        try:
            entries = env.stat()["entries"]
        finally:
            env.close()
    except lmdb.Error as e:
        return f"data.mdb is unreadable ({type(e).__name__}: {e})"
    if entries != manifest.get("patches"):
        return f"data.mdb holds {entries:,} patches, {MANIFEST} says {manifest.get('patches', 0):,}"
    return None


def _leftover(target: Path) -> str:
    """What to say of a ``.overwrite/`` an interrupted ``--overwrite`` left ("" where there is none)."""
    staging = target / STAGING
    if not staging.is_dir():
        return ""
    size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    return (f"{staging} ({size / 1e6:,.1f} MB) is a replacement an interrupted --overwrite left half built: re-run "
            "that command with --overwrite to finish it, or delete the folder")


def _staging(target: Path, fingerprint: str) -> Path:
    """``target/.overwrite``, kept where an interrupted rebuild of the same inputs left it (to resume)."""
    staging = target / STAGING
    try:
        started = read_manifest(staging) if staging.is_dir() else None
    except TargetError:
        started = None
    if started is None or started["fingerprint"] != fingerprint:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    return staging


def _swap_in(target: Path) -> None:
    """Replace the target's LMDB, manifest and per-key index by the complete encode in its staging
    directory (the manifest last: it names the index it belongs to)."""
    staging = target / STAGING
    (target / MANIFEST).unlink(missing_ok=True)  # never leave a manifest describing other data
    for name in (*LMDB_FILES, INDEX):  # os.replace: a reader never finds the target without a data.mdb
        if (staging / name).exists():
            os.replace(staging / name, target / name)
        else:
            (target / name).unlink(missing_ok=True)
    os.replace(staging / MANIFEST, target / MANIFEST)
    for stale in target.glob("stats-*.json"):  # statistics of the data just replaced
        stale.unlink()
    shutil.rmtree(staging, ignore_errors=True)


def _encode_into(dataset, discovered, directory, fingerprint, num_workers, skip_invalid, quiet, sources_info, extra,
                 extension=None):
    base = {
        "format": "rico-hdl: LMDB of safetensors (band name -> array)",
        "encoder": "rico_torch",
        "encoder_version": __version__,
        "dataset": dataset.name,
        "sources": sources_info or {sp.source.name: str(sp.root) for sp in discovered},
        "fingerprint": fingerprint,
        "complete": False,
        **extra,
    }
    write(directory, base)
    stats, skipped, resumed = _write(dataset, discovered, directory, num_workers, skip_invalid, quiet,
                                     _observer(extension))
    ranges, keys, columns = _index_columns(dataset, discovered, stats, extension)
    facts = {
        **base,
        "complete": True,
        "patches": sum(stats.counts.values()),
        "counts": dict(stats.counts),
        "bytes": stats.bytes,
        "content_hash": f"{stats.content_hash:064x}",
        "bands": stats.band_table(),
        "classes": list(dataset.classes),
        "skipped": skipped,
        **_nodata_facts(discovered, stats),
    }
    for e in extension or ():
        facts.update(e.manifest(keys))
    manifest = write(directory, facts, ranges, columns)
    stats.log.close()
    (directory / SKIP_LOG).unlink(missing_ok=True)  # the manifest lists them now
    return manifest, stats, skipped, resumed


#: The manifest's count of windows skipped as nodata, per source (``skipped_nodata``: their sum)
NODATA_PER_SOURCE = "skipped_nodata_per_source"


def _nodata_facts(discovered: list[SourcePatches], stats: _Stats) -> dict:
    """The manifest's counts of patches skipped as nodata (too few valid cells): per source of
    windows (whose readers skip so), and their sum; none for sources of other patches."""
    per_source = {sp.source.name: stats.nodata[sp.source.name] for sp in discovered
                  if isinstance(sp.patches, WindowList) or stats.nodata[sp.source.name]}
    return {"skipped_nodata": sum(per_source.values()), NODATA_PER_SOURCE: per_source} if per_source else {}


def _observer(extension) -> list:
    """The extensions that look at values: each gets every value (``observe``), or, where it
    measures them (``measure``), their statistics a write chunk at a time (``add_moments``; the
    workers' where they made them)."""
    return [e for e in extension or () if not isinstance(e, Entries)]


def _index_columns(dataset, discovered, stats: _Stats, extension) -> tuple[dict, np.ndarray, dict]:
    """(source -> row range, keys, columns) of keys.index for the values ``stats`` counted."""
    ranges, keys, digests = stats.index([sp.source.name for sp in discovered])
    columns = build_columns(keys, digests, label=_label_column(dataset, discovered, keys))
    for e in extension or ():
        columns.update(e.columns(keys))
    return ranges, keys, columns


def _rebuild_index(dataset, discovered, target: Path, previous: dict, problem: str, num_workers: int,
                   skip_invalid: bool, quiet: bool, extension) -> str:
    """Rebuild a complete target's missing or damaged keys.index exactly as its encode wrote it: every
    committed value read back in write order (as a resumed run does; nothing is put), the columns
    from them and the discovery (labels, an extension's columns); the manifest's facts are kept."""
    from .repair import rebuilt_line

    stats, _, _ = _write(dataset, discovered, target, num_workers, skip_invalid, quiet, _observer(extension))
    (target / SKIP_LOG).unlink(missing_ok=True)  # an all-skipped chunk was read again: nothing to keep
    if f"{stats.content_hash:064x}" != previous.get("content_hash") or dict(stats.counts) != previous.get("counts"):
        raise TargetError(f"{target}: data.mdb holds other values than {MANIFEST} describes; pass --overwrite to "
                          "encode it again")
    ranges, keys, columns = _index_columns(dataset, discovered, stats, extension)
    write(target, dict(previous), ranges, columns)
    stats.log.close()
    return rebuilt_line(target, "data.mdb and the sources' listing", len(keys), problem)


def _label_column(dataset: Dataset, discovered: list[SourcePatches], keys: np.ndarray) -> np.ndarray | None:
    """Each written key's class index (-1: none); None where no patch has a label."""
    labels = {p.key.encode(): p.label for sp in discovered if getattr(sp.patches, "labelled", True)
              for p in sp.patches if p.label is not None}
    if not labels:
        return None
    index = {c: i for i, c in enumerate(dataset.classes)}
    return np.array([index.get(labels.get(k), -1) for k in keys.tolist()], dtype="<i4")


def _committed(env: lmdb.Environment, chunk: Chunk) -> list[tuple[str, memoryview]] | None:
    """The chunk's stored (key, value) pairs if its transaction committed, else None."""
    if not env.stat()["entries"]:  # a new target: nothing to look up
        return None
    with env.begin(buffers=False) as txn:
        found = [(key, txn.get(key.encode())) for key in patch_keys(chunk.patches)]
    found = [(k, v) for k, v in found if v is not None]
    return found or None


def _open(target: Path) -> lmdb.Environment:
    # map_size=0 keeps the size recorded in the file, so the growth policy sees the same
    # state on a resumed run as on an uninterrupted one.
    env = lmdb.open(str(target), map_size=0, subdir=True, readahead=False, max_dbs=0)
    env.reader_check()  # drop reader slots of killed processes: they would pin pages
    return env


def _write(dataset, discovered, target, num_workers, skip_invalid, quiet, observers=()):
    chunks = _chunks(discovered)
    total = sum(len(c.patches) for c in chunks)
    stats, skipped = _Stats(extensions=list(observers), log=_KeyLog(target)), []
    skip_log = _SkipLog(target)
    earlier = skip_log.read()  # the invalid patches an interrupted run skipped
    pending: list[Chunk] = []
    env = _open(target)
    try:
        for chunk in chunks:
            stored = _committed(env, chunk)
            if stored is None:
                pending.append(chunk)
                continue
            for key, value in stored:
                stats.add(chunk.source.name, key, value)
            stats.end_chunk()
            _skipped_earlier(chunk, {key for key, _ in stored}, earlier, stats, skipped)
    finally:
        env.close()
    resumed = sum(stats.counts.values())
    reuse_freed_memory()  # LMDB's page buffers: a transaction's worth allocated and freed per chunk
    bar = progress_bar(total, quiet, initial=total - sum(len(c.patches) for c in pending))
    with _Runner(dataset.name, pending, num_workers, skip_invalid) as runner:
        chunk_results = iter(runner)
        for chunk in pending:  # not zip(): it would hold the last chunk's views while the next is read
            _store(target, chunk, next(chunk_results), stats, skipped, skip_log)
            bar.update(len(chunk.patches))
    bar.close()
    return stats, skipped, resumed


def _skipped_earlier(chunk: Chunk, present: set[str], earlier: dict[str, dict], stats: _Stats, skipped: list) -> None:
    """The patches of a chunk an earlier, interrupted run committed that it left out: those its skip
    log names as invalid are listed again; a window not named was skipped as nodata (counted)."""
    if isinstance(chunk.patches, WindowList):  # keys only: no Patch made per window
        missing = ((key, None) for key in chunk.patches.keys() if key not in present)
    else:
        missing = ((p.key, p.path) for p in chunk.patches if p.key not in present)
    for key, path in missing:
        if key in earlier:
            skipped.append(earlier[key])
        elif path is None:
            stats.nodata[chunk.source.name] += 1
        else:  # not in the skip log (an earlier version's run kept none): the reason is unknown
            skipped.append({"key": key, "source": chunk.source.name,
                            "reason": f"{path}: skipped by an earlier, interrupted run"})


def _store(target: Path, chunk: Chunk, batches: list[Batch], stats: _Stats, skipped: list,
           skip_log: _SkipLog | None = None) -> None:
    """Commit one chunk's values and count them (a function: its views of the shared memory go
    when it returns, so that the memory can take a later task's values). Patches skipped as nodata
    are counted, not listed: a scene's nodata may be millions of windows."""
    invalid = [{"key": key, "source": chunk.source.name, "reason": why, "kind": "invalid"}
               for batch in batches for key, why, nodata in batch.skipped if not nodata]
    stats.nodata[chunk.source.name] += sum(nodata for batch in batches for _, _, nodata in batch.skipped)
    skipped.extend(invalid)
    if invalid and skip_log is not None:
        skip_log.add(invalid)  # before the commit: a committed chunk's invalid patches are on record
    values = [batch.values() for batch in batches]
    keys = [[key.encode() for key in batch.keys] for batch in batches]
    if any(values):
        _commit(target, [item for raw, views in zip(keys, values) for item in zip(raw, views)])
    for batch, raw, views in zip(batches, keys, values):
        stats.add_batch(chunk.source.name, batch, raw, views)
    stats.end_chunk()


def _commit(target: Path, items: list[tuple[bytes, bytes | memoryview]]) -> None:
    """One write transaction of (key, value) pairs in a freshly opened environment.

    LMDB recycles page buffers within an open environment without clearing them, so their
    unused bytes depend on its history; a fresh environment per transaction makes every
    transaction start from the same state on a resumed run as on an uninterrupted one.
    """
    incoming = sum(len(key) + len(value) for key, value in items)
    env = _open(target)
    try:
        info = env.info()
        used = (info["last_pgno"] + 1) * env.stat()["psize"]
        wanted = map_size_for(used, incoming)
        if wanted > info["map_size"]:
            env.set_mapsize(wanted)
        try:
            with env.begin(write=True) as txn:
                if txn.cursor().putmulti(items, overwrite=False)[1] != len(items):
                    raise KeyError  # a key already there: the transaction is aborted
        except KeyError:
            with env.begin() as txn:
                key = next(key for key, _ in items if txn.get(key) is not None)
            raise TargetError(f"key {key.decode(errors='replace')!r} is already in the LMDB; refusing to "
                              "overwrite it") from None
    except lmdb.Error as e:
        # LMDB reports a short write on a full disk as EIO: the free space tells
        why = storage_problem(target, e, incoming, f" for the next {len(items)} patches", DISK_MARGIN)
        if why.startswith("the disk is full"):
            raise TargetError(f"{target}: writing failed: {why}; free space and re-run the same command to resume "
                              "(committed patches are kept)") from None
        raise TargetError(f"{target}: writing failed ({e}); re-run the same command to resume") from None
    finally:
        env.close()


class _Handoff:
    """Shared memory one worker task writes its values into (:func:`encode_task`), so that they
    reach the writer without being pickled through the pool's pipe.

    A ``memfd`` the main process creates (anonymous: nothing to unlink; the kernel frees it once
    no process holds it, however they end); the spawned worker opens it by its ``/proc`` path and
    grows it as it writes. The writer maps it once the task is done and commits views of it; once
    nothing views it any more, a later task writes into it again (its pages already allocated:
    writing into fresh shared memory costs a page fault per 4 KiB, about twice the copy).
    Where there is no memfd or no ``/proc`` (not Linux), values come back pickled.
    """

    def __init__(self) -> None:
        self.fd = os.memfd_create("rico_torch-values", os.MFD_CLOEXEC)
        self.path = f"/proc/{os.getpid()}/fd/{self.fd}"
        self.mapped: mmap.mmap | None = None

    @staticmethod
    def available() -> bool:
        return hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd")

    def take(self, batch: Batch) -> Batch:
        """``batch`` with its values: a view of the shared memory the task wrote them into."""
        if batch.data is not None:  # the task could not open the shared memory: they came pickled
            return batch
        size = batch.nbytes
        if not size:
            batch.data = b""
            return batch
        # populated at once: cheaper than a page fault per 4 KiB as the LMDB put reads it
        self.mapped = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                prot=mmap.PROT_READ)
        batch.data = memoryview(self.mapped)
        return batch

    def release(self) -> bool:
        """Unmap, once nothing views the values any more (then it may be written again)."""
        if self.mapped is not None:
            try:
                self.mapped.close()
            except BufferError:  # a view of it is still alive
                return False
            self.mapped = None
        return True

    def close(self) -> None:
        self.release()
        if self.fd >= 0:
            os.close(self.fd)  # the mapping, if a view kept it, lives on until that view goes
            self.fd = -1


class _Runner:
    """Yields each chunk's results in order, reading ahead in worker processes.

    Each worker is a pool of its own, so that windows go to the worker that has their source block:
    all the chunks of one row of blocks (a GeoTIFF's tiles, a cube's chunks of one time offset, a warp
    block row) to one worker, the next row to the next, each block decoded once, not by every
    worker that takes a task over it (windows whose maker names no block: each worker its share of
    a chunk's columns). Chunks are then read ahead until every worker has one, up to
    :data:`AHEAD_BYTES`. Other patches (files of their own) go to the least busy worker.
    """

    def __init__(self, dataset_name: str, chunks: list[Chunk], num_workers: int, skip_invalid: bool) -> None:
        self.dataset_name, self.chunks = dataset_name, chunks
        self.num_workers, self.skip_invalid = num_workers, skip_invalid
        self.pools: list[tuple[ProcessPoolExecutor, list[Future]]] = []  # (a worker, its tasks in flight)
        self.blocks: dict[tuple, int] = {}  # (source, block row) -> the worker that has it
        self.spread: set[str] = set()  # the sources whose windows are routed by block
        self.candidates: dict[str, int] = {}  # source -> its most chunks in one block row (before a size is known)
        self.handoffs: dict[str, list[_Handoff]] = {"busy": [], "taken": [], "free": []}

    def __enter__(self) -> "_Runner":
        if self.num_workers > 0 and self.chunks:
            self.pools = [(worker_pool(1), []) for _ in range(self.num_workers)]
            self.candidates = self._blocky_sources()
        return self

    def _blocky_sources(self) -> dict[str, int]:
        """The sources whose windows may be routed by block, each with the most chunks one of its
        block rows starts: those with at least two block rows per worker (with fewer, a worker
        would wait while another decodes every block: chunks are split instead)."""
        blocks: dict[str, Counter] = {}
        for chunk in self.chunks:
            block_of = getattr(getattr(chunk.patches, "make", None), "block_of", None)
            if block_of is not None and len(chunk.patches):
                blocks.setdefault(chunk.source.name, Counter())[block_of(*chunk.patches.rows[0].tolist())] += 1
        return {s: max(seen.values()) for s, seen in blocks.items()
                if None not in seen and len(seen) >= 2 * len(self.pools)}

    def route(self, chunk_bytes: int) -> None:
        """Start routing windows by block, once a chunk's size is known, for the sources whose block
        rows fit the read-ahead twice (so that every worker has a block row of its own in flight;
        a larger one would leave a worker waiting: those sources' chunks stay split)."""
        self.spread = {s for s, per_block in self.candidates.items()
                       if 2 * per_block <= AHEAD_CHUNKS and 2 * per_block * chunk_bytes <= AHEAD_BYTES}

    def __exit__(self, *exc) -> None:
        for _, running in self.pools:  # nothing more starts anywhere while one worker is waited for
            for task in running:
                task.cancel()
        for pool, _ in self.pools:
            pool.shutdown(wait=True, cancel_futures=True)
        for handoffs in self.handoffs.values():
            for handoff in handoffs:
                handoff.close()

    def _handoff(self) -> _Handoff | None:
        """Shared memory for a new task: one whose values nobody views any more, or a new one."""
        if not _Handoff.available():
            return None
        taken, free = self.handoffs["taken"], self.handoffs["free"]
        free += [h for h in taken if h.release()]
        taken[:] = [h for h in taken if h.mapped is not None]
        handoff = free.pop() if free else _Handoff()
        self.handoffs["busy"].append(handoff)
        return handoff

    def _submit(self, chunk: Chunk) -> list:
        # up to TASK_SIZE patches a task, fewer where a chunk is small (large patches such as
        # Major-TOM's 22 MB cells come few to a chunk): every worker gets work; windows cut from
        # blocks in memory are cheap, so they come in two tasks per worker a chunk
        size = max(1, -(-len(chunk.patches) // (2 * max(1, self.num_workers))))
        if not isinstance(chunk.patches, WindowList):
            size = min(TASK_SIZE, size)
        worker = self._worker_of(chunk)
        if worker is not None:
            size = len(chunk.patches)  # one task, on the worker that has the block
        tasks = [chunk.patches[i : i + size] for i in range(0, len(chunk.patches), size)]
        args = [(self.dataset_name, chunk.source.name, t, self.skip_invalid) for t in tasks]
        if not self.pools:
            return [(encode_task(*a), None) for a in args]
        submitted = []
        for i, a in enumerate(args):
            self._running()  # a finished task's result may view shared memory: let it go
            if worker is not None:
                pool, running = self.pools[worker]
            elif isinstance(chunk.patches, WindowList):  # the worker of this share of the chunk's columns
                pool, running = self.pools[i * len(self.pools) // len(args)]
            else:
                pool, running = min(self.pools, key=lambda p: len(p[1]))
            handoff = self._handoff()
            task = pool.submit(encode_task, *a, handoff and handoff.path)
            running.append(task)
            submitted.append((task, handoff))
        return submitted

    def _worker_of(self, chunk: Chunk) -> int | None:
        """The worker that has (or gets) the source block of a chunk's windows; None where there are
        not two workers or the source's windows are not routed by block (:meth:`route`)."""
        if len(self.pools) < 2 or chunk.source.name not in self.spread:
            return None
        block = chunk.patches.make.block_of(*chunk.patches.rows[0].tolist())
        return self.blocks.setdefault((chunk.source.name, block), len(self.blocks) % len(self.pools))

    def _running(self) -> list[list[Future]]:
        """Each worker's tasks not yet finished."""
        for _, running in self.pools:
            running[:] = [f for f in running if not f.done()]
        return [running for _, running in self.pools]

    def _read_ahead(self, in_flight: int, chunk_bytes: int) -> bool:
        """Whether to submit one more chunk now: windows go to their block's worker, one of the
        workers has nothing to do, and the chunks in flight stay within the read-ahead bounds."""
        return bool(self.blocks) and in_flight < AHEAD_CHUNKS and (in_flight + 1) * chunk_bytes <= AHEAD_BYTES \
            and any(not running for running in self._running())

    def _result(self, task, handoff: _Handoff | None) -> Batch:
        if not isinstance(task, Future):
            return task
        results = task.result()
        if handoff is None:
            return results
        self.handoffs["busy"].remove(handoff)
        self.handoffs["taken"].append(handoff)
        return handoff.take(results)

    def __iter__(self):
        # chunks in flight while one is committed: two while a chunk's values are small, one where
        # they pass READ_AHEAD_BYTES (Major-TOM: 5.6 GB a chunk), so that memory holds two chunks
        queue = [self._submit(c) for c in self.chunks[:2]]  # more once a chunk's size is known
        submitted = len(queue)
        for _ in range(len(self.chunks)):
            tasks = queue.pop(0)
            results = [self._result(task, handoff) for task, handoff in tasks]
            nbytes = sum(batch.nbytes for batch in results)
            if self.candidates and nbytes:  # the first chunk with values: whether to route by block
                self.route(nbytes)
                self.candidates = {}
            while submitted < len(self.chunks) and (len(queue) < (1 if nbytes > READ_AHEAD_BYTES else 2)
                                                    or self._read_ahead(len(queue), nbytes)):
                queue.append(self._submit(self.chunks[submitted]))
                submitted += 1
            yield results
