"""Synthetic EuroSAT-MS in the real layout, plus Neumann et al. style split files.

Layout written under ``root`` (the ``EuroSAT_MS`` directory of the archive)::

    <Class>/<Class>_<n>.tif        n = 1, 2, ...

and, by :func:`make_eurosat_splits`, ``eurosat-{train,val,test}.txt`` listing image file
names (``AnnualCrop_1.tif``), one per line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..catalog.eurosat import BANDS, CLASSES, IMAGES
from ._common import SplitFiles, pick_classes, rng_for, write_split_files
from ._geotiff import distinct_bands, square_transform, utm_crs, write_geotiff

SPLITS = ("train", "val", "test")
PATCH_PIXELS = IMAGES.bands[0].shape[0]  # 64
PIXEL_METRES = 10
# Sentinel-2 L1C digital numbers, one disjoint range per band: B01 in [800, 950) ... band 13
# (B8A) in [3200, 3350), so a band mix-up (notably B8A's position) shows in the values.
_VALUES = {"base": 800, "step": 200, "spread": 150}
_UTM_ZONES = (31, 32, 33, 34, 35)  # EuroSAT spans these zones; each class uses one


@dataclass(frozen=True)
class EuroSATFiles:
    """What :func:`make_eurosat` wrote.

    Attributes:
        root: the directory given (the encoder's input directory).
        keys: LMDB keys (file stems such as ``AnnualCrop_1``), sorted.
        labels: key -> class name.
    """

    root: Path
    keys: tuple[str, ...]
    labels: dict[str, str]


def make_eurosat(
    root: Path,
    per_class: int = 2,
    classes: Sequence[str] | None = None,
    seed: int = 0,
) -> EuroSATFiles:
    """Write a small synthetic EuroSAT-MS in the official directory layout.

    Each image is one GeoTIFF of 13 uint16 64x64 bands (B01..B12, then B8A), pixel-
    interleaved, uncompressed, georeferenced in UTM at 10 m.

    Args:
        root: directory to write into (created).
        per_class: images per class.
        classes: class folder names; defaults to the first three of the catalog.
        seed: makes the values reproducible; the same seed writes identical files.

    Returns:
        The keys written and their labels.
    """
    root = Path(root)
    labels: dict[str, str] = {}
    for c, name in enumerate(pick_classes(classes, CLASSES)):
        crs = utm_crs(_UTM_ZONES[c % len(_UTM_ZONES)])
        for n in range(1, per_class + 1):
            key = f"{name}_{n}"
            extent = PATCH_PIXELS * PIXEL_METRES
            transform = square_transform(400_000.0 + n * extent, 5_500_000.0, extent, PATCH_PIXELS)
            data = distinct_bands(
                rng_for(seed, c, n), len(BANDS), (PATCH_PIXELS, PATCH_PIXELS), dtype=IMAGES.dtype, **_VALUES
            )
            write_geotiff(root / name / f"{key}.tif", data, interleave="pixel", crs=crs, transform=transform)
            labels[key] = name
    return EuroSATFiles(root=root, keys=tuple(sorted(labels)), labels=labels)


def make_eurosat_splits(root: Path, keys: Sequence[str], seed: int = 0, suffix: str = ".tif") -> SplitFiles:
    """Write ``root/eurosat-{train,val,test}.txt`` listing ``<key><suffix>`` names.

    Keys are dealt to train, val and test in turn after a seeded shuffle.

    Args:
        root: directory for the split files.
        keys: image keys, e.g. ``EuroSATFiles.keys``.
        seed: shuffling seed.
        suffix: file extension written after each key. The published files (made from the
            RGB release) list ``.jpg`` names, which readers such as TorchGeo map to
            ``.tif``; pass ``".jpg"`` to test that mapping.
    """
    paths = {s: Path(root) / f"eurosat-{s}.txt" for s in SPLITS}
    return write_split_files(keys, paths, seed, line_of={k: f"{k}{suffix}" for k in keys})
