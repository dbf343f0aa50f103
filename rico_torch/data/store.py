"""Read-only access to one LMDB, or to the shards of one dataset as if they were one.

Shards are written by ``python -m rico_torch.encode ... --shard I/N``; a key lives in shard
``zlib.crc32(key) % N``, so a reader finds it without a lookup table. LMDBs that are not
shards of one set are searched in the order given.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import lmdb

from ..errors import DatasetNotFoundError

_ENVIRONMENTS: dict[str, tuple[int, lmdb.Environment]] = {}


def shard_of(key: bytes, count: int) -> int:
    """The shard a key belongs to (the encoder's ``--shard`` rule)."""
    return zlib.crc32(key) % count


def read_manifest(path: str | Path) -> dict | None:
    """The encoder's ``manifest.json`` beside ``data.mdb``, or None (e.g. rico-hdl output)."""
    file = Path(path) / "manifest.json"
    if not file.exists():
        return None
    return json.loads(file.read_text())


def open_environment(path: Path, readahead: bool = False) -> lmdb.Environment:
    """This process's read-only handle on an LMDB, shared by every dataset reading it.

    py-lmdb allows one handle per file and process, so the first opener's ``readahead`` holds
    for all. ``lock=False``: readers write nothing (works on read-only storage); the encoder
    never writes to a finished dataset, so no reader/writer coordination is needed.
    """
    real = os.path.realpath(path)
    pid, env = _ENVIRONMENTS.get(real, (-1, None))
    if env is None or pid != os.getpid():
        if env is not None:  # inherited through fork: release the copy, never read through it
            env.close()
        env = lmdb.open(real, readonly=True, lock=False, readahead=readahead, max_readers=2048, subdir=True,
                        max_dbs=0)
        _ENVIRONMENTS[real] = (os.getpid(), env)
    return env


class Store:
    """One dataset in one or more LMDB directories, opened lazily in the reading process."""

    def __init__(self, paths: str | Path | list[str | Path], readahead: bool = False) -> None:
        self.paths = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
        if not self.paths:
            raise ValueError("no LMDB path given")
        for path in self.paths:
            if not (path / "data.mdb").exists():
                raise DatasetNotFoundError(
                    f"{path}: no encoded dataset here (data.mdb missing); create it with "
                    f"`python -m rico_torch.encode <dataset> ... --target-dir {path}`"
                )
        self.readahead = readahead
        self.shard_count = 0
        self._position: list[int] = []
        if len(self.paths) > 1:
            self._route([read_manifest(p) for p in self.paths])

    def _route(self, manifests: list[dict | None]) -> None:
        """Route keys by the shard rule when the paths are exactly the shards of one set."""
        shards = [(m or {}).get("shard") for m in manifests]
        counts = {s["count"] for s in shards if s}
        if all(shards) and len(counts) == 1:
            self.shard_count = counts.pop()
            index = {s["index"]: i for i, s in enumerate(shards)}
            missing = sorted(set(range(self.shard_count)) - set(index))
            if missing:
                raise DatasetNotFoundError(f"shards {missing} of {self.shard_count} are missing from {self.paths}")
            self._position = [index[i] for i in range(self.shard_count)]

    def __str__(self) -> str:
        return str(self.paths[0]) if len(self.paths) == 1 else f"{len(self.paths)} shards ({self.paths[0]}, ...)"

    def manifest(self) -> dict | None:
        """The manifests, read now and merged over shards: keys, labels and bands (None if any
        path lacks one, e.g. rico-hdl output).

        Read on demand and not kept: with every key listed it can take tens of MB, which the
        store (carried into every DataLoader worker) must not hold.
        """
        manifests = [read_manifest(p) for p in self.paths]
        if any(m is None for m in manifests):
            return None
        if len(manifests) == 1:
            return manifests[0]
        merged: dict = {"classes": manifests[0].get("classes", []), "keys": {}, "labels": {}, "bands": {}}
        for m in manifests:
            for source, keys in m.get("keys", {}).items():
                merged["keys"].setdefault(source, []).extend(keys)
            merged["labels"].update(m.get("labels", {}))
            for source, table in m.get("bands", {}).items():
                merged["bands"].setdefault(source, {}).update(table)
        return merged

    def environments(self) -> list[lmdb.Environment]:
        """This process's handles (looked up once per process, not per read)."""
        pid = os.getpid()
        if getattr(self, "_pid", None) != pid:
            self._envs = [open_environment(p, self.readahead) for p in self.paths]
            self._pid = pid
        return self._envs

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_envs", None)
        state.pop("_pid", None)
        return state

    def reader(self) -> "_Reader":
        return _Reader(self)


class _Reader:
    """Read transactions on every LMDB of a store; ``get`` routes a key to its shard."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> "_Reader":
        self.txns = [env.begin(buffers=True) for env in self.store.environments()]
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
            raise KeyError(f"key {key.decode()!r} is not in the LMDB at {self.store}")
        return value

    def keys(self) -> list[str]:
        return [bytes(k).decode() for t in self.txns for k in t.cursor().iternext(keys=True, values=False)]
