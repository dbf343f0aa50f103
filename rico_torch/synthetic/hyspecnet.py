"""Synthetic HySpecNet-11k in the real layout: EnMAP patches plus the split CSVs.

Layout written under ``root`` (as the official archive unpacks)::

    patches/<tile>/<patch>/<patch>-SPECTRAL_IMAGE.TIF      the only file that is encoded
    patches/<tile>/<patch>/<patch>-QL_PIXELMASK.TIF        decoys: quality layers and
    patches/<tile>/<patch>/<patch>-QL_QUALITY_CLOUD.TIF    a thumbnail, which the encoder
    patches/<tile>/<patch>/<patch>-THUMBNAIL.jpg           must skip
    splits/{easy,hard}/{train,val,test}.csv                lines <tile>/<patch>/<patch>-DATA.npy

A patch is ``<tile>-Y<first row><last row>_X<first col><last col>`` (4 digits each), so the
tile directory is the patch name without ``-Y..._X...``. Give ``patches_dir`` to the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..catalog.hyspecnet import NODATA, NUM_BANDS, PATCHES
from ._common import SplitFiles, rng_for, write_split_files
from ._geotiff import distinct_bands, square_transform, utm_crs, write_geotiff

PATCHES_DIRNAME = "patches"
SPLITS_DIRNAME = "splits"
DIFFICULTIES = ("easy", "hard")
SPLITS = ("train", "val", "test")
PATCH_PIXELS = 128
PIXEL_METRES = 30
DECOY_SUFFIXES = ("-QL_PIXELMASK.TIF", "-QL_QUALITY_CLOUD.TIF", "-THUMBNAIL.jpg")

#: (tile name, UTM zone): the first is a real HySpecNet tile, the second one in its style.
_TILES = (
    ("ENMAP01-____L2A-DT0000004950_20221103T162438Z_001_V010110_20221118T145147Z", 13),
    ("ENMAP01-____L2A-DT0000001280_20220627T104548Z_012_V010110_20221014T085121Z", 32),
)
# Surface reflectance x 10,000, one disjoint range per band: B1 in [100, 130) ... B224 in
# [9020, 9050), so a band mix-up shows in the values.
_VALUES = {"base": 100, "step": 40, "spread": 30}
_NODATA_CORNER = 24  # pixels with row + col below this are nodata, like a scene edge
# Any bytes do: nothing may read the thumbnail; these are a minimal JPEG's markers.
_THUMBNAIL = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"


@dataclass(frozen=True)
class HySpecNetFiles:
    """What :func:`make_hyspecnet` wrote.

    Attributes:
        root: the directory given.
        patches_dir: ``root/patches``, the encoder's input directory.
        splits_dir: ``root/splits``.
        keys: LMDB keys (patch directory names), sorted.
        tiles: patch key -> tile directory name.
        decoys: the files that must not be encoded.
        splits: difficulty (``"easy"``, ``"hard"``) -> its split files and assignment.
    """

    root: Path
    patches_dir: Path
    splits_dir: Path
    keys: tuple[str, ...]
    tiles: dict[str, str]
    decoys: tuple[Path, ...]
    splits: dict[str, SplitFiles]


def patch_name(tile: str, row: int, col: int) -> str:
    """HySpecNet patch name for the 128x128 window whose upper-left pixel is ``(row, col)``."""
    last = PATCH_PIXELS - 1
    return f"{tile}-Y{row:04d}{row + last:04d}_X{col:04d}{col + last:04d}"


def make_hyspecnet(root: Path, patches: int = 2, seed: int = 0) -> HySpecNetFiles:
    """Write a small synthetic HySpecNet-11k in the official directory layout.

    Each ``-SPECTRAL_IMAGE.TIF`` is 224 bands of int16 128x128, band-interleaved,
    deflate-compressed, georeferenced (UTM, 30 m), nodata -32768 with a nodata corner.
    Patches alternate between two tiles; the easy splits deal patches, the hard splits
    deal whole tiles (with two tiles, hard ``test.csv`` is empty).

    Args:
        root: directory to write into (created).
        patches: number of patches (each takes ~0.1 s: keep it small).
        seed: makes the values reproducible; the same seed writes identical files.

    Returns:
        The directories, keys, decoys and split assignments written.
    """
    root = Path(root)
    patches_dir = root / PATCHES_DIRNAME
    tiles: dict[str, str] = {}
    decoys: list[Path] = []
    rows, cols = np.indices((PATCH_PIXELS, PATCH_PIXELS))
    nodata_corner = rows + cols < _NODATA_CORNER
    for i in range(patches):
        tile, zone = _TILES[i % len(_TILES)]
        row, col = 18 + PATCH_PIXELS * (i // len(_TILES)), 311
        name = patch_name(tile, row, col)
        if not PATCHES.matches(name):
            raise AssertionError(f"generated patch name {name!r} does not match {PATCHES.pattern!r}")
        tiles[name] = tile
        folder = patches_dir / tile / name
        georef = {
            "crs": utm_crs(zone),
            "transform": square_transform(
                500_000.0 + col * PIXEL_METRES, 4_500_000.0 - row * PIXEL_METRES,
                PATCH_PIXELS * PIXEL_METRES, PATCH_PIXELS,
            ),
        }  # fmt: skip
        rng = rng_for(seed, i)
        cube = distinct_bands(rng, NUM_BANDS, (PATCH_PIXELS, PATCH_PIXELS), dtype=PATCHES.dtype, **_VALUES)
        cube[:, nodata_corner] = NODATA
        write_geotiff(
            folder / f"{name}-SPECTRAL_IMAGE.TIF", cube,
            compress="deflate", interleave="band", nodata=NODATA, **georef,
        )  # fmt: skip
        quality_layers = {
            "-QL_PIXELMASK.TIF": nodata_corner.astype(np.uint8),
            "-QL_QUALITY_CLOUD.TIF": (rng.random((PATCH_PIXELS, PATCH_PIXELS)) < 0.05).astype(np.uint8),
        }
        for suffix, layer in quality_layers.items():
            decoys.append(write_geotiff(folder / f"{name}{suffix}", layer, compress="deflate", **georef))
        thumbnail = folder / f"{name}-THUMBNAIL.jpg"
        thumbnail.write_bytes(_THUMBNAIL)
        decoys.append(thumbnail)
    keys = tuple(sorted(tiles))
    lines = {k: f"{tiles[k]}/{k}/{k}-DATA.npy" for k in keys}
    splits_dir = root / SPLITS_DIRNAME
    splits = {
        difficulty: write_split_files(
            keys,
            {s: splits_dir / difficulty / f"{s}.csv" for s in SPLITS},
            seed,
            line_of=lines,
            group_of=tiles if difficulty == "hard" else None,
        )
        for difficulty in DIFFICULTIES
    }
    return HySpecNetFiles(
        root=root,
        patches_dir=patches_dir,
        splits_dir=splits_dir,
        keys=keys,
        tiles=tiles,
        decoys=tuple(decoys),
        splits=splits,
    )
