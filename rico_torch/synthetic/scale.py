"""LMDBs of many keys with tiny values, written directly (no source files), for the scale test and
``benchmarks/scale.py``: what opening and setting up costs as the key count grows.

* ``scenes``: one UTM scene cut into ``patch`` px windows (keys ``S_<row>_<col>``), the layout
  ``python -m rico_torch.encode scenes`` writes (scene georeference, statistics, window offsets
  in ``keys.index``), each value one ``patch`` x ``patch`` band ``B1``;
* ``eurosat-ms``: EuroSAT-like keys ``<Class>_<n>`` with their class labels, each value one
  1 x 1 band ``B02``.

Values and digests are real (``verify`` passes); the manifest and its sidecar are written through
:mod:`rico_torch.manifest`, as the encoder writes them.
"""

from __future__ import annotations

import math
from pathlib import Path

import lmdb
import numpy as np

from ..catalog import get_dataset
from ..encode.read import encode_value, value_digest
from ..format import parse_header
from ..manifest import build_columns, digest64, write

KINDS = ("scenes", "eurosat-ms")


def _keys(kind: str, count: int, patch: int) -> tuple[list[str], dict]:
    if kind == "scenes":
        side = math.isqrt(count - 1) + 1
        rows, cols = np.divmod(np.arange(count), side)
        return [f"S_{r * patch}_{c * patch}" for r, c in zip(rows.tolist(), cols.tolist())], {
            "row": (rows * patch).astype("<i4"), "col": (cols * patch).astype("<i4"), "side": side}
    classes = get_dataset("eurosat-ms").classes
    labels = np.arange(count) % len(classes)
    return [f"{classes[c]}_{i}" for i, c in enumerate(labels.tolist())], {"label": labels.astype("<i4")}


def make_many_keys(target: str | Path, count: int, kind: str = "scenes", patch: int = 2) -> Path:
    """Write an LMDB of ``count`` keys of ``kind`` (see the module doc) into ``target``."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: one of {KINDS}")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    keys, facts = _keys(kind, count, patch)
    band, shape = ("B1", (patch, patch)) if kind == "scenes" else ("B02", (1, 1))
    template = encode_value({band: np.zeros(shape, np.uint16)})
    head = template[: len(template) - 2 * shape[0] * shape[1]]
    pixels = np.arange(count, dtype=np.uint64)
    digests = np.empty(count, np.uint64)
    total, raw_keys = 0, [k.encode() for k in keys]
    order = sorted(range(count), key=raw_keys.__getitem__)  # LMDB's order: appends are fastest
    map_size = max(64 << 20, 4 * count * (len(template) + 64))  # room for the pages; the file holds what is used
    env = lmdb.open(str(target), map_size=map_size, subdir=True, max_dbs=0, sync=False)
    try:
        with env.begin(write=True) as txn:
            cursor = txn.cursor()
            for i in order:
                value = head + np.full(shape, pixels[i] % 65536, np.uint16).tobytes()
                digest = value_digest(raw_keys[i], value)
                digests[i], total = digest64(digest), (total + digest) % (1 << 256)
                cursor.put(raw_keys[i], value, append=True)
        env.sync(True)
    finally:
        env.close()
    (target / "lock.mdb").unlink(missing_ok=True)
    info = parse_header(template, keys[0])[band]
    entry = {"dtype": info.dtype.name, "shape": list(info.shape)}
    source = "S" if kind == "scenes" else "images"
    manifest = {
        "format": "rico-hdl: LMDB of safetensors (band name -> array)", "encoder": "rico_torch",
        "encoder_version": "synthetic", "dataset": kind, "sources": {source: "synthetic"},
        "fingerprint": f"synthetic-{kind}-{count}", "complete": True, "patches": count, "counts": {source: count},
        "bytes": count * len(template), "content_hash": f"{total:064x}", "bands": {source: {band: entry}},
        "classes": [] if kind == "scenes" else list(get_dataset(kind).classes), "skipped": [],
    }
    if kind == "scenes":
        side = facts.pop("side") * patch
        manifest.update(
            chip={"patch_size": patch, "stride": patch, "edge": "shift", "min_valid": 1, "bands": None},
            scenes={"S": {"path": "synthetic", "crs": "EPSG:32632", "transform": [10.0, 0.0, 600000.0, 0.0, -10.0,
                                                                                 5000040.0],
                          "width": side, "height": side, "labels": None,
                          "bands": {band: {"resolution": [10.0, 10.0], "ratio": 1, "nodata": None, "dtype": "uint16",
                                           "width": side, "height": side}}}},
            statistics={band: {"count": count * patch * patch, "mean": 1.0, "std": 1.0, "min": 0.0, "max": 2.0}},
            skipped_nodata=0)
    columns = build_columns(np.array(raw_keys, dtype=np.bytes_), digests, **facts)
    write(target, manifest, {source: (0, count)}, columns)
    return target
