"""Synthetic Hydro in the real layout: ``patch_<n>.tif`` files of 12 Sentinel-2 bands.

Each file is uint16 256x256, 12 bands (B01..B08, B8A, B09, B11, B12 in file order),
pixel-interleaved, LZW, tiled 512, not georeferenced (rico-hdl reads it so).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..catalog.hydro import BANDS, PATCHES
from ._common import rng_for
from ._geotiff import distinct_bands, write_geotiff

PATCH_PIXELS = 256
# one disjoint range per band: a band mix-up (B8A's position) shows in the values; smooth: imagery-like
# fields, so that LZW compresses and decodes as on real files
_VALUES = {"base": 200, "step": 300, "spread": 250, "smooth": True}


@dataclass(frozen=True)
class HydroFiles:
    """What :func:`make_hydro` wrote: the root (the encoder's input) and the keys, sorted."""

    root: Path
    keys: tuple[str, ...]


def make_hydro(root: Path, patches: int = 3, seed: int = 0, *, pixels: int = PATCH_PIXELS) -> HydroFiles:
    """Write ``patches`` Hydro files ``patch_0.tif``, ``patch_1.tif``, ... under ``root``."""
    root = Path(root)
    keys = []
    for n in range(patches):
        data = distinct_bands(rng_for(seed, n), len(BANDS), (pixels, pixels), dtype=PATCHES.dtype, **_VALUES)
        write_geotiff(root / f"patch_{n}.tif", data, interleave="pixel", compress="lzw", tiled=True, blocksize=512)
        keys.append(f"patch_{n}")
    return HydroFiles(root=root, keys=tuple(sorted(keys)))
