"""The one GeoTIFF writer every synthetic dataset uses, plus georeferencing helpers.

Each dataset stores its bands with a different TIFF layout (compression, interleave, tiling,
georeference); fixtures must reproduce those layouts because readers take different paths
for them (e.g. tifffile fast paths only apply to some layouts).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning

if TYPE_CHECKING:
    from ..catalog.base import Band

Compression = Literal["deflate", "lzw"] | None
Interleave = Literal["pixel", "band"]


def write_geotiff(
    path: Path,
    data: np.ndarray,
    *,
    dtype: str | np.dtype | None = None,
    compress: Compression = None,
    interleave: Interleave = "band",
    tiled: bool = False,
    blocksize: int | None = None,
    crs: CRS | str | int | None = None,
    transform: Affine | None = None,
    nodata: float | None = None,
    photometric: str | None = None,
) -> Path:
    """Write ``data`` as a GeoTIFF with an explicit on-disk layout.

    Args:
        path: file to write; parent directories are created.
        data: ``(bands, height, width)`` array, or ``(height, width)`` for one band.
        dtype: file dtype; defaults to ``data.dtype``. ``data`` must already fit it
            (values are cast without clipping).
        compress: ``None`` (uncompressed), ``"deflate"`` or ``"lzw"``.
        interleave: ``"pixel"`` (BIP, samples of a pixel together) or ``"band"`` (BSQ).
        tiled: write square tiles of ``blocksize`` (default 256) instead of strips.
        blocksize: tile edge when ``tiled``; rows per strip otherwise (``None`` lets GDAL
            pick, as most producers do).
        crs: coordinate reference system (``CRS``, ``"EPSG:32633"`` or an EPSG code);
            ``None`` writes an image without georeference.
        transform: affine pixel-to-CRS transform; required together with ``crs``.
        nodata: value recorded as the file's nodata tag, if any.
        photometric: TIFF photometric interpretation (e.g. ``"RGB"``), if any.

    Returns:
        ``path``.

    Raises:
        ValueError: ``data`` is not 2-D/3-D, or only one of ``crs``/``transform`` is given.
    """
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim != 3:
        raise ValueError(f"expected a (bands, height, width) array, got shape {data.shape}")
    if (crs is None) != (transform is None):
        raise ValueError("give both crs and transform, or neither")
    dtype = np.dtype(dtype or data.dtype)
    count, height, width = data.shape
    profile: dict = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": dtype.name,
        "interleave": interleave,
        "tiled": tiled,
    }
    if compress is not None:
        profile["compress"] = compress
    if tiled:
        profile["blockxsize"] = profile["blockysize"] = blocksize or 256
    elif blocksize is not None:
        profile["blockysize"] = blocksize
    if crs is not None:
        profile["crs"] = CRS.from_user_input(crs)
        profile["transform"] = transform
    if nodata is not None:
        profile["nodata"] = nodata
    if photometric is not None:
        profile["photometric"] = photometric
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # An ungeoreferenced image is intended here (UC Merced), not a mistake to warn about.
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data.astype(dtype, copy=False))
    return path


def utm_crs(zone: int, north: bool = True) -> CRS:
    """WGS 84 / UTM CRS of a zone (EPSG:326zz in the north, 327zz in the south)."""
    return CRS.from_epsg((32600 if north else 32700) + zone)


_MGRS_TILE = re.compile(r"T?(\d{2})([C-X])[A-Z]{2}")


def crs_of_mgrs_tile(tile: str) -> CRS:
    """UTM CRS of a Sentinel-2 MGRS tile such as ``"T33UUP"`` or ``"33UUP"``.

    Latitude bands N and later lie in the northern hemisphere.
    """
    m = _MGRS_TILE.fullmatch(tile)
    if m is None:
        raise ValueError(f"not an MGRS tile id: {tile!r}")
    return utm_crs(int(m.group(1)), north=m.group(2) >= "N")


def square_transform(x_min: float, y_max: float, extent: float, pixels: int) -> Affine:
    """Transform of a north-up square of ``extent`` metres covered by ``pixels`` per side.

    Bands of different resolution over the same footprint share ``extent`` and differ in
    ``pixels``, so they overlay exactly.
    """
    size = extent / pixels
    return Affine(size, 0.0, x_min, 0.0, -size, y_max)


def distinct_band(
    rng: np.random.Generator,
    index: int,
    shape: tuple[int, int],
    *,
    base: float,
    step: float,
    spread: float,
    dtype: str | np.dtype,
    smooth: bool = False,
) -> np.ndarray:
    """Random values for band ``index`` (0-based) in ``[base + index*step, ... + spread)``.

    With ``spread < step`` the ranges of different bands are disjoint, so a reader that
    mixes up bands is caught by the value range alone. ``smooth``: a field that varies slowly
    over the image plus a little noise, as imagery does, instead of noise alone: compressed
    files then shrink and decode at the speed real ones do (LZW/deflate on noise is slower per
    pixel and barely compresses).
    """
    if spread > step:
        raise ValueError("spread must not exceed step, or band ranges overlap")
    low = base + index * step
    dtype = np.dtype(dtype)
    if smooth:
        noise = spread / 32
        field = _slow_field(rng, shape) * (spread - noise) + rng.random(shape, dtype=np.float32) * noise
        if dtype.kind == "f":
            return (low + field).astype(dtype)
        return (low + np.floor(field)).astype(dtype)
    if dtype.kind == "f":
        return (low + rng.random(shape, dtype=np.float32) * spread).astype(dtype)
    return rng.integers(low, low + spread, size=shape, dtype=np.int64).astype(dtype)


def _slow_field(rng: np.random.Generator, shape: tuple[int, int], cell: int = 32) -> np.ndarray:
    """Values in [0, 1) varying over ``cell`` pixels: a coarse random grid, bilinearly upsampled."""
    h, w = shape
    grid = rng.random((h // cell + 2, w // cell + 2))
    rows = np.arange(h) / cell
    cols = np.arange(w) / cell
    across = np.stack([np.interp(cols, np.arange(grid.shape[1]), g) for g in grid])
    field = np.stack([np.interp(rows, np.arange(grid.shape[0]), c) for c in across.T], axis=1)
    return np.clip(field, 0.0, np.nextafter(1.0, 0.0)).astype(np.float32)


def distinct_bands(
    rng: np.random.Generator,
    count: int,
    shape: tuple[int, int],
    *,
    base: float,
    step: float,
    spread: float,
    dtype: str | np.dtype,
    smooth: bool = False,
) -> np.ndarray:
    """A ``(count, *shape)`` stack of :func:`distinct_band` arrays."""
    return np.stack(
        [distinct_band(rng, i, shape, base=base, step=step, spread=spread, dtype=dtype, smooth=smooth)
         for i in range(count)]
    )


def write_band_files(
    folder: Path,
    bands: Sequence[Band],
    dtype: str,
    pixels: int,
    rng: np.random.Generator,
    values: dict,
    *,
    crs: CRS | None = None,
    x_min: float = 0.0,
    y_max: float = 0.0,
    extent: float | None = None,
    **layout,
) -> list[Path]:
    """One single-band GeoTIFF per band into ``folder`` (``<band.file>``, over ``{name}`` = the
    folder's name), each of the size its resolution gives over one footprint.

    Args:
        bands: the bands (``file`` and ``resolution`` set; the finest resolution gets ``pixels``).
        pixels: edge of the finest bands; a band of resolution r gets ``round(pixels * finest / r)``.
        values: :func:`distinct_band` ranges (``base``, ``step``, ``spread``; ``smooth``).
        crs, x_min, y_max, extent: georeference of the footprint (``extent`` in metres; default
            ``pixels`` x the finest resolution); no georeference when ``crs`` is None.
        layout: :func:`write_geotiff` layout options (``compress``, ``tiled``, ``blocksize``).
    """
    finest = min(b.resolution for b in bands)
    extent = extent or pixels * finest
    written = []
    for i, band in enumerate(bands):
        n = round(pixels * finest / band.resolution)
        data = distinct_band(rng, i, (n, n), dtype=dtype, **values)
        georef = {} if crs is None else {"crs": crs, "transform": square_transform(x_min, y_max, extent, n)}
        written.append(write_geotiff(folder / band.file.format(name=folder.name), data, **georef, **layout))
    return written
