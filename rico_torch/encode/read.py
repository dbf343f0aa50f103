"""Reading source bands exactly as rasterio does, and turning a patch into a safetensors value.

GDAL's per-open overhead (~540 us for a small GeoTIFF) dominates encoding, so plain TIFF
layouts (uncompressed, LZW or deflate; grey or RGB; 8-64 bit integer or float samples) are
decoded with tifffile, which returns the same stored sample values. Anything else falls back
to rasterio, and so do bands spread over several compressed tiles, which GDAL decodes faster.
Both paths are checked against rasterio's ``read(i)`` by the tests and benchmarks.

PNGs (SatlasPretrain) are decoded, once their header's size is checked, by imagecodecs' libpng
(grey) or GDAL's PNG driver (RGB(A), palette): of the decoders measured (``benchmarks/satlas.py``:
GDAL, imagecodecs' libpng and spng, Pillow) these took the least CPU time for each kind, and all
give identical values (a palette PNG: its indices). A raw band (:attr:`Band.raw`) is the file's
bytes as a 1-D uint8 array.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import tifffile
from safetensors.numpy import save

from ..catalog import Band, Source
from ..errors import InputError
from ..format import parse_header

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
            or _gdal_decodes_faster(page)
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


def _gdal_decodes_faster(page) -> bool:
    """Compressed tiles that GDAL decodes faster than tifffile: several per band plane (Major-TOM's
    1068 px LZW bands in 1024 px tiles: ~8 ms against ~15-23 ms), or pixel-interleaved ones
    (Hydro's 12 bands of 256 px in one 512 px LZW tile: 6-10 ms against 8-13 ms, tifffile
    decoding the whole tile before splitting it), while GDAL's per-open cost dominates
    everything smaller."""
    if not page.is_tiled or page.compression == _C.NONE:
        return False
    if page.samplesperpixel > 1 and page.planarconfig == tifffile.PLANARCONFIG.CONTIG:
        return True
    planes = page.samplesperpixel if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE else 1
    return len(page.dataoffsets) // planes > 1


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


#: Largest PNG side accepted: the header's size is checked before anything is allocated.
MAX_PNG_SIDE = 1 << 14
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_GREY = (0, 4)  # grey, grey + alpha: decoded by imagecodecs; RGB(A) and palette by GDAL


def read_png(path: Path, indices: list[int]) -> list[np.ndarray]:
    """The 1-based channels ``indices`` of a PNG (grey: 1; RGB(A): 1-3(4); palette: the indices),
    once the header's size has been checked: grey PNGs through imagecodecs' libpng, RGB(A) and
    palette ones through GDAL's PNG driver (after checking every chunk: GDAL does not refuse a
    truncated file), the faster of the two for each (``benchmarks/satlas.py``)."""
    from rasterio.io import MemoryFile

    data = path.read_bytes()
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise InputError(path, "not a PNG (no PNG signature and header)")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    colour = data[25]
    if colour not in _PNG_CHANNELS:
        raise InputError(path, f"not a readable PNG (colour type {colour})")
    if not (0 < width <= MAX_PNG_SIDE and 0 < height <= MAX_PNG_SIDE):
        raise InputError(path, f"PNG header says {width}x{height} px, more than {MAX_PNG_SIDE} a side allowed")
    channels = _PNG_CHANNELS[colour]
    if max(indices) > channels:
        raise InputError(path, f"has {channels} bands, expected at least {max(indices)}")
    if colour in _GREY:
        return _read_grey_png(path, data, (height, width, channels), indices)
    _check_chunks(path, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning: PNGs have no georeference
            with MemoryFile(data) as memory, memory.open(driver="PNG") as src:
                if (src.count, src.height, src.width) != (channels, height, width):
                    raise InputError(path, f"PNG decodes to {src.count}x{src.height}x{src.width}, its header "
                                     f"says {channels}x{height}x{width}")
                array = src.read(indices)
    except InputError:
        raise
    except Exception as e:
        raise InputError(path, f"not a readable PNG ({gdal_reason(e, path)})") from None
    return [np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("=")) for a in array]


def _read_grey_png(path: Path, data: bytes, shape: tuple[int, int, int], indices: list[int]) -> list[np.ndarray]:
    """A grey(+alpha) PNG through imagecodecs' libpng (faster than GDAL there; libpng itself
    refuses a truncated or damaged file)."""
    import imagecodecs

    try:
        array = imagecodecs.png_decode(data)
    except Exception as e:
        raise InputError(path, f"not a readable PNG ({type(e).__name__}: {first_line(e)})") from None
    array = array.reshape(*array.shape[:2], -1)
    if array.shape != shape:
        raise InputError(path, f"PNG decodes to {array.shape}, its header says {shape}")
    native = array.dtype.newbyteorder("=")
    return [np.ascontiguousarray(array[..., i - 1], dtype=native) for i in indices]


def _check_chunks(path: Path, data: bytes) -> None:
    """Every chunk of a PNG whole and intact (its CRC), image data present, IEND last: GDAL
    decodes a truncated or damaged PNG without an error, filling in what it could not read."""
    at, seen_data = 8, False
    while True:
        if at + 12 > len(data):
            raise InputError(path, "not a readable PNG (truncated: the file ends inside a chunk, before IEND)")
        length = int.from_bytes(data[at : at + 4], "big")
        kind = data[at + 4 : at + 8]
        end = at + 12 + length
        if end > len(data):
            raise InputError(path, f"not a readable PNG (truncated: chunk {kind!r} runs past the end of the file)")
        if zlib.crc32(data[at + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            raise InputError(path, f"not a readable PNG (chunk {kind!r} is damaged: its CRC does not match)")
        seen_data = seen_data or kind == b"IDAT"
        if kind == b"IEND":
            break
        at = end
    if not seen_data:
        raise InputError(path, "not a readable PNG (no image data)")


def read_raw(path: Path) -> np.ndarray:
    """A file's bytes verbatim, as a 1-D uint8 band."""
    if not path.is_file():
        raise InputError(path, "file is missing")
    return np.frombuffer(path.read_bytes(), dtype=np.uint8).copy()


def read_bands(path: Path, indices: list[int]) -> list[np.ndarray]:
    """Read the 1-based band ``indices`` of a GeoTIFF or PNG, values identical to rasterio's read."""
    if not path.is_file():
        raise InputError(path, "band file is missing")
    if path.suffix.lower() == ".png":
        return read_png(path, indices)
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
        raise InputError(path, f"not a readable TIFF ({gdal_reason(e, path)})") from None


def first_line(e: BaseException, empty: str = "") -> str:
    """An exception's message as one line (its first), ``empty`` where it has none."""
    return (str(e).strip().splitlines() or [empty])[0]


def gdal_reason(e: BaseException, path: Path) -> str:
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
    text = first_line(root)
    for prefix in (f"{path}: ", f"{path.name}: "):
        text = text.removeprefix(prefix)
    return f"{type(seen[0]).__name__}: {text}" if len(seen) == 1 else text


def _check(source: Source, band: Band, path: Path, array: np.ndarray) -> None:
    if band.raw:
        return
    if source.dtype is not None and array.dtype != np.dtype(source.dtype) and array.dtype.name not in source.dtypes:
        raise InputError(path, f"band {band.name} has dtype {array.dtype}, expected {source.dtype}")
    if band.shape is not None and array.shape != band.shape:
        got, want = "x".join(map(str, array.shape)), "x".join(map(str, band.shape))
        raise InputError(path, f"band {band.name} is {got} px, expected {want}")


def read_patch(source: Source, patch: Path, files: dict[Path, list[Band]] | None = None) -> dict[str, np.ndarray]:
    """All bands of one patch, checked against the source's dtype and shapes; ``files``: the
    patch's files and their bands where the path alone does not tell (``Patch.band_files``)."""
    bands: dict[str, np.ndarray] = {}
    for path, file_bands in (source.band_files(patch) if files is None else files).items():
        if file_bands[0].raw:
            arrays = [read_raw(path)]
        else:
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


#: band table of one value: (name, dtype name, shape) per band, sorted by name.
BandTable = tuple[tuple[str, str, tuple[int, ...]], ...]
_HEADERS: dict[tuple, tuple[bytes, tuple[str, ...]]] = {}  # layout -> (header, band names in data order)
_MAX_HEADERS = 256  # layouts remembered (sizes vary per patch in some datasets: UC Merced, raw bands)


_DTYPE_NAMES: dict[np.dtype, str] = {}


def _dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, remembered: numpy works it out in Python on every call (~8 us, a band)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


def value_parts(bands: dict[str, np.ndarray]) -> tuple[list, BandTable]:
    """The value :func:`encode_value` makes, as buffers to write one after the other (no copy
    into one blob), and its band table.

    A safetensors header depends only on the bands' names, dtypes and shapes, so it is taken
    once per layout from a value ``save`` made, then reused: the header bytes followed by the
    arrays in the header's data order are exactly ``save``'s bytes. A layout not seen yet (and a
    non-native byte order) gives ``[save(bands)]``.
    """
    bands = {name: np.ascontiguousarray(a) for name, a in bands.items()}  # save() mis-writes a strided view
    table = tuple(sorted((name, _dtype_name(a.dtype), a.shape) for name, a in bands.items()))
    layout = tuple((name, a.dtype.str, a.shape) for name, a in sorted(bands.items()))
    cached = _HEADERS.get(layout)
    if cached is None:
        value = encode_value(bands)
        if sys.byteorder == "little" and all(a.dtype.isnative for a in bands.values()):
            if len(_HEADERS) >= _MAX_HEADERS:
                _HEADERS.clear()
            info = parse_header(value)
            start = 8 + int.from_bytes(value[:8], "little")
            _HEADERS[layout] = (value[:start], tuple(sorted(info, key=lambda n: (info[n].begin, n))))
        return [value], table
    header, order = cached
    return [header, *(bands[name] for name in order)], table


def value_layout(bands: dict[str, np.ndarray]) -> tuple[bytes, tuple[str, ...]] | None:
    """The header of values with these bands' names, dtypes and shapes, and the order their arrays
    follow it in (as :func:`value_parts` lays them out); None where it makes no reusable header."""
    value_parts(bands)  # remembers the layout
    return _HEADERS.get(tuple((name, a.dtype.str, a.shape) for name, a in sorted(bands.items())))


def value_digest(key: bytes, value: bytes) -> int:
    """Per-patch digest; summing these mod 2**256 gives an order-independent dataset hash."""
    return parts_digest(key, [value])


def parts_digest(key: bytes, parts: list) -> int:
    """:func:`value_digest` of the value whose bytes are ``parts`` one after the other."""
    h = hashlib.blake2b(len(key).to_bytes(8, "little") + key, digest_size=32)
    for part in parts:
        h.update(part)
    return int.from_bytes(h.digest(), "little")
