"""Synthetic BigEarthNet v2 in the real layout: S1 and S2 patches, reference maps, metadata.

Layout written under ``root`` (exactly as the official archives unpack)::

    BigEarthNet-S1/<S1 tile>/<S1 name>/<S1 name>_{VH,VV}.tif
    BigEarthNet-S2/<S2 tile>/<S2 name>/<S2 name>_B01.tif ... _B12.tif, _B8A.tif  (no B10)
    Reference_Maps/<S2 tile>/<S2 name>/<S2 name>_reference_map.tif

where a tile directory is the patch name without its trailing ``_<x>_<y>``. Note that the
real S2 names zero-pad the patch position (``_00_45``) while the paired S1 names do not
(``_0_45``); the default names reproduce that.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rasterio.crs import CRS

from ..catalog.base import Source
from ..catalog.bigearthnet import CLASS_CLC_CODES, CLASSES_ALPHABETICAL, REFERENCE_MAPS, S1, S2
from ._common import assign_round_robin, rng_for
from ._geotiff import crs_of_mgrs_tile, distinct_band, square_transform, write_geotiff

S1_DIRNAME = "BigEarthNet-S1"
S2_DIRNAME = "BigEarthNet-S2"
REFERENCE_MAPS_DIRNAME = "Reference_Maps"

PATCH_PIXELS = 120
PATCH_METRES = 1200  # 120 px at 10 m; 20 m and 60 m bands cover the same square
SPLITS = ("train", "validation", "test")
#: CLC-2018 codes that occur in reference maps but map to none of the 19 classes
#: (999: outside CLC coverage).
UNLABELED_CODES = (132, 332, 999)
#: MGRS tile -> country, for the tiles in the official metadata.
TILE_COUNTRY = {
    "T33UUP": "Austria", "T34VER": "Finland", "T29UPU": "Ireland", "T29SND": "Portugal",
    "T34UDG": "Lithuania", "T34TCR": "Serbia", "T32TMT": "Switzerland", "T34TEN": "Kosovo",
    "T31UGR": "Belgium",
}  # fmt: skip
COUNTRIES = ("Austria", "Belgium", "Finland", "Ireland", "Kosovo", "Lithuania", "Luxembourg",
             "Portugal", "Serbia", "Switzerland")  # fmt: skip

#: Real (S2 tile dir, S1 tile dir, first x, first y) acquisitions the default names follow.
#: The Portuguese one starts at 0_0, so its S2 names show the zero padding S1 names lack.
_DEFAULT_TILES = (
    ("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP", "S1B_IW_GRDH_1SDV_20170612T165809_33UUP", 26, 57),
    ("S2A_MSIL2A_20170704T112111_N9999_R037_T29SND", "S1A_IW_GRDH_1SDV_20170706T064235_29SND", 0, 0),
)
_MGRS_IN_NAME = re.compile(r"_(T\d{2}[C-X][A-Z]{2})_")

# Value ranges: S1 backscatter in dB (negative), S2 L2A reflectance x 10,000. Each band gets
# its own disjoint range so a band mix-up shows in the values.
S1_VALUES = {"base": -25.0, "step": 10.0, "spread": 9.5}  # VH in [-25, -15.5), VV in [-15, -5.5)
S2_VALUES = {"base": 100, "step": 600, "spread": 500}  # B01 in [100, 600) ... B8A in [6700, 7200)
_REFERENCE_BLOCKS = 4  # reference maps are 4x4 blocks of one code each (30 px)

METADATA_SCHEMA = pa.schema(
    [
        ("patch_id", pa.string()),
        # The official file was written by DuckDB, whose list child is called "element".
        ("labels", pa.list_(pa.field("element", pa.string()))),
        ("split", pa.string()),
        ("country", pa.string()),
        ("s1_name", pa.string()),
        ("s2v1_name", pa.string()),
        ("contains_seasonal_snow", pa.bool_()),
        ("contains_cloud_or_shadow", pa.bool_()),
    ]
)


@dataclass(frozen=True)
class BigEarthNetFiles:
    """What :func:`make_bigearthnet` wrote.

    Attributes:
        root: the directory given.
        s1_dir: ``root/BigEarthNet-S1``, or ``None`` when S1 was not written.
        s2_dir: ``root/BigEarthNet-S2``, or ``None``.
        reference_maps_dir: ``root/Reference_Maps``, or ``None``.
        s1_keys: LMDB keys of the S1 patches written (sorted; empty when not written).
        s2_keys: LMDB keys of the S2 patches written (sorted).
        reference_map_keys: LMDB keys of the reference maps written
            (``<S2 name>_reference_map``, sorted).
        pairs: ``(S2 name, S1 name)`` of every patch, in generation order (also when a
            modality was not written, so metadata can still be made for them).
        labels: S2 name -> class names present in its reference map, alphabetical (as in
            the official metadata).
    """

    root: Path
    s1_dir: Path | None
    s2_dir: Path | None
    reference_maps_dir: Path | None
    s1_keys: tuple[str, ...]
    s2_keys: tuple[str, ...]
    reference_map_keys: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    labels: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class BigEarthNetMetadata:
    """What :func:`make_bigearthnet_metadata` wrote.

    Attributes:
        path: the metadata parquet.
        snow_cloud_path: the snow/cloud parquet, or ``None``.
        splits: S2 name -> split, for every row of both files.
        labels: S2 name -> class names, for every row of both files.
        snow_cloud: S2 names moved to the snow/cloud file (sorted).
    """

    path: Path
    snow_cloud_path: Path | None
    splits: dict[str, str]
    labels: dict[str, tuple[str, ...]]
    snow_cloud: tuple[str, ...]


def default_names(patches: int) -> list[tuple[str, str]]:
    """``patches`` realistic ``(S2 name, S1 name)`` pairs alternating over two real tiles."""
    names = []
    for i in range(patches):
        s2_tile, s1_tile, x, y = _DEFAULT_TILES[i % len(_DEFAULT_TILES)]
        y += i // len(_DEFAULT_TILES)
        names.append((f"{s2_tile}_{x:02d}_{y:02d}", f"{s1_tile}_{x}_{y}"))
    return names


def tile_dir(name: str) -> str:
    """A patch's tile directory name: the patch name without its trailing ``_<x>_<y>``."""
    return name.rsplit("_", 2)[0]


def _position(name: str) -> tuple[int, int]:
    x, y = name.rsplit("_", 2)[1:]
    return int(x), int(y)


def _mgrs_tile(s2_name: str) -> str | None:
    m = _MGRS_IN_NAME.search(s2_name)
    return m.group(1) if m else None


def _georeference(s2_name: str) -> tuple[CRS, float, float]:
    """CRS and upper-left corner of a patch, from its tile and position in the tile."""
    tile = _mgrs_tile(s2_name)
    crs = crs_of_mgrs_tile(tile) if tile else crs_of_mgrs_tile("T33UUP")
    x, y = _position(s2_name)
    # 300000/5300040 is a typical S2 tile corner; patches are laid out on a 1200 m grid in it.
    return crs, 300_000.0 + x * PATCH_METRES, 5_300_040.0 - y * PATCH_METRES


def _reference_map(rng: np.random.Generator) -> np.ndarray:
    """A blocky CLC-2018 level-3 map holding a few labelled codes and one unlabelled code."""
    labelled = [c for codes in CLASS_CLC_CODES.values() for c in codes]
    chosen = rng.choice(labelled, size=int(rng.integers(2, 5)), replace=False).tolist()
    chosen.append(int(rng.choice(UNLABELED_CODES)))
    cells = rng.choice(chosen, size=_REFERENCE_BLOCKS * _REFERENCE_BLOCKS)
    cells[: len(chosen)] = chosen  # every chosen code appears at least once
    rng.shuffle(cells)
    blocks = cells.reshape(_REFERENCE_BLOCKS, _REFERENCE_BLOCKS)
    scale = PATCH_PIXELS // _REFERENCE_BLOCKS
    return np.kron(blocks, np.ones((scale, scale), dtype=np.int64)).astype(REFERENCE_MAPS.dtype)


def _labels_of(reference_map: np.ndarray) -> tuple[str, ...]:
    present = set(np.unique(reference_map).tolist())
    return tuple(c for c in CLASSES_ALPHABETICAL if present.intersection(CLASS_CLC_CODES[c]))


def write_bands(
    patch: Path, prefix: str, source: Source, rng: np.random.Generator, values: dict,
    crs: CRS, x_min: float, y_max: float,
) -> None:  # fmt: skip
    """Write one S1 or S2 patch into its folder: one single-band, uncompressed, stripped GeoTIFF
    per band, named by the band's file template with ``prefix`` (v2: the folder name)."""
    for b, band in enumerate(source.bands):
        data = distinct_band(rng, b, band.shape, dtype=source.dtype, **values)
        transform = square_transform(x_min, y_max, PATCH_METRES, band.shape[1])
        write_geotiff(patch / band.file.format(name=prefix, prefix=prefix), data, crs=crs, transform=transform)


def make_bigearthnet(
    root: Path,
    patches: int = 4,
    seed: int = 0,
    *,
    s1: bool = True,
    s2: bool = True,
    reference_maps: bool = True,
    names: Sequence[tuple[str, str]] | None = None,
) -> BigEarthNetFiles:
    """Write a small synthetic BigEarthNet v2 in the official directory layout.

    Files match the real ones: S1 ``VH``/``VV`` float32 120x120 (dB, negative); S2 bands
    uint16 at 120/60/20 px over the same 1.2 km footprint; all single-band, uncompressed,
    stripped and georeferenced in the tile's UTM zone. Reference maps are uint16 120x120
    CLC-2018 codes (including unlabelled ones such as 999), deflate-compressed.

    Args:
        root: directory to write into (created).
        patches: number of S1/S2 pairs when ``names`` is not given.
        seed: makes the values reproducible; the same seed writes identical files.
        s1: write ``BigEarthNet-S1``.
        s2: write ``BigEarthNet-S2``.
        reference_maps: write ``Reference_Maps``.
        names: ``(S2 name, S1 name)`` pairs to use instead of generated ones, e.g. real
            ids from the official metadata (``patch_id``, ``s1_name``).

    Returns:
        The directories and keys written, the pairs and each patch's labels.
    """
    root = Path(root)
    pairs = tuple((str(a), str(b)) for a, b in (names if names is not None else default_names(patches)))
    for s2_name, s1_name in pairs:
        if not S2.matches(s2_name) or not S1.matches(s1_name):
            raise ValueError(f"not a BigEarthNet S2/S1 name pair: {(s2_name, s1_name)}")
    s1_dir, s2_dir, ref_dir = (root / d for d in (S1_DIRNAME, S2_DIRNAME, REFERENCE_MAPS_DIRNAME))
    labels: dict[str, tuple[str, ...]] = {}
    for i, (s2_name, s1_name) in enumerate(pairs):
        crs, x_min, y_max = _georeference(s2_name)
        if s1:
            write_bands(s1_dir / tile_dir(s1_name) / s1_name, s1_name, S1, rng_for(seed, i, 1), S1_VALUES, crs,
                        x_min, y_max)
        if s2:
            write_bands(s2_dir / tile_dir(s2_name) / s2_name, s2_name, S2, rng_for(seed, i, 2), S2_VALUES, crs,
                        x_min, y_max)
        reference = _reference_map(rng_for(seed, i, 3))
        labels[s2_name] = _labels_of(reference)
        if reference_maps:
            path = ref_dir / tile_dir(s2_name) / s2_name / f"{s2_name}_reference_map.tif"
            write_geotiff(
                path, reference, compress="deflate",
                crs=crs, transform=square_transform(x_min, y_max, PATCH_METRES, PATCH_PIXELS),
            )  # fmt: skip
    s2_names = sorted(p[0] for p in pairs)
    return BigEarthNetFiles(
        root=root,
        s1_dir=s1_dir if s1 else None,
        s2_dir=s2_dir if s2 else None,
        reference_maps_dir=ref_dir if reference_maps else None,
        s1_keys=tuple(sorted(p[1] for p in pairs)) if s1 else (),
        s2_keys=tuple(s2_names) if s2 else (),
        reference_map_keys=tuple(f"{n}_reference_map" for n in s2_names) if reference_maps else (),
        pairs=pairs,
        labels=labels,
    )


def _s2v1_name(s2_name: str) -> str:
    """BigEarthNet v1 name of a v2 S2 patch: no processing baseline/orbit/tile, no padding."""
    x, y = _position(s2_name)
    return "_".join(s2_name.split("_")[:3]) + f"_{x}_{y}"


def make_bigearthnet_metadata(
    path: Path,
    pairs: Sequence[tuple[str, str]],
    seed: int = 0,
    snow_cloud_path: Path | None = None,
    *,
    labels: Mapping[str, Sequence[str]] | None = None,
) -> BigEarthNetMetadata:
    """Write a ``metadata.parquet`` with the official schema for the given patches.

    Splits are dealt in turn after a seeded shuffle, so three or more patches cover train,
    validation and test. Rows are sorted by ``patch_id``.

    Args:
        path: parquet file to write.
        pairs: ``(S2 name, S1 name)`` pairs, e.g. ``BigEarthNetFiles.pairs``.
        seed: seed for splits, countries of unknown tiles and labels not given.
        snow_cloud_path: if given, every fourth patch (at least one of two or more) goes
            into this second parquet instead (same schema), flagged as seasonal snow or
            cloud/shadow in turn, as in the official
            ``metadata_for_patches_with_snow_cloud_or_shadow.parquet``.
        labels: S2 name -> class names (e.g. ``BigEarthNetFiles.labels``, consistent with
            the reference maps); random classes where not given.

    Returns:
        The files and the split and labels of every row.
    """
    s2_names = sorted(p[0] for p in pairs)
    s1_of = dict(pairs)
    splits = assign_round_robin(s2_names, SPLITS, seed)
    moved: list[str] = []
    if snow_cloud_path is not None:
        moved = [n for i, n in enumerate(s2_names) if i % 4 == 3]
        if not moved and len(s2_names) >= 2:
            moved = [s2_names[-1]]
    all_labels: dict[str, tuple[str, ...]] = {}
    rows: dict[bool, list[dict]] = {False: [], True: []}
    for i, name in enumerate(s2_names):
        rng = rng_for(seed, i, 4)
        if labels is not None and name in labels:
            names = tuple(sorted(labels[name]))
        else:
            picked = rng.choice(len(CLASSES_ALPHABETICAL), size=int(rng.integers(1, 5)), replace=False)
            names = tuple(CLASSES_ALPHABETICAL[j] for j in sorted(picked))
        all_labels[name] = names
        tile = _mgrs_tile(name)
        in_snow_cloud = name in moved
        snow = in_snow_cloud and moved.index(name) % 2 == 0
        rows[in_snow_cloud].append(
            {
                "patch_id": name,
                "labels": list(names),
                "split": splits[name],
                "country": TILE_COUNTRY.get(tile) or str(rng.choice(COUNTRIES)),
                "s1_name": s1_of[name],
                "s2v1_name": _s2v1_name(name),
                "contains_seasonal_snow": snow,
                "contains_cloud_or_shadow": in_snow_cloud and not snow,
            }
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows[False], schema=METADATA_SCHEMA), path)
    if snow_cloud_path is not None:
        snow_cloud_path = Path(snow_cloud_path)
        snow_cloud_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows[True], schema=METADATA_SCHEMA), snow_cloud_path)
    return BigEarthNetMetadata(
        path=path,
        snow_cloud_path=snow_cloud_path,
        splits=splits,
        labels=all_labels,
        snow_cloud=tuple(moved),
    )
