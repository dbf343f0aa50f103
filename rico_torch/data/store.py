"""Read-only access to one LMDB, or to the shards of one dataset as if they were one.

Shards are written by ``python -m rico_torch.encode ... --shard I/N``; a key lives in shard
``zlib.crc32(key) % N``, so a reader finds it without a lookup table. LMDBs that are not
shards of one set are searched in the order given.

py-lmdb allows one handle per LMDB and process, so this module keeps one per path, shared by
every dataset reading it, and knows which ``data.mdb`` (device + inode) each handle maps: an
LMDB replaced by ``encode --overwrite`` is noticed and reopened, never read through the old map
by a dataset created after the swap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import lmdb

from ..catalog import encode_command
from ..manifest import Manifest, encoder_running, entry_shapes, merge, shard_of  # noqa: F401  (re-exported)
from ..manifest import read as read_any
from ..errors import ConfigError, DatasetNotFoundError, FormatError, IncompleteDatasetError, StaleDatasetError

Identity = tuple[int, int]  # (st_dev, st_ino) of data.mdb


@dataclass
class _Handle:
    pid: int  # the process that opened it (a forked child must not read through it)
    identity: Identity
    env: lmdb.Environment
    owned: bool  # False: the user's own environment, never closed here
    holders: int = 0


_HANDLES: dict[str, _Handle] = {}  # real path -> this process's handle


def _require_lmdb(path: Path) -> None:
    if not (path / "data.mdb").is_file():
        what = "directory does not exist" if not path.exists() else "no data.mdb here"
        raise DatasetNotFoundError(
            f"{path}: no encoded dataset ({what}); create it with "
            f"`python -m rico_torch.encode <dataset> ... --target-dir {path}`"
        )


def read_manifest(path: str | Path) -> Manifest | None:
    """The encoder's manifest beside ``data.mdb`` (:func:`rico_torch.manifest.read`); None for an
    LMDB without one (rico-hdl).

    Raises:
        DatasetNotFoundError: ``path`` holds no LMDB (a mistyped path).
        FormatError: ``manifest.json`` is not valid JSON or not an object.
    """
    path = Path(path)
    _require_lmdb(path)
    return read_any(path)


def check_complete(path: Path, manifest: dict | None) -> None:
    """Refuse an LMDB whose encode did not finish (its manifest says ``complete: false``)."""
    if manifest is not None and manifest.get("complete") is False:
        if encoder_running(path):
            raise IncompleteDatasetError(
                f"{path}: this LMDB is being written by another process (an encode holds encode.lock); wait for it "
                "to finish, or pass allow_incomplete=True to read what is committed so far")
        raise IncompleteDatasetError(
            f"{path}: the encode into this LMDB did not finish (manifest.json: complete false); finish it with "
            f"`{encode_command(manifest, path)}`, or pass allow_incomplete=True to read what is committed"
        )


def file_identity(path: Path) -> Identity:
    try:
        st = os.stat(Path(path) / "data.mdb")
    except FileNotFoundError:
        _require_lmdb(Path(path))
        raise
    return st.st_dev, st.st_ino


def _open(real: str, readahead: bool) -> lmdb.Environment:
    try:
        return lmdb.open(real, readonly=True, lock=False, readahead=readahead, max_readers=2048, subdir=True,
                         max_dbs=0)
    except lmdb.Error as e:
        if "already open" in str(e):
            raise ConfigError(
                f"{real}: this LMDB is already open in this process (your own lmdb.open; py-lmdb allows one "
                "handle per file): pass that environment instead of the path, LMDBPatchDataset(env, ...), "
                "or close it first"
            ) from None
        raise FormatError(f"{real}: LMDB cannot open data.mdb ({type(e).__name__}: {e})") from None


def _current(real: str) -> _Handle | None:
    """This process's handle on ``real``; one inherited through fork is closed, never read through."""
    handle = _HANDLES.get(real)
    if handle is not None and handle.pid != os.getpid():
        handle.env.close()  # a forked child's copy: releasing it lifts py-lmdb's one-handle refusal
        del _HANDLES[real]
        return None
    return handle


def adopt_environment(env: lmdb.Environment) -> Path:
    """Register the user's own open environment as this process's handle on its LMDB; its path."""
    try:
        real = os.path.realpath(env.path())
    except lmdb.Error:
        raise StaleDatasetError("the lmdb.Environment passed in is closed; pass an open one or the path") from None
    handle = _current(real)
    if handle is not None and handle.env is not env:
        raise ConfigError(f"{real}: this LMDB is already open in this process through another handle")
    if handle is None:
        _HANDLES[real] = _Handle(os.getpid(), file_identity(Path(real)), env, owned=False)
    return Path(real)


def open_environment(path: Path, readahead: bool = False, identity: Identity | None = None) -> lmdb.Environment:
    """This process's read-only handle on an LMDB, shared by every dataset reading it.

    The first opener's ``readahead`` holds for all. ``lock=False``: readers write nothing (works
    on read-only storage); the encoder never writes into a finished dataset in place (``--overwrite``
    swaps in a new ``data.mdb``, which is noticed here and reopened).

    Args:
        identity: the ``data.mdb`` the caller was built over; a different file there now raises
            :class:`StaleDatasetError` instead of mixing two datasets.
    """
    real = os.path.realpath(path)
    current = file_identity(Path(real))
    if identity is not None and current != identity:
        raise StaleDatasetError(f"{path}: the LMDB was replaced (re-encoded) after this dataset was created; "
                                "create the dataset again to read the new data")
    handle = _current(real)
    if handle is not None and handle.identity != current:  # replaced since it was opened
        if not handle.owned:
            raise StaleDatasetError(f"{path}: data.mdb was replaced after the environment passed in was opened; "
                                    "open it again")
        handle.env.close()  # datasets still holding it get a StaleDatasetError on their next read
        del _HANDLES[real]
        handle = None
    if handle is None:
        handle = _HANDLES[real] = _Handle(os.getpid(), current, _open(real, readahead), owned=True)
    return handle.env


def acquire_environment(path: Path, readahead: bool = False, identity: Identity | None = None) -> lmdb.Environment:
    """:func:`open_environment` for a reader that keeps the handle: one more holder, until its
    :func:`release_environment` (a one-off look, e.g. ``info``, holds nothing)."""
    env = open_environment(path, readahead, identity)
    _HANDLES[os.path.realpath(path)].holders += 1
    return env


def release_environment(path: Path) -> None:
    """Drop one holder of this process's handle; the last one closes it (unless it is the user's)."""
    real = os.path.realpath(path)
    handle = _current(real)
    if handle is None:
        return
    handle.holders -= 1
    if handle.holders <= 0:
        if handle.owned:
            handle.env.close()
        del _HANDLES[real]  # the user's own environment: theirs to close; a new dataset re-adopts it


class Store:
    """One dataset in one or more LMDB directories, opened lazily in the reading process.

    Args:
        paths: LMDB directories, or an open ``lmdb.Environment`` (or a list mixing both): an
            environment is used as this process's handle on its LMDB (py-lmdb allows only one);
            other processes open their own.
        allow_incomplete: read an LMDB whose encode has not finished.
        manifests: each path's manifest as :func:`read_manifest` returns it, where the caller
            has read them (a DataModule reads them once for all its datasets).
    """

    def __init__(self, paths, readahead: bool = False, allow_incomplete: bool = False,
                 manifests: list | None = None) -> None:
        given = list(paths) if isinstance(paths, (list, tuple)) else [paths]
        if not given:
            raise ConfigError("no LMDB path given")
        self.paths = [adopt_environment(p) if isinstance(p, lmdb.Environment) else Path(p) for p in given]
        # the user's environments, used again in this process after a close() (never pickled)
        self._given = (os.getpid(), [p for p in given if isinstance(p, lmdb.Environment)])
        self.readahead = readahead
        if manifests is None or len(manifests) != len(self.paths):
            manifests = [read_manifest(p) for p in self.paths]  # also: each path holds an LMDB
        else:
            for path in self.paths:
                _require_lmdb(path)
        if not allow_incomplete:
            for path, manifest in zip(self.paths, manifests):
                check_complete(path, manifest)
        self._identities = [file_identity(p) for p in self.paths]
        self.shard_count = 0
        self._position: list[int] = []
        if len(self.paths) > 1:
            self._route(manifests)
        self._read_manifests: list | None = manifests  # handed to the first manifest() call, not kept

    def _route(self, manifests: list[dict | None]) -> None:
        """Route keys by the shard rule when the paths are exactly the shards of one set."""
        shards = [(m or {}).get("shard") for m in manifests]
        counts = {s["count"] for s in shards if s}
        if all(shards) and len(counts) == 1:
            self.shard_count = counts.pop()
            index = {s["index"]: i for i, s in enumerate(shards)}
            missing = sorted(set(range(self.shard_count)) - set(index))
            if missing:
                raise DatasetNotFoundError(f"shards {', '.join(map(str, missing))} of {self.shard_count} are missing "
                                           f"from {', '.join(map(str, self.paths))}")
            self._position = [index[i] for i in range(self.shard_count)]

    def __str__(self) -> str:
        return str(self.paths[0]) if len(self.paths) == 1 else f"{len(self.paths)} shards ({self.paths[0]}, ...)"

    def manifest(self) -> Manifest | None:
        """The manifests, merged over shards (:func:`rico_torch.manifest.merge`; None if any path
        lacks one, e.g. rico-hdl output). Per-key facts stay in the mapped sidecars."""
        manifests, self._read_manifests = self._read_manifests, None
        if manifests is None:
            manifests = [read_manifest(p) for p in self.paths]
        return merge(manifests)

    def environments(self) -> list[lmdb.Environment]:
        """This process's handles (looked up once per process, not per read)."""
        pid = os.getpid()
        if getattr(self, "_pid", None) != pid:
            if self._given[0] == pid:
                for env in self._given[1]:
                    adopt_environment(env)
            self._envs = [acquire_environment(p, self.readahead, i) for p, i in zip(self.paths, self._identities)]
            self._pid = pid
        return self._envs

    def close(self) -> None:
        """Release this process's handles (the last holder closes them); a later read reopens."""
        if getattr(self, "_pid", None) == os.getpid():
            for path in self.paths:
                release_environment(path)
        self._envs, self._pid = [], None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_envs", None)
        state.pop("_pid", None)
        state["_read_manifests"], state["_given"] = None, (-1, [])
        return state

    def reader(self) -> "_Reader":
        return _Reader(self)


class _Reader:
    """Read transactions on every LMDB of a store; ``get`` routes a key to its shard."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> "_Reader":
        try:
            self.txns = [env.begin(buffers=True) for env in self.store.environments()]
        except lmdb.Error as e:  # a handle closed under us: the LMDB was swapped by a newer dataset's open
            raise StaleDatasetError(f"{self.store}: this dataset's LMDB handle was closed because data.mdb was "
                                    f"replaced (re-encoded) since; create the dataset again ({e})") from None
        self._single = self.txns[0] if len(self.txns) == 1 else None
        return self

    def __exit__(self, *exc) -> None:
        for txn in self.txns:
            txn.abort()  # read-only: ending it is all there is to do

    def get(self, key: bytes) -> memoryview:
        if self._single is not None:
            value = self._single.get(key)
        elif self.store.shard_count:
            value = self.txns[self.store._position[shard_of(key, self.store.shard_count)]].get(key)
        else:
            value = next((v for v in (t.get(key) for t in self.txns) if v is not None), None)
        if value is None:
            from ..errors import UnknownKeyError

            raise UnknownKeyError(f"key {key.decode(errors='replace')!r} is not in the LMDB at {self.store}")
        return value

    def keys(self) -> list[str]:
        return [bytes(k).decode() for t in self.txns for k in t.cursor().iternext(keys=True, values=False)]

    def items(self):
        """(key bytes, value) of every LMDB in order: a cursor walk, no lookups."""
        for txn in self.txns:
            yield from txn.cursor().iternext(keys=True, values=True)
