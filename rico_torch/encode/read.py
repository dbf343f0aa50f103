"""Reading source bands exactly as rasterio does, and turning a patch into a safetensors value.

GDAL's per-open overhead (~540 us for a small GeoTIFF) dominates encoding, so plain TIFF
layouts (uncompressed, LZW or deflate; grey or RGB; 8-64 bit integer or float samples) are
decoded with tifffile, which returns the same stored sample values. Anything else falls back
to rasterio, and so do bands spread over several compressed tiles, which GDAL decodes faster. Both paths are checked against rasterio's ``read(i)`` by the tests and benchmarks.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
import tifffile
from safetensors.numpy import save

from ..catalog import Band, Source
from ..errors import InputError

# A file tifffile cannot parse goes to rasterio, which gives the error; tifffile's own
# warnings about it would only break the one-line error message.
logging.getLogger("tifffile").setLevel(logging.CRITICAL)

_C = tifffile.COMPRESSION
_FAST_COMPRESSION = {_C.NONE, _C.LZW, _C.DEFLATE, _C.ADOBE_DEFLATE}
_FAST_PHOTOMETRIC = {tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB}
_FAST_SAMPLEFORMAT = {tifffile.SAMPLEFORMAT.UINT, tifffile.SAMPLEFORMAT.INT, tifffile.SAMPLEFORMAT.IEEEFP}


def _read_tifffile(path: Path, indices: list[int]) -> list[np.ndarray] | None:
    """Decode with tifffile, or return None where the layout is not one we vouch for."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        if (
            page.compression not in _FAST_COMPRESSION
            or page.photometric not in _FAST_PHOTOMETRIC
            or page.sampleformat not in _FAST_SAMPLEFORMAT
            or page.bitspersample not in (8, 16, 32, 64)
            or page.fillorder != 1
            or page.is_subsampled
            or max(indices) > page.samplesperpixel
            or _compressed_tiles_per_plane(page) > 1
        ):
            return None
        data = page.asarray()
    if page.samplesperpixel == 1:
        data = data.reshape(page.imagelength, page.imagewidth)[None]
    elif page.planarconfig == tifffile.PLANARCONFIG.CONTIG:
        data = np.moveaxis(data.reshape(page.imagelength, page.imagewidth, -1), -1, 0)
    else:
        data = data.reshape(-1, page.imagelength, page.imagewidth)
    native = data.dtype.newbyteorder("=")
    return [np.ascontiguousarray(data[i - 1], dtype=native) for i in indices]


def _compressed_tiles_per_plane(page) -> int:
    """Compressed tiles per band plane (0 for strips or no compression). GDAL decodes several
    large compressed tiles faster than tifffile (Major-TOM's 1068 px LZW bands in 1024 px tiles:
    ~8 ms against ~15-23 ms), while its per-open cost dominates everything smaller."""
    if not page.is_tiled or page.compression == _C.NONE:
        return 0
    planes = page.samplesperpixel if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE else 1
    return len(page.dataoffsets) // planes


def read_rasterio(path: Path, indices: list[int]) -> list[np.ndarray]:
    """Read bands with rasterio: the reference every value must equal."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        # UC Merced has no georeference by design; the warning would break one-line errors
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            if max(indices) > src.count:
                raise InputError(path, f"has {src.count} bands, expected at least {max(indices)}")
            return [src.read(i) for i in indices]


def read_bands(path: Path, indices: list[int]) -> list[np.ndarray]:
    """Read the 1-based band ``indices`` of a GeoTIFF, values identical to rasterio's read."""
    if not path.is_file():
        raise InputError(path, "band file is missing")
    try:
        arrays = _read_tifffile(path, indices)
    except Exception:  # not a TIFF tifffile understands: let GDAL decide
        arrays = None
    if arrays is not None:
        return arrays
    try:
        return read_rasterio(path, indices)
    except InputError:
        raise
    except Exception as e:
        raise InputError(path, f"not a readable TIFF ({_gdal_reason(e, path)})") from None


def _gdal_reason(e: BaseException, path: Path) -> str:
    """GDAL's own reason for a failed read, one line.

    rasterio raises "Read failed. See previous exception for details."; the GDAL errors that
    led to it (e.g. "TIFFFillStrip:Read error at scanline 0; got 3409 bytes, expected 7045")
    are chained below it, the first one signalled deepest.
    """
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    root = seen[-1]
    text = (str(root).strip().splitlines() or [""])[0]
    for prefix in (f"{path}: ", f"{path.name}: "):
        text = text.removeprefix(prefix)
    return f"{type(seen[0]).__name__}: {text}" if len(seen) == 1 else text


def _check(source: Source, band: Band, path: Path, array: np.ndarray) -> None:
    if source.dtype is not None and array.dtype != np.dtype(source.dtype):
        raise InputError(path, f"band {band.name} has dtype {array.dtype}, expected {source.dtype}")
    if band.shape is not None and array.shape != band.shape:
        got, want = "x".join(map(str, array.shape)), "x".join(map(str, band.shape))
        raise InputError(path, f"band {band.name} is {got} px, expected {want}")


def read_patch(source: Source, patch: Path) -> dict[str, np.ndarray]:
    """All bands of one patch, checked against the source's dtype and shapes."""
    bands: dict[str, np.ndarray] = {}
    for path, file_bands in source.band_files(patch).items():
        arrays = read_bands(path, [b.index for b in file_bands])
        for band, array in zip(file_bands, arrays):
            _check(source, band, path, array)
            bands[band.name] = array
    if source.same_shape and len({a.shape for a in bands.values()}) > 1:
        shapes = ", ".join(f"{k} {'x'.join(map(str, a.shape))}" for k, a in bands.items())
        raise InputError(patch, f"bands differ in size ({shapes})")
    by_resolution: dict[int, list[str]] = {}
    for band in source.bands:
        if band.resolution is not None:
            by_resolution.setdefault(band.resolution, []).append(band.name)
    for metres, names in by_resolution.items():
        if len({bands[n].shape for n in names}) > 1:
            shapes = ", ".join(f"{n} {'x'.join(map(str, bands[n].shape))}" for n in names)
            raise InputError(patch, f"{metres} m bands differ in size ({shapes})")
    return bands


def encode_value(bands: dict[str, np.ndarray]) -> bytes:
    """The LMDB value: a safetensors blob without metadata, exactly as rico-hdl writes it."""
    return save(bands, metadata=None)


def value_digest(key: bytes, value: bytes) -> int:
    """Per-patch digest; summing these mod 2**256 gives an order-independent dataset hash."""
    h = hashlib.blake2b(digest_size=32)
    h.update(len(key).to_bytes(8, "little"))
    h.update(key)
    h.update(value)
    return int.from_bytes(h.digest(), "little")


def short_digest(digest: int) -> str:
    """The per-key digest kept in the manifest: 64 bits, enough to name a changed value."""
    return f"{digest & ((1 << 64) - 1):016x}"
