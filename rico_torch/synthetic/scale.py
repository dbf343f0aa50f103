"""LMDBs of many keys with tiny values, written directly (no source files), for the scale test and
``benchmarks/scale.py``: what opening and setting up costs as the key count grows.

One generic writer (:func:`make_many_keys`) and a small description per kind (:data:`KINDS`): the
dataset, its sources with each source's key rule (the catalog's, REFERENCE.md section 1) and the
bands the benchmark's DataModule asks for, per-key labels, and the side files its DataModule reads
(split files, metadata). Keys come in *units* (a patch, a location's season, a grid cell, a tile)
of one or more keys each; ``count`` keys are about ``count // keys per unit`` units.

* ``scenes``: one UTM scene cut into ``patch`` px windows (keys ``S_<row>_<col>``), the layout
  ``python -m rico_torch.encode scenes`` writes (scene georeference, statistics, window offsets
  in ``keys.index``), each value one ``patch`` x ``patch`` band ``B1``;
* ``eurosat-ms``, ``uc-merced``: ``<Class>_<n>`` / ``<class><nn>`` keys with their class labels;
* ``bigearthnet``: S2 patches, their S1 partners and reference maps, with a ``metadata.parquet``
  (official schema; splits dealt in turn, one label each) beside ``data.mdb``;
* ``ssl4eo-s12``: S1, L1C and L2A keys of every location's four seasons;
* ``major-tom-core``: an S1 and an S2 product per grid cell (``<row>U_<col>R``);
* ``hydro``, ``spectral-earth-enmap``: ``patch_<n>`` / ``<tile>_<n>.tif`` keys;
* ``hyspecnet-11k``: ``<tile>-Y.._X..`` patches of 100 per tile, with ``splits/{easy,hard}/*.csv``;
* ``satlas``: 8 Sentinel-2 images of every zoom-13 tile (of 2,048 tiles per image) and its
  ``static/`` label, with ``metadata/`` (split files, image times, good images).

Values are 1 x 1 bands (``scenes``: ``patch`` x ``patch``) with the dataset's real band names and
dtypes, one per band the benchmark reads; they and their digests are real (``verify`` passes). The
manifest and its sidecar are written through :mod:`rico_torch.manifest`, as the encoder writes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np

from ..catalog import get_dataset
from ..encode.read import encode_value, value_digest
from ..format import parse_header
from ..manifest import build_columns, digest64, write
from .majortom import product_names
from .ssl4eo import ROOTS as SSL4EO_ROOTS
from .ssl4eo import acquisition_name

KeyRule = Callable[[np.ndarray, int], list[str]]  # (unit ids, patch) -> keys, ``per_unit`` per unit


@dataclass(frozen=True)
class Part:
    """One source's keys: ``per_unit`` keys per unit by ``keys``, each value holding ``bands``."""

    source: str
    bands: dict[str, str]  # band -> dtype
    keys: KeyRule
    per_unit: int = 1


@dataclass(frozen=True)
class Kind:
    """A dataset's many-keys LMDB: its sources (in write order), per-key labels of the first source
    (class index per unit), dataset-level manifest entries and side files beside ``data.mdb``."""

    dataset: str
    parts: tuple[Part, ...]
    labels: Callable[[np.ndarray], np.ndarray] | None = None
    side_files: Callable[[Path, int], None] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def per_unit(self) -> int:
        return sum(p.per_unit for p in self.parts)


def _classes(dataset: str) -> tuple[str, ...]:
    return tuple(get_dataset(dataset).classes)


# --- key rules -------------------------------------------------------------------------------------


def _scene_side(units: int) -> int:
    return math.isqrt(units - 1) + 1 if units else 1


def _scene_keys(ids: np.ndarray, patch: int) -> list[str]:
    rows, cols = np.divmod(ids, _scene_side(len(ids)))
    return [f"S_{r * patch}_{c * patch}" for r, c in zip(rows.tolist(), cols.tolist())]


def _ben(ids: np.ndarray) -> list[tuple[int, int, int]]:
    """A BigEarthNet patch's (product, row, col): 10,000 patches (100 x 100) per product."""
    product, at = np.divmod(ids, 10_000)
    rows, cols = np.divmod(at, 100)
    return list(zip(product.tolist(), rows.tolist(), cols.tolist()))


def _ben_s2(ids: np.ndarray, patch: int = 0) -> list[str]:
    return [f"S2A_MSIL2A_20170613T101031_N9999_R{p:03d}_T33UUP_{r}_{c}" for p, r, c in _ben(ids)]


def _ben_s1(ids: np.ndarray, patch: int = 0) -> list[str]:
    return [f"S1B_IW_GRDH_1SDV_20170612T{p:06d}_33UUP_{r}_{c}" for p, r, c in _ben(ids)]


def _ben_maps(ids: np.ndarray, patch: int = 0) -> list[str]:
    return [f"{k}_reference_map" for k in _ben_s2(ids)]


def _ssl4eo(source: str) -> KeyRule:
    # a unit is one season of one location: <root dir>_<location>_<acquisition>
    root = SSL4EO_ROOTS[source]
    return lambda ids, patch=0: [f"{root}_{u // 4:07d}_{acquisition_name(source, u // 4, u % 4)}" for u in ids.tolist()]


def _cell(unit: int) -> str:
    row, col = divmod(unit, 2048)
    return f"{row}U_{col}R"


def _majortom(which: int) -> KeyRule:
    # a unit is a grid cell with one product per modality (the S1 two days after the S2)
    return lambda ids, patch=0: [f"{_cell(u)}_{product_names(1 + u % 27)[which]}" for u in ids.tolist()]


def _hyspecnet_tile(tile: int) -> str:
    return f"ENMAP01-____L2A-DT{tile:010d}_20221103T162438Z_001_V010110_20221118T145147Z"


def _hyspecnet(ids: np.ndarray, patch: int = 0) -> list[str]:
    out = []
    for u in ids.tolist():  # 100 patches (10 x 10 of 128 px) per tile
        tile, at = divmod(u, 100)
        r, c = divmod(at, 10)
        out.append(f"{_hyspecnet_tile(tile)}-Y{r * 128 + 1:04d}{r * 128 + 128:04d}_X{c * 128 + 1:04d}"
                   f"{c * 128 + 128:04d}")
    return out


SATLAS_IMAGES = 8  # Sentinel-2 images per tile
SATLAS_TILES_PER_IMAGE = 2048


def _satlas_tile(unit: int) -> str:
    row, col = divmod(unit, 8192)
    return f"{col}_{2048 + row}"


def _satlas_image(unit: int, j: int) -> str:
    orbit, month = unit // SATLAS_TILES_PER_IMAGE, j + 1
    return f"S2A_MSIL1C_2020{month:02d}05T100401_N0208_R{orbit:03d}_T33UUP_2020{month:02d}05T104516"


def _satlas_images(ids: np.ndarray, patch: int = 0) -> list[str]:
    return [f"sentinel2/{_satlas_image(u, j)}/{_satlas_tile(u)}" for u in ids.tolist() for j in range(SATLAS_IMAGES)]


# --- side files ------------------------------------------------------------------------------------


def _ben_metadata(target: Path, units: int) -> None:
    """``metadata.parquet`` (official schema): splits dealt in turn (train, train, validation, test),
    one label per patch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .bigearthnet import METADATA_SCHEMA

    ids = np.arange(units)
    classes = np.array(_classes("bigearthnet"), dtype=object)
    labels = pa.ListArray.from_arrays(pa.array(np.arange(units + 1, dtype=np.int32)),
                                      pa.array(classes[ids % len(classes)].tolist(), pa.string()))
    table = pa.table({
        "patch_id": pa.array(_ben_s2(ids), pa.string()),
        "labels": labels.cast(METADATA_SCHEMA.field("labels").type),
        "split": pa.array(np.array(["train", "train", "validation", "test"], dtype=object)[ids % 4].tolist()),
        "country": pa.array(["Austria"] * units, pa.string()),
        "s1_name": pa.array(_ben_s1(ids), pa.string()),
        "s2v1_name": pa.array([f"S2A_MSIL2A_20170613T101031_{p}_{r}_{c}" for p, r, c in _ben(ids)], pa.string()),
        "contains_seasonal_snow": pa.array(np.zeros(units, bool)),
        "contains_cloud_or_shadow": pa.array(np.zeros(units, bool)),
    }, schema=METADATA_SCHEMA)
    pq.write_table(table, target / "metadata.parquet")


def _hyspecnet_splits(target: Path, units: int) -> None:
    """``splits/easy`` (patches dealt 7:2:1) and ``splits/hard`` (tiles dealt 7:2:1) CSV files."""
    keys = _hyspecnet(np.arange(units))
    for difficulty, deal in (("easy", np.arange(units) % 10), ("hard", (np.arange(units) // 100) % 10)):
        folder = target / "splits" / difficulty
        folder.mkdir(parents=True, exist_ok=True)
        for split, chosen in (("train", deal < 7), ("val", (deal == 7) | (deal == 8)), ("test", deal == 9)):
            lines = [f"{k.rsplit('-Y', 1)[0]}/{k}/{k}-DATA.npy" for k, keep in zip(keys, chosen.tolist()) if keep]
            (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")


def _satlas_metadata(target: Path, units: int) -> None:
    """``metadata/``: lowres splits (every tenth tile is test), image times, good images (all but
    one image in 16 of each tile), and an empty highres good-images file."""
    folder = target / "metadata"
    folder.mkdir(parents=True, exist_ok=True)
    tiles = [list(map(int, _satlas_tile(u).split("_"))) for u in range(units)]
    (folder / "train_lowres.json").write_text(json.dumps([t for u, t in enumerate(tiles) if u % 10 != 9]))
    (folder / "test_lowres.json").write_text(json.dumps([t for u, t in enumerate(tiles) if u % 10 == 9]))
    times = {_satlas_image(u, j): f"2020-{j + 1:02d}-05T10:04:01Z"
             for u in range(0, units, SATLAS_TILES_PER_IMAGE) for j in range(SATLAS_IMAGES)}
    (folder / "image_times.json").write_text(json.dumps(times, indent=1))
    good = [[*tiles[u], _satlas_image(u, j)] for u in range(units) for j in range(SATLAS_IMAGES)
            if (u + j) % 16 != 0]
    (folder / "good_images_lowres_all.json").write_text(json.dumps(good))
    (folder / "good_images_highres_all.json").write_text("[]")


# --- the kinds -------------------------------------------------------------------------------------

KINDS: dict[str, Kind] = {
    "scenes": Kind("scenes", (Part("S", {"B1": "uint16"}, _scene_keys),)),
    "eurosat-ms": Kind(
        "eurosat-ms",
        (Part("images", {"B02": "uint16"},
              lambda ids, patch=0: [f"{_classes('eurosat-ms')[i % 10]}_{i}" for i in ids.tolist()]),),
        labels=lambda ids: ids % len(_classes("eurosat-ms"))),
    "uc-merced": Kind(
        "uc-merced",
        (Part("images", {"Red": "uint8"},
              lambda ids, patch=0: [f"{_classes('uc-merced')[i % 21]}{i // 21:02d}" for i in ids.tolist()]),),
        labels=lambda ids: ids % len(_classes("uc-merced"))),
    "bigearthnet": Kind(
        "bigearthnet",
        (Part("s1", {"VV": "float32"}, _ben_s1), Part("s2", {"B04": "uint16"}, _ben_s2),
         Part("reference_maps", {"Data": "uint16"}, _ben_maps)),
        side_files=_ben_metadata),
    "ssl4eo-s12": Kind(
        "ssl4eo-s12",
        (Part("s1", {"VV": "float32"}, _ssl4eo("s1")), Part("s2_l1c", {"B4": "uint16"}, _ssl4eo("s2_l1c")),
         Part("s2_l2a", {"B4": "uint16"}, _ssl4eo("s2_l2a")))),
    "major-tom-core": Kind(
        "major-tom-core", (Part("s1", {"vv": "float32"}, _majortom(1)), Part("s2", {"B04": "uint16"}, _majortom(0)))),
    "hydro": Kind("hydro", (Part("patches", {"B04": "uint16"},
                                 lambda ids, patch=0: [f"patch_{i}" for i in ids.tolist()]),)),
    "spectral-earth-enmap": Kind(
        "spectral-earth-enmap",
        (Part("patches", {"B1": "int16"},
              lambda ids, patch=0: [f"{19_000 + i // 256}_{i % 256}.tif" for i in ids.tolist()]),)),
    "hyspecnet-11k": Kind("hyspecnet-11k", (Part("patches", {"B1": "int16"}, _hyspecnet),),
                          side_files=_hyspecnet_splits),
    "satlas": Kind(
        "satlas",
        (Part("sentinel2", {"b08": "uint8"}, _satlas_images, SATLAS_IMAGES),
         Part("static", {"land_cover": "uint8"},
              lambda ids, patch=0: [f"static/{_satlas_tile(u)}" for u in ids.tolist()])),
        side_files=_satlas_metadata),
}


# --- the writer ------------------------------------------------------------------------------------


def _template(bands: dict[str, str], shape: tuple[int, int]) -> tuple[bytes, str, tuple[int, int], np.dtype]:
    """A value of ``bands`` without its last tensor's bytes, and that tensor's band, shape, dtype."""
    value = encode_value({b: np.zeros(shape, np.dtype(d)) for b, d in bands.items()})
    header = parse_header(value, "template")
    last = max(header, key=lambda b: header[b].end)
    assert header[last].end == len(value)
    return value[: header[last].begin], last, shape, header[last].dtype


def make_many_keys(target: str | Path, count: int, kind: str | Kind = "scenes", patch: int = 2) -> Path:
    """Write an LMDB of about ``count`` keys of ``kind`` (a name of :data:`KINDS`, see the module doc,
    or a :class:`Kind` of your own) into ``target``, with its manifest, sidecar and side files."""
    if not isinstance(kind, Kind) and kind not in KINDS:
        raise ValueError(f"kind={kind!r}: one of {tuple(KINDS)}")
    spec = kind if isinstance(kind, Kind) else KINDS[kind]
    kind = spec.dataset
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    units = count if kind == "scenes" else max(1, count // spec.per_unit)
    ids = np.arange(units)
    shape = (patch, patch) if kind == "scenes" else (1, 1)
    keys: list[str] = []
    ranges: dict[str, tuple[int, int]] = {}
    templates = []  # per key: its part
    for n, part in enumerate(spec.parts):
        made = part.keys(ids, patch)
        assert len(made) == units * part.per_unit, f"{kind}/{part.source}: {len(made)} keys"
        ranges[part.source] = (len(keys), len(keys) + len(made))
        keys.extend(made)
        templates.append(_template(part.bands, shape))
    total = len(keys)
    part_of = np.zeros(total, np.int8)
    for n, (start, stop) in enumerate(ranges.values()):
        part_of[start:stop] = n
    raw_keys = [k.encode() for k in keys]
    digests = np.empty(total, np.uint64)
    content, size = 0, 0
    order = sorted(range(total), key=raw_keys.__getitem__)  # LMDB's order: appends are fastest
    longest = max(len(t[0]) for t in templates) + 2 * 4 * shape[0] * shape[1]
    map_size = max(64 << 20, 4 * total * (longest + 64))  # room for the pages; the file holds what is used
    env = lmdb.open(str(target), map_size=map_size, subdir=True, max_dbs=0, sync=False)
    try:
        with env.begin(write=True) as txn:
            cursor = txn.cursor()
            for i in order:
                head, _, tail_shape, dtype = templates[part_of[i]]
                value = head + np.full(tail_shape, i % 251, dtype).tobytes()
                digest = value_digest(raw_keys[i], value)
                digests[i], content = digest64(digest), (content + digest) % (1 << 256)
                size += len(value)
                if not cursor.put(raw_keys[i], value, append=True, overwrite=False):
                    raise ValueError(f"{kind}: key {keys[i]!r} twice")
        env.sync(True)
    finally:
        env.close()
    (target / "lock.mdb").unlink(missing_ok=True)
    bands = {}
    for part, (head, last, _, _) in zip(spec.parts, templates):
        value = encode_value({b: np.zeros(shape, np.dtype(d)) for b, d in part.bands.items()})
        bands[part.source] = {b: {"dtype": info.dtype.name, "shape": list(info.shape)}
                              for b, info in parse_header(value, "template").items()}
    classes = [] if kind == "scenes" else list(get_dataset(kind).classes)
    manifest = {
        "format": "rico-hdl: LMDB of safetensors (band name -> array)", "encoder": "rico_torch",
        "encoder_version": "synthetic", "dataset": kind, "sources": {s: "synthetic" for s in ranges},
        "fingerprint": f"synthetic-{kind}-{count}", "complete": True, "patches": total,
        "counts": {s: b - a for s, (a, b) in ranges.items()}, "bytes": size, "content_hash": f"{content:064x}",
        "bands": bands, "classes": classes, "skipped": [], **spec.extra,
    }
    facts: dict[str, np.ndarray] = {}
    if spec.labels is not None:
        facts["label"] = np.full(total, -1, "<i4")
        first = ranges[spec.parts[0].source]
        facts["label"][first[0] : first[1]] = np.repeat(spec.labels(ids), spec.parts[0].per_unit)
    if kind == "scenes":
        side = _scene_side(units)
        rows, cols = np.divmod(ids, side)
        facts.update(row=(rows * patch).astype("<i4"), col=(cols * patch).astype("<i4"))
        manifest.update(
            chip={"patch_size": patch, "stride": patch, "edge": "shift", "min_valid": 1, "bands": None},
            scenes={"S": {"path": "synthetic", "crs": "EPSG:32632", "transform": [10.0, 0.0, 600000.0, 0.0, -10.0,
                                                                                 5000040.0],
                          "width": side * patch, "height": side * patch, "labels": None,
                          "bands": {"B1": {"resolution": [10.0, 10.0], "ratio": 1, "nodata": None,
                                           "dtype": "uint16", "width": side * patch, "height": side * patch}}}},
            statistics={"B1": {"count": units * patch * patch, "mean": 1.0, "std": 1.0, "min": 0.0, "max": 2.0}},
            skipped_nodata=0, skipped_nodata_per_source={"S": 0})
    columns = build_columns(np.array(raw_keys, dtype=np.bytes_), digests, **facts)
    write(target, manifest, ranges, columns)
    if spec.side_files is not None:
        spec.side_files(target, units)
    return target
