"""The one home of an encode's manifest: ``manifest.json`` and its per-key sidecar ``keys.index``.

``manifest.json`` holds dataset-level facts only (dataset, sources, bands, dtypes, shapes,
counts, classes, scenes, statistics, version, content hash), so it stays small whatever the key
count. Every per-key fact lives in ``keys.index`` beside ``data.mdb``: fixed-width columns
opened with one read-only memory map, no parse (the peers' way, REFERENCE.md section 9):

==========  =========  ==========================================================================
column      dtype      what
==========  =========  ==========================================================================
``key``     ``S<w>``   every key, grouped by source (``manifest["index"]["sources"]`` gives each
                       source's row range), in write order within a source
``sorter``  ``<u4``    the rows in byte order of their keys (``np.searchsorted(..., sorter=)``)
``digest``  ``<u8``    the low 64 bits of each value's digest (``verify`` checks them)
``label``   ``<i4``    index into ``classes`` (-1: none); only where the dataset has labels
``label_``  ``<u8``    multi-label datasets (BigEarthNet v1): bit i set = the key has
``bits``               ``classes[i]``; ``partner``, ``<i4``: the row of a key's S1/S2 partner (-1: none)
``row``,    ``<i4``    a scene window's offsets (finest-grid pixels) in its scene (the row's
``col``                source); its transform is derived from the scene's, never stored
==========  =========  ==========================================================================

File layout: 8 bytes ``RICOIDX1``, an 8-byte little-endian length ``n``, ``n`` bytes of JSON
(``{"id", "rows", "columns": {name: {"dtype", "offset", "blake2b"}}}``), then each column at its
offset (64-byte aligned). ``manifest.json``'s ``index.id`` (a digest of the columns) names the
sidecar it belongs to, so a sidecar left from another encode is refused, never misread. Both
files are written to ``*.tmp`` and moved in with ``os.replace`` (sidecar first; a reader catches
the gap by the id).

Damage at rest (a bad copy, bit rot) is caught before a reader trusts the columns: opening a
sidecar checks its structure (``sorter`` a permutation of the rows, no empty key, labels and
window offsets in range; the manifest's row ranges tile the rows), and its content digest where
it is at most :data:`DIGEST_ON_OPEN_BYTES`; ``verify``, ``info --check`` and ``repair`` always
check the digest (``benchmarks/scale.py --index-check`` measures both). A damaged or missing
sidecar is rebuilt from ``data.mdb`` and the manifest by ``python -m rico_torch.encode repair``.

Manifests written before this format (per-key ``keys``/``digests``/``labels``/``windows`` in
``manifest.json``) are read as before: the reader builds the same columns in memory.
``python -m rico_torch.encode upgrade TARGET`` rewrites such a target in this format (data.mdb
untouched). This module imports no torch and nothing from the encoder's or the readers' halves.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import FormatError, TargetError

MANIFEST = "manifest.json"
INDEX = "keys.index"
LOCK = "encode.lock"  # an encoder holds it (flock) while it writes the target
MAGIC = b"RICOIDX1"
#: The manifest layout this version writes: 2 = per-key facts in ``keys.index``.
LAYOUT = 2
#: manifest.json fields that held per-key facts before layout 2 (read, converted, never written).
LEGACY_FIELDS = ("keys", "digests", "labels", "windows")
_ALIGN = 64
_MASK64 = (1 << 64) - 1
_FIND_CHUNK = 1 << 17  # keys looked up at once
#: Sidecars this process checked: (path, device, inode, size, mtime, ctime) -> whether the digest too
_CHECKED: dict[tuple, bool] = {}
#: A sidecar up to this size has its content digest checked whenever a process opens it (blake2b:
#: ~0.6 GB/s on a 2-core CI machine, so at most ~0.1 s); larger ones get the structural checks on
#: open and the digest from ``verify``, ``info --check`` and ``repair``.
DIGEST_ON_OPEN_BYTES = 64 << 20
REPAIR = "python -m rico_torch.encode repair"
#: The per-key multi-label column: bit i set = the key has ``classes[i]`` (up to 64 classes).
LABEL_BITS = "label_bits"


# --- extensions --------------------------------------------------------------------------------


class Extension(Protocol):
    """What a caller adds to an encode's manifest (the one mechanism: ``rico_torch.scenes``' windows
    and statistics, a catalog dataset's ``manifest_extra``).

    ``identity`` (the options that shape the values) enters the fingerprint; ``observe`` sees
    every value in the LMDB once, in write order, on a resumed run too; ``manifest`` returns
    dataset-level entries for ``manifest.json`` given the written keys (an ``S`` array in index
    order); ``columns`` returns per-key columns (one row per written key) for ``keys.index``.
    """

    identity: str

    def observe(self, source: str, key: str, value: bytes) -> None: ...

    def manifest(self, written: np.ndarray) -> dict: ...

    def columns(self, written: np.ndarray) -> dict[str, np.ndarray]: ...


class Entries:
    """An :class:`Extension` adding fixed entries to ``manifest.json`` (a catalog dataset's
    ``manifest_extra``); it shapes no value, sees none and adds no column."""

    identity = ""

    def __init__(self, entries: dict | None) -> None:
        self.entries = dict(entries or {})

    def observe(self, source: str, key: str, value: bytes) -> None:
        pass

    def manifest(self, written: np.ndarray) -> dict:
        return dict(self.entries)

    def columns(self, written: np.ndarray) -> dict[str, np.ndarray]:
        return {}


# --- the sidecar file ----------------------------------------------------------------------------


def _write_atomic(path: Path, write) -> None:
    """Write through ``path.tmp`` and move it in; a failed write (a full disk) leaves no ``.tmp``
    and is one line saying what is needed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TargetError(f"{path}: cannot write it: {storage_problem(path.parent, e)}; free space and re-run the "
                          "same command") from None


def storage_problem(directory: Path, error: Exception, needed: int = 0, needed_for: str = "", margin: int = 0) -> str:
    """Why writing ``needed`` bytes into ``directory`` failed, as a user reads it: a full disk (its
    errno, or less free space than ``needed`` + ``margin``: LMDB reports a short write as EIO) says
    how much is free and about how much was being written."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    code = getattr(error, "errno", None)
    if code == errno.ENOSPC or (free is not None and needed and free < needed + margin):
        what = f"the disk is full ({free / 1e6:,.1f} MB free" if free is not None else "the disk is full ("
        return what + (f", about {needed / 1e6:,.1f} MB needed{needed_for})" if needed else ")")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"the target is not writable ({getattr(error, 'strerror', '')})"
    return getattr(error, "strerror", None) or str(error)


def write_json_atomic(path: Path, obj: dict) -> None:
    _write_atomic(Path(path), lambda f: f.write(json.dumps(obj, indent=1).encode()))


def _sidecar_bytes(index_id: str, columns: dict[str, np.ndarray]):
    rows = {len(a) for a in columns.values()}
    if len(rows) > 1:
        raise ValueError(f"index columns differ in length: {sorted(rows)}")
    arrays = {name: np.ascontiguousarray(a) for name, a in columns.items()}
    # the header's length depends on the offsets it lists: lay out with room for it, then fix
    room = 4096 + 128 * len(arrays)
    offsets, at = {}, room
    for name, a in arrays.items():
        offsets[name] = at
        at += -(-a.nbytes // _ALIGN) * _ALIGN
    header = json.dumps({"id": index_id, "rows": rows.pop() if rows else 0,
                         "columns": {n: {"dtype": a.dtype.str, "offset": offsets[n], "blake2b": _digest(a)}
                                     for n, a in arrays.items()}})
    head = MAGIC + len(header).to_bytes(8, "little") + header.encode()
    assert len(head) <= room, "index header over its room"

    def write(f) -> None:
        f.write(head + b"\0" * (room - len(head)))
        for name, a in arrays.items():
            f.write(a.data if a.nbytes else b"")  # the array's own buffer: no copy of a large column
            f.write(b"\0" * (-a.nbytes % _ALIGN))
            release_pages(a)

    return write


class KeyIndex:
    """The columns of one ``keys.index`` (mapped and checked on first use, per process), or of a
    manifest in the earlier layout (built in memory). Pickles as its path: no per-key data crosses
    to a spawned worker, which trusts the checks its parent made (it maps the file in O(1)).

    ``rows`` and ``classes``: what the manifest says the sidecar holds (its row count, the number
    of classes a label indexes); a sidecar that disagrees is damaged.
    """

    def __init__(self, path: Path | None, index_id: str | None = None, arrays: dict | None = None,
                 rows: int | None = None, classes: int | None = None) -> None:
        self.path, self.id = (None if path is None else Path(path)), index_id
        self._arrays = arrays
        self.rows, self.classes = rows, classes
        self.checked = arrays is not None  # built in memory from a manifest: nothing at rest to check
        self.digest_checked = self.checked
        self._in_order: bool | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.path is not None:
            state["_arrays"] = None  # mapped again where it is used
        return state

    @property
    def columns(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = self._map()
        return self._arrays

    def damaged(self, problem: str) -> FormatError:
        return FormatError(f"{self.path}: damaged per-key index: {problem}; rebuild it with "
                           f"`{REPAIR} {self.path.parent}` (data.mdb is not touched)")

    def _map(self) -> dict[str, np.ndarray]:
        path = self.path
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                size = st.st_size
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            if size and hasattr(mapped, "madvise"):  # random lookups: no read-around into this process
                mapped.madvise(mmap.MADV_RANDOM)
        except FileNotFoundError:
            raise FormatError(f"{path}: the per-key index is missing; manifest.json lists it (rebuild it with "
                              f"`{REPAIR} {path.parent}`, or restore the file)") from None
        except OSError as e:
            raise FormatError(f"{path}: unreadable per-key index ({e.strerror})") from None
        try:
            if mapped[:8] != MAGIC:
                raise ValueError("no RICOIDX1 signature")
            n = int.from_bytes(mapped[8:16], "little")
            header = json.loads(bytes(mapped[16 : 16 + n]))
            if self.id is not None and header.get("id") != self.id:
                raise ValueError(f"it belongs to another encode (id {header.get('id')}, manifest.json names "
                                 f"{self.id})")
            rows, arrays, self.header = int(header["rows"]), {}, header
            for name, spec in header["columns"].items():
                dtype, offset = np.dtype(spec["dtype"]), int(spec["offset"])
                if offset < 16 + n or offset + rows * dtype.itemsize > size:
                    raise ValueError(f"column {name!r} lies outside the file")
                arrays[name] = np.frombuffer(mapped, dtype, rows, offset)
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{path}: not a valid per-key index ({e}); rebuild it with "
                              f"`{REPAIR} {path.parent}`") from None
        # the same file, unchanged since this process checked it (a DataModule reads the manifest more than once)
        seen = (str(path), st.st_dev, st.st_ino, size, st.st_mtime_ns, st.st_ctime_ns)
        if not self.checked and seen not in _CHECKED:
            self._check_structure(arrays)
            if size <= DIGEST_ON_OPEN_BYTES:
                self._check_digest(arrays)
        self.checked = True
        self.digest_checked = self.digest_checked or _CHECKED.get(seen, False)
        _CHECKED[seen] = self.digest_checked
        return arrays

    def _check_structure(self, arrays: dict[str, np.ndarray]) -> None:
        """What a damaged sidecar breaks that costs one pass over a column (~15 ms per million keys)."""
        if "key" not in arrays or "sorter" not in arrays:
            raise self.damaged(f"no {'key' if 'key' not in arrays else 'sorter'} column")
        rows = len(arrays["key"])
        if self.rows is not None and rows != self.rows:
            raise self.damaged(f"it holds {rows:,} rows, manifest.json says {self.rows:,}")
        sorter = arrays["sorter"]
        if rows:
            if int(sorter.max()) >= rows:
                raise self.damaged(f"column 'sorter' holds row {int(sorter.max()):,} of {rows:,}")
            seen = np.zeros(rows, bool)
            seen[sorter] = True
            if not seen.all():
                raise self.damaged(f"column 'sorter' is not a permutation of its {rows:,} rows "
                                   f"({rows - int(np.count_nonzero(seen)):,} rows never listed)")
            del seen
            empty = np.flatnonzero(arrays["key"].view(np.uint8)[:: arrays["key"].itemsize] == 0)
            if len(empty):
                raise self.damaged(f"column 'key' has {len(empty):,} empty keys (row {int(empty[0]):,} first)")
        for name, low in (("label", -1), ("row", 0), ("col", 0)):
            if name in arrays and rows:
                high = self.classes if name == "label" else None
                lo, hi = int(arrays[name].min()), int(arrays[name].max())
                if lo < low or (high is not None and hi >= high):
                    bad = lo if lo < low else hi
                    raise self.damaged(f"column {name!r} holds {bad}" + (f", not in -1..{high - 1}" if high is not None
                                                                          else ", a negative offset"))

    def _check_digest(self, arrays: dict[str, np.ndarray]) -> None:
        """Each column's content against the digest written with it (an older sidecar: the id)."""
        specs = self.header["columns"]
        if all("blake2b" in spec for spec in specs.values()):
            for name, array in arrays.items():
                if _digest(array) != specs[name]["blake2b"]:
                    raise self.damaged(f"column {name!r} differs from its content digest (changed since written)")
        elif _content_id(arrays) != self.header.get("id"):
            raise self.damaged("its columns differ from their content digest (changed since written)")
        self.digest_checked = True

    def check(self) -> None:
        """Map the sidecar (if not yet) and check its content digest, whatever its size (``verify``,
        ``info --check``, ``repair``)."""
        arrays = self.columns
        if not self.digest_checked and self.path is not None:
            self._check_digest(arrays)

    def __len__(self) -> int:
        return len(self.columns["key"])

    def in_key_order(self) -> bool:
        """Whether the key column is sorted already (its sorter is 0, 1, 2, ...: one source, or
        sources named in key order), checked once."""
        if self._in_order is None:
            sorter, step = self.columns["sorter"], 1 << 20
            self._in_order = all(np.array_equal(sorter[i : i + step], np.arange(i, min(i + step, len(sorter))))
                                 for i in range(0, len(sorter), step))
        return self._in_order

    def find(self, keys: np.ndarray, dtype=np.int64) -> np.ndarray:
        """Each key's row (as ``dtype``), -1 where it is not here (vectorised binary search)."""
        keys = np.asarray(keys)
        column, sorter = self.columns["key"], self.columns["sorter"]
        if len(column) == 0:
            return np.full(len(keys), -1, dtype)
        rows = np.empty(len(keys), dtype)
        in_order = self.in_key_order()
        for i in range(0, len(keys), _FIND_CHUNK):  # a chunk at a time: no copy of all the keys looked up
            some, order = keys[i : i + _FIND_CHUNK], None
            if len(some) > 1 and not (some[1:] >= some[:-1]).all():
                # searched in order, neighbouring keys probe neighbouring rows (2.5x faster on 2.1M
                # keys in random order: 6.2 -> 2.5 s; in order: 0.55 s)
                order = np.argsort(some)
                some = some[order]
            if in_order:  # the same rows, without the sorter's indirection (2x faster on 3M keys of 94 B)
                at = np.minimum(np.searchsorted(column, some), len(column) - 1).astype(np.int64)
            else:
                at = sorter[np.minimum(np.searchsorted(column, some, sorter=sorter), len(column) - 1)].astype(np.int64)
            at[column[at] != some] = -1
            if order is None:
                rows[i : i + _FIND_CHUNK] = at
            else:
                rows[i + order] = at
        return rows


def build_columns(keys: np.ndarray, digests: np.ndarray | None = None, **more: np.ndarray) -> dict[str, np.ndarray]:
    """The sidecar's columns from keys (grouped by source) and their facts."""
    keys = np.asarray(keys, dtype=np.bytes_) if len(keys) else np.zeros(0, "S1")
    order = np.argsort(keys, kind="stable").astype("<u4" if len(keys) < (1 << 32) else "<u8")
    columns = {"key": keys, "sorter": order}
    if digests is not None:
        columns["digest"] = np.asarray(digests, dtype="<u8")
    columns.update({k: v for k, v in more.items() if v is not None})
    return columns


# --- manifest.json -------------------------------------------------------------------------------


def read_json(directory: Path, fix: str | None = None, error: type[Exception] = FormatError) -> dict | None:
    """The ``manifest.json`` in ``directory`` as written, None where there is none. With ``fix`` (what
    to do, ending the message; the encoder's) any unparsable file is "unreadable"; ``error``: the
    class raised (the encoder's :class:`~rico_torch.errors.TargetError`)."""
    file = Path(directory) / MANIFEST
    try:
        text = file.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{file}: unreadable manifest ({e}){fix or ''}") from None
    try:
        manifest = json.loads(text)
    except ValueError as e:
        if fix is not None:
            raise error(f"{file}: unreadable manifest ({e}){fix}") from None
        raise error(f"{file}: corrupt manifest, not valid JSON ({e}); re-encode with --overwrite, "
                          "or delete manifest.json to read the LMDB without it") from None
    if not isinstance(manifest, dict):
        raise error(f"{file}: corrupt manifest (a JSON {type(manifest).__name__}, not an object)")
    return manifest


class Manifest(dict):
    """``manifest.json``'s dataset-level facts (a dict) with the per-key facts of its sidecar(s).

    One LMDB has one part; shards read together have one part per shard (see :func:`merge`).
    Per-key facts are read through the methods, which map the sidecars lazily.
    """

    def __init__(self, facts: dict, parts: Sequence[tuple[dict, KeyIndex]] = ()) -> None:
        super().__init__(facts)
        self.parts = list(parts)  # (source -> (start, stop), index)

    def __reduce__(self):
        return (Manifest, (dict(self), self.parts))

    # --- keys --------------------------------------------------------------------------------

    @property
    def has_keys(self) -> bool:
        return bool(self.parts)

    def sources(self) -> list[str]:
        """Sources with keys, in order (first appearance over the parts)."""
        return list(dict.fromkeys(s for ranges, _ in self.parts for s in ranges))

    def segments(self, sources: Iterable[str] | None = None) -> list[tuple[int, int, int]]:
        """(part, start, stop) row ranges of ``sources`` (all: None), source by source."""
        wanted = self.sources() if sources is None else list(sources)
        out = []
        for source in wanted:
            for p, (ranges, _) in enumerate(self.parts):
                if source in ranges and ranges[source][1] > ranges[source][0]:
                    start, stop = ranges[source]
                    if out and out[-1][0] == p and out[-1][2] == start:  # adjacent: one range
                        out[-1] = (p, out[-1][1], stop)
                    else:
                        out.append((p, start, stop))
        return out

    def column(self, name: str, sources: Iterable[str] | None = None, segments=None) -> np.ndarray:
        """One column over ``sources`` (or ``segments``): a view of the map where it is one range."""
        segments = self.segments(sources) if segments is None else segments
        pieces = [self.parts[p][1].columns[name][start:stop] for p, start, stop in segments]
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            dtype = self.parts[0][1].columns[name].dtype if self.parts else np.dtype("S1")
            return np.zeros(0, dtype)
        return np.concatenate(pieces)

    def key_array(self, sources: Iterable[str] | None = None) -> np.ndarray:
        """Every key of ``sources`` (all: None) as an ``S`` array, source by source."""
        return self.column("key", sources)

    def sorted_rows(self, sources: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows): an ``S`` array holding the keys of ``sources`` (all: None) and its rows that
        are theirs in byte order (which is their str order). Where they are one range of one part,
        the keys are the mapped column and the rows come from its ``sorter`` (no copy, no sort)."""
        segments = self.segments(sources)
        if len(segments) == 1:
            p, start, stop = segments[0]
            columns = self.parts[p][1].columns
            rows = columns["sorter"]
            if start > 0 or stop < len(rows):
                rows = rows[(rows >= start) & (rows < stop)]
            return columns["key"], rows
        keys = np.sort(self.column("key", segments=segments))
        return keys, np.arange(len(keys))

    def sorted_keys(self, sources: Iterable[str] | None = None) -> np.ndarray:
        """The keys of ``sources`` (all: None) in byte order (:meth:`sorted_rows`), as one array."""
        keys, rows = self.sorted_rows(sources)
        return keys[rows]

    def key_count(self) -> int:
        return sum(stop - start for ranges, _ in self.parts for start, stop in ranges.values())

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part, row) of each key, part -1 where no part has it."""
        keys = np.asarray(keys, dtype=np.bytes_)
        part = np.full(len(keys), -1, np.int64)
        row = np.full(len(keys), -1, np.int64)
        for p, (_, index) in enumerate(self.parts):
            open_ = part < 0
            if not open_.any():
                break
            found = index.find(keys if p == 0 else keys[open_])  # the first part: every key, no copy
            hit = found >= 0
            where = np.flatnonzero(open_)[hit]
            part[where], row[where] = p, found[hit]
        return part, row

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Whether each key is here, a chunk of keys at a time (no per-key int64 arrays of every key:
        2.1M keys looked up held 88 MB of them at once)."""
        keys = np.asarray(keys, dtype=np.bytes_)
        out = np.empty(len(keys), bool)
        for i in range(0, len(keys), _FIND_CHUNK):
            out[i : i + _FIND_CHUNK] = self.find(keys[i : i + _FIND_CHUNK])[0] >= 0
        return out

    def lookup(self, name: str, keys: np.ndarray, missing=-1) -> np.ndarray:
        """Column ``name`` of each key (``missing`` where the key or the column is absent)."""
        part, row = self.find(keys)
        dtype = next((ix.columns[name].dtype for _, ix in self.parts if name in ix.columns), np.dtype(np.int64))
        out = np.full(len(part), missing, dtype)
        for p, (_, index) in enumerate(self.parts):
            sel = part == p
            if sel.any() and name in index.columns:
                out[sel] = index.columns[name][row[sel]]
        return out

    def has_column(self, name: str) -> bool:
        return bool(self.parts) and all(name in ix.columns for _, ix in self.parts)

    def source_of_rows(self, part: int) -> tuple[list[str], np.ndarray]:
        """A part's source names and each of its rows' source index."""
        ranges, index = self.parts[part]
        names = list(ranges)
        out = np.full(len(index), -1, np.int32)
        for i, (start, stop) in enumerate(ranges.values()):
            out[start:stop] = i
        return names, out

    def labels(self, keys: np.ndarray | None = None) -> np.ndarray | None:
        """Class index of each key (all keys in index order where None), -1 where unlabelled;
        for a multi-label dataset (a ``label_bits`` column: bit i = ``classes[i]``) an (N, classes)
        uint8 multi-hot array in the order of ``classes``; None where the manifest has no labels."""
        if self.has_column(LABEL_BITS):
            bits = self.column(LABEL_BITS) if keys is None else self.lookup(LABEL_BITS, keys, missing=0)
            shifts = np.arange(len(self.get("classes", [])), dtype=np.uint64)
            return ((bits.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
        if not self.has_column("label"):
            return None
        return self.column("label") if keys is None else self.lookup("label", keys).astype(np.int64)

    def keys_by_source(self) -> dict[str, list[str]]:
        """source -> its keys as str, in index order (Python objects per key: for small datasets,
        tests and inspection; readers use the arrays)."""
        return {s: decode_keys(self.key_array([s])) for s in self.sources()}

    def label_names(self) -> dict[str, str]:
        """key -> class name of every labelled key (Python objects per key, as :meth:`keys_by_source`);
        empty for a multi-label dataset (:meth:`labels` gives its multi-hot rows)."""
        labels, classes = self.labels(), self.get("classes", [])
        if labels is None or labels.ndim != 1:
            return {}
        return {k: classes[i] for k, i in zip(decode_keys(self.key_array()), labels.tolist()) if i >= 0}

    # --- scene windows -------------------------------------------------------------------------

    @property
    def windows(self) -> "Windows":
        return Windows(self)


class KeyRows:
    """Keys as rows of a one-part manifest's mapped key column: ``rows`` (n,) for single keys,
    (n, k) for items of k keys. Indexes like the ``S`` array it stands for (``rows[i]``'s keys,
    read from the map); pickles as the manifest (sidecar paths) and the rows, 4 bytes a key, never
    the keys: a spawned worker maps the column itself."""

    def __init__(self, manifest: Manifest, rows: np.ndarray) -> None:
        if len(manifest.parts) != 1:
            raise ValueError("KeyRows needs a manifest of one part (one LMDB, not shards)")
        self.manifest = manifest
        rows = np.asarray(rows)
        self.rows = rows.astype(np.int32) if len(manifest.parts[0][1]) < 2**31 else rows.astype(np.int64)

    def column(self, name: str = "key") -> np.ndarray:
        """The whole mapped column ``name`` (the rows index it)."""
        return self.manifest.parts[0][1].columns[name]

    @property
    def ndim(self) -> int:
        return self.rows.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return self.rows.shape

    @property
    def dtype(self) -> np.dtype:
        return self.column().dtype

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        return self.column()[self.rows[index]]

    def __iter__(self) -> Iterator:
        for start in range(0, len(self.rows), _FIND_CHUNK):
            yield from self[start : start + _FIND_CHUNK]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        keys = self[:]
        return keys if dtype is None else keys.astype(dtype)

    def tolist(self) -> list:
        return self[:].tolist()


def window_transform(transform: Sequence[float], row: int, col: int) -> list[float]:
    """A window's affine coefficients (``rasterio.windows.transform``) from its scene's and offsets."""
    a, b, c, d, e, f = transform
    return [a, b, c + a * col + b * row, d, e, f + d * col + e * row]


def window_bounds(rows: np.ndarray, cols: np.ndarray, size: int | Sequence[int], transform: Sequence[float]) -> np.ndarray:
    """(left, bottom, right, top) of windows (N x 4) from their offsets, their size (``size`` or
    (height, width) cells) and their grid's transform (north-up grids)."""
    height, width = (size, size) if isinstance(size, (int, np.integer)) else size
    a, b, c, d, e, f = transform
    out = np.empty((len(rows), 4), np.float64)
    left, top = out[:, 0], out[:, 3]  # filled as corners, then ordered (north-up: b = d = 0)
    np.add(c + a * cols, b * rows, out=left)
    np.add(f + d * cols, e * rows, out=top)
    out[:, 2], out[:, 1] = left + a * width, top + e * height
    if a < 0:
        out[:, [0, 2]] = out[:, [2, 0]]
    if e > 0:
        out[:, [1, 3]] = out[:, [3, 1]]
    return out


class Windows(Mapping):
    """key -> ``{"scene", "window": [row, col, size, size], "transform"}`` of a chipped LMDB,
    derived on lookup from the sidecar's columns and the scenes' transforms (the old
    ``manifest["windows"]``, without holding a dict of every key). A cube encode's windows
    (``encode cube``) are ``{"cube", "window": [row, col, h, w], "t_off", "t_size", "time"
    (ISO strings of its steps), "time_values" (their CF numbers), "transform"}``."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.size = int(manifest.get("chip", {}).get("patch_size", 0))
        self.cube = manifest.get("cube")

    def cube_entry(self, t: int, row: int, col: int) -> dict:
        cube = self.cube
        steps, height, width = (int(cube["patch"][a]) for a in ("time", "y", "x"))
        time = cube["time"]
        return {"cube": cube["name"], "window": [row, col, height, width], "t_off": t, "t_size": steps,
                "time": time["iso"][t : t + steps], "time_values": time["values"][t : t + steps],
                "transform": window_transform(cube["transform"], row, col)}

    def table(self) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(keys, scene names, scene index, row, col) of every window, in index order."""
        keys, scenes, rows, cols, names = [], [], [], [], []
        for p, (ranges, index) in enumerate(self.manifest.parts):
            for source, (start, stop) in ranges.items():
                if source not in names:
                    names.append(source)
                keys.append(index.columns["key"][start:stop])
                rows.append(index.columns["row"][start:stop])
                cols.append(index.columns["col"][start:stop])
                scenes.append(np.full(stop - start, names.index(source), np.int32))
        if not keys:
            return np.zeros(0, "S1"), names, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32)
        return np.concatenate(keys), names, np.concatenate(scenes), np.concatenate(rows), np.concatenate(cols)

    def entry(self, scene: str, row: int, col: int) -> dict:
        transform = self.manifest["scenes"][scene]["transform"]
        return {"scene": scene, "window": [int(row), int(col), self.size, self.size],
                "transform": window_transform(transform, int(row), int(col))}

    def __getitem__(self, key: str) -> dict:
        part, row = self.manifest.find(np.array([key.encode()]))
        if part[0] < 0 or not self.manifest.has_column("row"):
            raise KeyError(key)
        ranges, index = self.manifest.parts[int(part[0])]
        r = int(row[0])
        if self.cube is not None:
            return self.cube_entry(*(int(index.columns[c][r]) for c in ("time", "row", "col")))
        scene = next(s for s, (start, stop) in ranges.items() if start <= r < stop)
        return self.entry(scene, index.columns["row"][r], index.columns["col"][r])

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.manifest.has_column("row") and \
            bool(self.manifest.contains(np.array([key.encode()]))[0])

    def __iter__(self) -> Iterator[str]:
        return (k.decode() for k in self.manifest.key_array().tolist())

    def __len__(self) -> int:
        return self.manifest.key_count() if self.manifest.has_column("row") else 0


# --- reading ---------------------------------------------------------------------------------------


def _legacy_index(manifest: dict, file: Path) -> tuple[dict, KeyIndex] | None:
    """The per-key fields of a manifest in the earlier layout, as in-memory columns."""
    per_source = manifest.pop("keys", None)
    digests = manifest.pop("digests", None) or {}
    labels = manifest.pop("labels", None) or {}
    windows = manifest.pop("windows", None)
    if not per_source:
        return None
    try:
        ranges, keys, digest = {}, [], []
        for source, source_keys in per_source.items():
            ranges[source] = (len(keys), len(keys) + len(source_keys))
            keys.extend(source_keys)
            listed = digests.get(source) or []
            if len(listed) != len(source_keys) and digests:
                raise ValueError(f"{len(listed)} digests for {len(source_keys)} keys of {source}")
            digest.extend(int(d, 16) for d in listed)
        more = {}
        if labels:
            classes = {c: i for i, c in enumerate(manifest.get("classes", []))}
            more["label"] = np.array([classes.get(labels.get(k), -1) for k in keys], np.int32)
        if windows is not None:
            more["row"] = np.array([windows[k]["window"][0] if k in windows else 0 for k in keys], np.int32)
            more["col"] = np.array([windows[k]["window"][1] if k in windows else 0 for k in keys], np.int32)
        columns = build_columns(np.array([k.encode() for k in keys], dtype=np.bytes_),
                                np.array(digest, np.uint64) if digests else None, **more)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as e:
        raise FormatError(f"{file}: corrupt manifest (its per-key lists do not parse: {type(e).__name__}: {e}); "
                          "re-encode with --overwrite") from None
    return ranges, KeyIndex(None, arrays=columns)


def index_part(directory: Path, facts: dict) -> tuple[dict, KeyIndex] | None:
    """The sidecar part a manifest.json in the current layout names (None: it names none)."""
    spec = facts.get("index")
    if not spec:
        return None
    file = Path(directory) / MANIFEST
    try:
        ranges = {s: (int(a), int(b)) for s, (a, b) in spec["sources"].items()}
        rows = int(spec["rows"]) if "rows" in spec else None
        index = KeyIndex(Path(directory) / spec.get("file", INDEX), str(spec["id"]), rows=rows,
                         classes=len(facts.get("classes") or ()) if "label" in spec.get("columns", ()) else None)
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{file}: corrupt manifest (its index entry: {type(e).__name__}: {e}); "
                          f"rebuild it with `{REPAIR} {directory}`") from None
    problem = ranges_problem(ranges, rows, facts.get("counts"))
    if problem:
        raise FormatError(f"{file}: corrupt manifest (index.sources {problem}); rebuild it with "
                          f"`{REPAIR} {directory}`")
    return ranges, index


def ranges_problem(ranges: dict[str, tuple[int, int]], rows: int | None, counts: dict | None) -> str | None:
    """Why sources' row ranges do not tile ``0..rows`` source after source, or disagree with the
    manifest's counts (None: they agree)."""
    at = 0
    for source, (start, stop) in sorted(ranges.items(), key=lambda item: item[1]):
        if start != at or stop < start:
            what = ("overlaps the one before" if start < at else "leaves a gap before it" if start > at
                    else "ends before it starts")
            return f"{source} is rows {start:,}..{stop:,}, which {what}"
        if counts and source in counts and counts[source] != stop - start:
            return f"{source} is {stop - start:,} rows, its count is {counts[source]:,}"
        at = stop
    if rows is not None and at != rows:
        return f"cover {at:,} rows, the index holds {rows:,}"
    return None


def read(directory: str | Path, fix: str | None = None, error: type[Exception] = FormatError) -> Manifest | None:
    """The manifest of the LMDB in ``directory`` (None: no manifest.json, e.g. rico-hdl's output).

    An earlier layout's per-key fields are converted (in memory) into the same columns; the sidecar
    of the current layout is mapped on first use.
    """
    directory = Path(directory)
    facts = read_json(directory, fix, error)
    if facts is None:
        return None
    if facts.get("layout", 1) > LAYOUT:
        raise FormatError(f"{directory / MANIFEST}: manifest layout {facts.get('layout')} is newer than this "
                          f"rico_torch reads ({LAYOUT}); upgrade rico_torch")
    part = _legacy_index(facts, directory / MANIFEST) if any(f in facts for f in LEGACY_FIELDS) else \
        index_part(directory, facts)
    return Manifest(facts, [part] if part else [])


# --- merging shards --------------------------------------------------------------------------------


def entry_shapes(entry: dict) -> dict[str, int]:
    """A manifest band entry's shapes as ``"HxW"`` -> count (count 1 where one shape is recorded)."""
    if entry.get("shape"):
        return {"x".join(map(str, entry["shape"])): 1}
    return dict(entry.get("shapes", {}))


def _merge_band(a: dict, b: dict) -> dict:
    """One band's manifest entry over two shards: shapes that differ are kept, with their counts."""
    if a.get("shape") and a.get("shape") == b.get("shape"):
        return a
    shapes = entry_shapes(a)
    for shape, n in entry_shapes(b).items():
        shapes[shape] = shapes.get(shape, 0) + n
    return {"dtype": a.get("dtype"), "shape": None, "shapes": shapes}


def merge(manifests: Sequence[Manifest | None]) -> Manifest | None:
    """The manifests of LMDBs read together (shards) as one: the first's facts, with bands, counts,
    skipped patches (listed and counted) and scenes merged over all and every part's sidecar kept
    (mapped, not copied). None if any LMDB has no manifest (rico-hdl's output)."""
    if any(m is None for m in manifests):
        return None
    if len(manifests) == 1:
        return manifests[0]
    first = manifests[0]
    facts = {k: v for k, v in first.items() if k not in ("shard", "index")}
    facts.update(complete=all(m.get("complete") is not False for m in manifests), bands={}, counts={},
                 skipped=[s for m in manifests for s in m.get("skipped", [])])
    nodata = [m.get("skipped_nodata_per_source") for m in manifests]
    if any(n is not None for n in nodata):  # windows skipped as nodata: each shard counted its own
        per_source: dict[str, int] = {}
        for counts in filter(None, nodata):
            for source, n in counts.items():
                per_source[source] = per_source.get(source, 0) + n
        facts.update(skipped_nodata=sum(per_source.values()), skipped_nodata_per_source=per_source)
    elif any("skipped_nodata" in m for m in manifests):  # an earlier version's total only
        facts["skipped_nodata"] = sum(m.get("skipped_nodata", 0) for m in manifests)
    if any("scenes" in m for m in manifests):
        facts["scenes"] = {}
    for m in manifests:
        for source, table in m.get("bands", {}).items():
            into = facts["bands"].setdefault(source, {})
            for band, entry in table.items():
                into[band] = _merge_band(into[band], entry) if band in into else entry
        for source, n in m.get("counts", {}).items():
            facts["counts"][source] = facts["counts"].get(source, 0) + n
        if "scenes" in m:
            facts["scenes"] = _merge_scenes(facts.get("scenes") or {}, m["scenes"])
    if facts.get("scenes") is None:
        facts.pop("scenes", None)
    if "cube" in first:  # shards of one cube encode: each counted only its own windows' cells
        from .scenes.statistics import merge_entries

        statistics: dict = {}
        for m in manifests:
            statistics = merge_entries(statistics, m.get("cube", {}).get("statistics", {}))
        facts["cube"] = {**first["cube"], "statistics": statistics}
        facts["statistics"] = statistics
    facts["patches"] = sum(facts["counts"].values())
    return Manifest(facts, [part for m in manifests for part in m.parts])


def _merge_scenes(into: dict, scenes: Mapping[str, dict]) -> dict:
    """Scenes of two shards of one encode: the same scenes, other windows; a scene in both has its
    statistics merged exactly (each shard counted only its own windows' pixels)."""
    from .scenes.statistics import merge_entries  # lazy: the scenes package imports this module

    merged = dict(into)
    for name, scene in scenes.items():
        if name in merged and "statistics" in scene:
            scene = {**scene, "statistics": merge_entries(merged[name].get("statistics", {}), scene["statistics"])}
        merged[name] = scene
    return merged


# --- writing -----------------------------------------------------------------------------------------


def write(directory: Path, facts: dict, ranges: dict[str, tuple[int, int]] | None = None,
          columns: dict[str, np.ndarray] | None = None) -> dict:
    """Write ``manifest.json`` (and, with ``columns``, its sidecar) into ``directory``, each
    atomically, the sidecar first; the facts as written are returned."""
    directory = Path(directory)
    facts = {k: v for k, v in facts.items() if k not in LEGACY_FIELDS and k not in ("index", "layout")}
    facts["layout"] = LAYOUT
    if columns is not None:
        index_id = _content_id(columns)
        _write_atomic(directory / INDEX, _sidecar_bytes(index_id, columns))
        facts["index"] = {"file": INDEX, "id": index_id, "rows": len(columns["key"]),
                          "columns": list(columns), "sources": {s: list(r) for s, r in (ranges or {}).items()}}
    else:
        (directory / INDEX).unlink(missing_ok=True)
    write_json_atomic(directory / MANIFEST, facts)
    return facts


def _digest(array: np.ndarray) -> str:
    """One column's content digest (its dtype and bytes)."""
    h = hashlib.blake2b(np.dtype(array.dtype).str.encode() + b"\0", digest_size=16)
    h.update(np.ascontiguousarray(array).data)
    release_pages(array)
    return h.hexdigest()


def _content_id(columns: dict[str, np.ndarray]) -> str:
    """The sidecar's id: a digest of its columns (the same encode gives the same manifest.json)."""
    h = hashlib.blake2b(digest_size=16)
    for name, array in columns.items():
        h.update(name.encode() + b"\0" + np.dtype(array.dtype).str.encode() + b"\0")
        h.update(np.ascontiguousarray(array).data)
        release_pages(array)
    return h.hexdigest()


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of a file-backed array (an encoder's column of 10M keys, 160 MB) from this
    process once read: they stay in the file, and a later read maps them again. Nothing for an
    array in memory."""
    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    mapped = getattr(base, "_mmap", None)
    if mapped is not None and hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_DONTNEED)


def encoder_running(directory: str | Path) -> bool:
    """Whether an encoder is writing ``directory`` now (it holds ``encode.lock``). Read from the
    kernel's lock table (``/proc/locks``, Linux; elsewhere False), so that looking never takes the
    lock and never makes an encoder starting at that moment think the target is busy."""
    try:
        st = os.stat(Path(directory) / LOCK)
        with open("/proc/locks") as f:
            table = f.read()
    except OSError:
        return False
    held = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():  # "1: FLOCK  ADVISORY  WRITE 4242 00:2f:1234 0 EOF" ("->" marks a waiter)
        fields = line.split()
        if "->" not in fields and len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == held:
            return True
    return False


def require_lmdb(directory: str | Path) -> Path:
    """``directory`` as a Path, if it holds a ``data.mdb`` (else a one-line error saying what to give)."""
    directory = Path(directory)
    if not (directory / "data.mdb").exists():
        what = "no such directory" if not directory.is_dir() else "no data.mdb here"
        raise TargetError(f"{directory}: {what}; give the directory an encode wrote")
    return directory


def upgrade(directory: str | Path) -> str:
    """Rewrite an earlier layout's manifest.json as manifest.json + keys.index (data.mdb untouched).

    One-way: a rico_torch older than keys.index (layout 2) cannot read the result, so the earlier
    manifest is kept beside it as ``manifest.json.v1`` (moving it back over manifest.json undoes it)."""
    directory = require_lmdb(directory)
    manifest = read(directory)
    if manifest is None:
        raise TargetError(f"{directory}: no {MANIFEST} here (an LMDB rico-hdl wrote reads without one); "
                          "nothing to upgrade")
    if "index" in manifest or not manifest.parts:
        return upgrade_stack(directory, manifest) or \
            f"{directory}: {MANIFEST} is in the current layout already; nothing to do"
    ranges, index = manifest.parts[0]
    earlier = (directory / MANIFEST).read_bytes()
    _write_atomic(directory / (MANIFEST + ".v1"), lambda f: f.write(earlier))
    write(directory, dict(manifest), ranges, dict(index.columns))
    return (f"{directory}: upgraded {MANIFEST} ({len(index):,} keys now in {INDEX}); one-way: a rico_torch older "
            f"than {INDEX} cannot read it; the earlier one is kept as {MANIFEST}.v1 (move it back over "
            f"{MANIFEST} to undo)")


def lacks_stack_facts(facts: Mapping) -> bool:
    """Whether ``facts`` (a manifest) are a full aligned stack's (``encode scenes --group-by time``
    without ``--patch-time``) encoded before its cube facts were recorded: its readers need
    ``python -m rico_torch.encode upgrade`` first."""
    chip = facts.get("chip") or {}
    return (facts.get("dataset") == "scenes" and "cube" not in facts and not chip.get("patch_time")
            and (chip.get("align") or {}).get("group_by") == "time")


def upgrade_stack(directory: Path, manifest: Manifest) -> str | None:
    """Add what a full stack (``encode scenes --group-by time`` without ``--patch-time``) encoded
    before it was recorded lacks: its cube facts and a ``time`` column of zeros (every window starts
    at date 0). The line saying so; None where nothing is missing. data.mdb untouched."""
    from .scenes.chipper import recorded_stack_facts  # lazy: the scenes package imports this module

    cube = recorded_stack_facts(manifest)
    if cube is None or len(manifest.parts) != 1:
        return None
    ranges, index = manifest.parts[0]
    columns = {name: np.array(a) for name, a in index.columns.items() if name not in ("row", "col")}
    columns["time"] = np.zeros(len(index), np.int32)  # the order an encode writes: ..., time, row, col
    columns.update({name: np.array(index.columns[name]) for name in ("row", "col")})
    write(directory, {**manifest, "cube": cube}, ranges, columns)
    return (f"{directory}: recorded the aligned stack's {cube['shape'][0]} dates as one window over time "
            f"({MANIFEST}: cube; {INDEX}: time), so the cube's readers take it; data.mdb untouched")


def decode_keys(keys: np.ndarray) -> list[str]:
    """An ``S`` array of keys as str (UTF-8: numpy's ``astype(str)`` would take them as ASCII)."""
    return [k.decode() for k in keys.tolist()]


def shard_of(key: bytes, count: int) -> int:
    """The shard a key belongs to (the encoder's ``--shard I/N`` rule: ``zlib.crc32(key) % N``)."""
    return zlib.crc32(key) % count


def digest64(digest: int) -> int:
    """The per-key digest the sidecar keeps: the low 64 bits, enough to name a changed value."""
    return digest & _MASK64
