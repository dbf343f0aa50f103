"""Synthetic SpectralEarth (EnMAP) in the real layout: ``enmap/<tile>/<n>.tif``.

Each patch is one 202-band GeoTIFF (int16 here; the encoder stores whatever dtype the file
has), 128x128 px at 30 m, band-interleaved, deflate, georeferenced. A ``.tif`` directly in
``enmap/`` or deeper than a tile folder is not a patch (patches lie exactly two levels down).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..catalog.spectralearth import NUM_BANDS
from ._common import rng_for
from ._geotiff import distinct_bands, square_transform, utm_crs, write_geotiff

PATCH_PIXELS = 128
_VALUES = {"base": 100, "step": 40, "spread": 30}


@dataclass(frozen=True)
class SpectralEarthFiles:
    """What :func:`make_spectralearth` wrote.

    Attributes:
        root: the directory given.
        enmap_dir: ``root/enmap``, the encoder's input.
        keys: LMDB keys ``<tile>_<n>.tif``, sorted.
        tiles: key -> tile folder.
        decoys: ``.tif`` files at other depths, which must not be encoded.
    """

    root: Path
    enmap_dir: Path
    keys: tuple[str, ...]
    tiles: dict[str, str]
    decoys: tuple[Path, ...]


def make_spectralearth(
    root: Path, patches: int = 3, seed: int = 0, *, pixels: int = PATCH_PIXELS, dtype: str = "int16",
) -> SpectralEarthFiles:
    """Write ``patches`` patches spread over three tile folders under ``root/enmap``."""
    root = Path(root)
    enmap = root / "enmap"
    tiles: dict[str, str] = {}
    for n in range(patches):
        tile = f"{19_000 + n % 3}"
        transform = square_transform(400_000.0 + n * pixels * 30, 5_000_000.0, pixels * 30, pixels)
        cube = distinct_bands(rng_for(seed, n), NUM_BANDS, (pixels, pixels), dtype=dtype, **_VALUES)
        write_geotiff(enmap / tile / f"{n}.tif", cube, compress="deflate", interleave="band",
                      crs=utm_crs(32), transform=transform)
        tiles[f"{tile}_{n}.tif"] = tile
    small = distinct_bands(rng_for(seed, 999), 2, (8, 8), dtype=dtype, **_VALUES)
    decoys = (write_geotiff(enmap / "7.tif", small), write_geotiff(enmap / "19000" / "extra" / "8.tif", small))
    return SpectralEarthFiles(root=root, enmap_dir=enmap, keys=tuple(sorted(tiles)), tiles=tiles, decoys=decoys)
