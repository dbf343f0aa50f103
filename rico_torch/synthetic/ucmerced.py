"""Synthetic UC Merced Land Use in the real layout, plus Neumann et al. style split files.

Layout written under ``root`` (the ``UCMerced_LandUse`` directory of the archive)::

    Images/<class>/<class>NN.tif        NN = 00, 01, ...

and, by :func:`make_ucmerced_splits`, ``uc_merced-{train,val,test}.txt`` listing image file
names (``agricultural00.tif``), one per line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..catalog.ucmerced import BANDS, CLASSES, IMAGE_SIZE, IMAGES
from ._common import SplitFiles, pick_classes, rng_for, write_split_files
from ._geotiff import distinct_bands, write_geotiff

IMAGES_DIRNAME = "Images"
SPLITS = ("train", "val", "test")
#: Height of the odd-sized image: the real archive has a few images that are not 256x256.
ODD_HEIGHT = 247
# One disjoint 8-bit range per band (Red [10, 80), Green [90, 160), Blue [170, 240)) so a
# channel swap (e.g. RGB read as BGR) shows in the values.
_VALUES = {"base": 10, "step": 80, "spread": 70}


@dataclass(frozen=True)
class UCMercedFiles:
    """What :func:`make_ucmerced` wrote.

    Attributes:
        root: the directory given (the encoder's input directory).
        images_dir: ``root/Images``.
        keys: LMDB keys (file stems such as ``agricultural00``), sorted.
        labels: key -> class name.
        shapes: key -> ``(height, width)``.
    """

    root: Path
    images_dir: Path
    keys: tuple[str, ...]
    labels: dict[str, str]
    shapes: dict[str, tuple[int, int]]


def make_ucmerced(
    root: Path,
    per_class: int = 2,
    classes: Sequence[str] | None = None,
    seed: int = 0,
    odd_sizes: bool = True,
) -> UCMercedFiles:
    """Write a small synthetic UC Merced in the official directory layout.

    Images are 3-band uint8, pixel-interleaved, uncompressed and not georeferenced (no CRS,
    no transform), 256x256; with ``odd_sizes`` the last image of the first class is
    247x256, as a few real images are.

    Args:
        root: directory to write into (created).
        per_class: images per class (at most 100, as in the real dataset).
        classes: class folder names; defaults to the first three of the catalog.
        seed: makes the values reproducible; the same seed writes identical files.
        odd_sizes: make one image smaller than 256x256.

    Returns:
        The keys written, their labels and shapes.
    """
    if not 0 < per_class <= 100:
        raise ValueError(f"per_class must be in 1..100 (two-digit names), got {per_class}")
    root = Path(root)
    images_dir = root / IMAGES_DIRNAME
    labels: dict[str, str] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for c, name in enumerate(pick_classes(classes, CLASSES)):
        for n in range(per_class):
            key = f"{name}{n:02d}"
            odd = odd_sizes and c == 0 and n == per_class - 1
            shape = (ODD_HEIGHT if odd else IMAGE_SIZE, IMAGE_SIZE)
            data = distinct_bands(rng_for(seed, c, n), len(BANDS), shape, dtype=IMAGES.dtype, **_VALUES)
            write_geotiff(images_dir / name / f"{key}.tif", data, interleave="pixel", photometric="RGB")
            labels[key], shapes[key] = name, shape
    return UCMercedFiles(
        root=root, images_dir=images_dir, keys=tuple(sorted(labels)), labels=labels, shapes=shapes
    )


def make_ucmerced_splits(root: Path, keys: Sequence[str], seed: int = 0) -> SplitFiles:
    """Write ``root/uc_merced-{train,val,test}.txt`` listing ``<key>.tif`` names.

    Keys are dealt to train, val and test in turn after a seeded shuffle.

    Args:
        root: directory for the split files.
        keys: image keys, e.g. ``UCMercedFiles.keys``.
        seed: shuffling seed.
    """
    paths = {s: Path(root) / f"uc_merced-{s}.txt" for s in SPLITS}
    return write_split_files(keys, paths, seed, line_of={k: f"{k}.tif" for k in keys})
