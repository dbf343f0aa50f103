"""Finding the files to align and grouping them into bands and dates.

An *image* is what ``--dataset-dir`` holds: a raster file (bands ``B1``..``Bn`` or its band
descriptions), a folder of single-band rasters (band = file stem), a Sentinel-2 ``.SAFE`` product
or a Landsat Collection 2 Level-2 product (bands as the product names them). Each band of each
image is a :class:`Layer`: one band of one file, warped onto the target grid.

Grouping (``--group-by``): none mosaics every image into one; ``time`` mosaics the images of one
date and stacks the dates as T; ``band`` makes every single-band file at the top of
``--dataset-dir`` one band (its stem) of one image. Mosaic order, so "first valid value wins" is
deterministic: images by name (plain string order), then by path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..encode.discover import printable
from ..errors import ConfigError, InputError
from .grid import Footprint, Grid, build_grid, footprint
from .products import CLASS_BANDS, is_safe, landsat_files, read_landsat, read_safe

GROUPS = ("time", "band")
RESAMPLINGS = ("nearest", "bilinear", "cubic", "average", "mode")
WARP_BLOCK = 1024
#: raster tags that may hold an acquisition date, in the order they are asked
DATE_TAGS = ("ACQUISITION_DATE", "ACQUISITIONDATE", "DATE_ACQUIRED", "SENSING_TIME", "DATETIME", "TIFFTAG_DATETIME")
_DATE = re.compile(r"(\d{4})[-:]?(\d{2})[-:]?(\d{2})")


@dataclass(frozen=True)
class Layer:
    """One band of one file: what a target block is warped from."""

    path: str
    index: int
    crs: str  # WKT
    bounds: tuple[float, float, float, float]  # in its own CRS
    dtype: str
    nodata: float | None
    scale: tuple[float, float] | None = None  # (multiply, add) for --apply-scale


@dataclass(frozen=True)
class Image:
    """A product, file or folder: its bands (name -> layer) and acquisition date (ISO) if known."""

    name: str
    path: str
    date: str | None
    bands: tuple[tuple[str, Layer], ...]
    kind: str = "raster"


@dataclass(frozen=True)
class BandSpec:
    """A band of the aligned values: its dtype and nodata on the grid, and how it is resampled."""

    name: str
    dtype: str
    nodata: float
    resampling: str
    scaled: bool = False


@dataclass(frozen=True)
class Aligned:
    """Everything a window of the target grid is read from.

    ``stacks[(band, t)]``: the layers mosaicked into that band at time step ``t`` (index into
    ``times``; 0 without a time axis), first valid value wins.
    """

    name: str
    grid: Grid
    bands: tuple[BandSpec, ...]
    times: tuple[str, ...]  # ISO dates; () without --group-by time
    stacks: tuple[tuple[tuple[str, int], tuple[Layer, ...]], ...]
    warp_block: int = WARP_BLOCK
    group_by: str | None = None
    extent: str | None = None

    @property
    def length(self) -> int:
        return max(1, len(self.times))

    def layers(self, band: str, t: int) -> tuple[Layer, ...]:
        return dict(self.stacks).get((band, t), ())

    def info(self) -> dict:
        """The alignment's entry in manifest.json (and its part of the encode's identity)."""
        stacks: dict[str, dict] = {}  # band -> date ("" without a time axis) -> [[path, band index], ...]
        for (band, t), layers in self.stacks:
            stacks.setdefault(band, {})[self.times[t] if self.times else ""] = [[layer.path, layer.index]
                                                                               for layer in layers]
        return {
            "grid": self.grid.info(), "extent": self.extent, "warp_block": self.warp_block,
            "group_by": self.group_by, "times": list(self.times),
            "bands": {b.name: {"dtype": b.dtype, "nodata": _json_number(b.nodata), "resampling": b.resampling,
                               "scaled": b.scaled} for b in self.bands},
            "scale": {b.name: sorted({layer.scale for (n, _), ls in self.stacks if n == b.name for layer in ls
                                      if layer.scale}) for b in self.bands if b.scaled},
            "sources": stacks,
        }


def _json_number(v: float):
    return None if math.isnan(v) else v


# --- finding images ---------------------------------------------------------------------------


def _layers_of_file(path: str, names: Sequence[str] | None = None) -> list[tuple[str, Layer]]:
    from ..scenes.discover import _band_files, open_raster

    bands = _band_files(path, names)
    src = open_raster(path)
    crs = src.crs.to_wkt()
    bounds = tuple(src.bounds)
    return [(b.name, Layer(path, b.index, crs, bounds, b.dtype, b.nodata)) for b in bands]


def find_images(root: Path, group_by: str | None = None, time_from_name: str | None = None,
                prefix: str = "") -> list[Image]:
    """The images under ``root`` (see the module doc), in name order; band names get ``prefix``."""
    from ..scenes.discover import _rasters_in

    if not root.exists():
        raise InputError(printable(root), "no such file or directory")
    if root.is_file():  # a single raster (a DEM given as a modality)
        images = [Image(root.stem, str(root), None, tuple(_layers_of_file(str(root))))]
        return [_dated(i, time_from_name, prefix) for i in images]
    entries = [p for p in sorted(root.iterdir(), key=lambda p: p.name) if not p.name.startswith(".")]
    images: list[Image] = []
    if group_by == "band":
        files = _rasters_in(root)
        if not files:
            raise InputError(printable(root), "--group-by band: no raster files (one band per file) in the folder")
        images.append(_folder_image(root, files))
    else:
        top = landsat_files(root)
        images.extend(_product_image(read_landsat(root, p, fs)) for p, fs in top.items())
        for entry in entries:
            if is_safe(entry):
                images.extend(_product_image(p) for p in read_safe(entry))
            elif entry.is_dir():
                found = landsat_files(entry)
                if found:
                    images.extend(_product_image(read_landsat(entry, p, fs)) for p, fs in found.items())
                elif _rasters_in(entry):
                    images.append(_folder_image(entry, _rasters_in(entry)))
        landsat = {f for fs in top.values() for f in fs}
        images.extend(Image(f.stem, str(f), None, tuple(_layers_of_file(str(f)))) for f in _rasters_in(root)
                      if f not in landsat)
    if not images:
        raise InputError(printable(root), "no rasters found (raster files, folders of single-band rasters, "
                         ".SAFE or Landsat products)")
    images.sort(key=lambda i: (i.name, i.path))
    return [_dated(i, time_from_name, prefix) for i in images]


def _product_image(product) -> Image:
    layers = []
    for band in product.bands:
        ((_, layer),) = _layers_of_file(band.path, [band.name])
        layers.append((band.name, Layer(layer.path, layer.index, layer.crs, layer.bounds, layer.dtype, layer.nodata,
                                        band.scale)))
    return Image(product.name, product.path, product.date, tuple(layers), product.kind)


def _folder_image(folder: Path, files: Sequence[Path]) -> Image:
    """A folder of single-band rasters (or ``--group-by band``'s files): band = file stem."""
    from ..scenes.discover import open_raster

    bands = []
    for file in files:
        count = open_raster(str(file)).count
        if count != 1:
            raise InputError(printable(file), f"has {count} bands; files joined as bands of one image (a folder, "
                             "--group-by band) hold one band each, named by the file stem")
        bands.extend(_layers_of_file(str(file), [file.stem]))
    return Image(folder.name, str(folder), None, tuple(bands))


def _dated(image: Image, time_from_name: str | None, prefix: str) -> Image:
    date = image.date
    if time_from_name:
        m = re.search(time_from_name, Path(image.path).name)
        if m is not None:
            text = m.groupdict().get("date") or (m.group(1) if m.groups() else m.group(0))
            date = _parse_date(text) or date
    if date is None:
        date = _date_from_tags(image)
    bands = tuple((prefix + name, layer) for name, layer in image.bands)
    return Image(image.name, image.path, date, bands, image.kind)


def _parse_date(text: str) -> str | None:
    m = _DATE.search(text or "")
    return f"{m[1]}-{m[2]}-{m[3]}" if m else None


def _date_from_tags(image: Image) -> str | None:
    from ..scenes.discover import open_raster

    for _, layer in image.bands[:1]:
        tags = open_raster(layer.path).tags()
        for tag in DATE_TAGS:
            if tag in tags and _parse_date(tags[tag]):
                return _parse_date(tags[tag])
    return None


# --- grouping ---------------------------------------------------------------------------------


def parse_resampling(values: Sequence[str] | None) -> tuple[str | None, dict[str, str]]:
    """``--resampling METHOD [NAME=METHOD ...]``: the image bands' method and per band or
    modality overrides."""
    default, by_name = None, {}
    for value in values or ():
        name, sep, method = value.rpartition("=")
        if method not in RESAMPLINGS:
            raise ConfigError(f"--resampling {value!r}: method one of {', '.join(RESAMPLINGS)}")
        if sep:
            by_name[name] = method
        else:
            default = method
    return default, by_name


def resampling_of(band: str, dtype: str, default: str | None, by_name: dict[str, str]) -> str:
    """A band's method: named for it or its modality (``s1.VV`` -> ``s1``), else nearest for class
    bands (labels, QA, SCL) and integer data unless ``--resampling`` names one, else bilinear."""
    if band in by_name:
        return by_name[band]
    modality, dot, short = band.rpartition(".")
    if dot and modality in by_name:
        return by_name[modality]
    if (short if dot else band) in CLASS_BANDS:
        return "nearest"
    if default is not None:
        return default
    return "nearest" if np.dtype(dtype).kind in "iub" else "bilinear"


def align(
    modalities: Sequence[tuple[str, Path]],
    *,
    grid: str | None = None,
    grid_like: str | None = None,
    extent: str | None = None,
    resampling: Sequence[str] | None = None,
    group_by: str | None = None,
    time_from_name: str | None = None,
    bands: Sequence[str] | None = None,
    apply_scale: bool = False,
    warp_block: int = WARP_BLOCK,
    max_grid_pixels: int | None = None,
    name: str | None = None,
    labels: str | Path | None = None,
) -> Aligned:
    """The aligned set: the images of every modality (``[(prefix, path)]``; ``""`` for the main
    folder), grouped, on the declared grid; ``labels``: a single-band class raster in any CRS,
    the band ``mask`` (nearest, the same at every date)."""
    from .grid import MAX_GRID_PIXELS

    if group_by is not None and group_by not in GROUPS:
        raise ConfigError(f"--group-by {group_by!r}: one of {', '.join(GROUPS)}")
    if warp_block < 16:
        raise ConfigError(f"--warp-block {warp_block}: must be at least 16 px")
    default, by_name = parse_resampling(resampling)
    images: list[Image] = []
    static: set[str] = set()
    for prefix, path in modalities:
        found = find_images(Path(path), group_by if not prefix else None, time_from_name,
                            f"{prefix}." if prefix else "")
        if group_by == "time":
            undated = [i for i in found if i.date is None]
            if prefix and len(undated) == len(found):
                static.update(n for i in found for n, _ in i.bands)  # a DEM: the same at every date
            elif undated:
                raise InputError(printable(undated[0].path), "--group-by time: no date found in its name "
                                 "(--time-from-name REGEX with a group 'date') or its raster tags")
        images.extend(found)
    if labels is not None:
        label_image = find_images(Path(labels))[0]
        if len(label_image.bands) != 1 or not Path(labels).is_file():
            raise InputError(printable(labels), "--labels with --grid: one single-band class raster (any CRS)")
        images.append(Image(label_image.name, label_image.path, None, (("mask", label_image.bands[0][1]),)))
        if group_by == "time":
            static.add("mask")
    if bands:
        known = {n for i in images for n, _ in i.bands}
        missing = [b for b in bands if b not in known]
        if missing:
            raise ConfigError(f"--bands {missing[0]!r}: no such band (bands found: {', '.join(sorted(known))})")
        bands = [*bands, *(["mask"] if labels is not None else [])]
    order = list(bands) if bands else sorted({n for i in images for n, _ in i.bands}, key=_band_order)
    times = tuple(sorted({i.date for i in images if i.date and not _is_static(i, static)})) \
        if group_by == "time" else ()
    stacks: dict[tuple[str, int], list[Layer]] = {}
    for image in images:
        steps = range(len(times)) if _is_static(image, static) else \
            [times.index(image.date)] if group_by == "time" else [0]
        for band, layer in image.bands:
            if band in order:
                for t in steps:
                    stacks.setdefault((band, t), []).append(layer)
    specs = tuple(_band_spec(band, [l for (b, _), ls in stacks.items() if b == band for l in ls], apply_scale,
                             default, by_name) for band in order)

    def footprints_of(crs) -> list[Footprint]:
        from rasterio.crs import CRS

        seen, out = set(), []
        for layers in stacks.values():
            for layer in layers:
                if layer.path not in seen:
                    seen.add(layer.path)
                    out.append(footprint(layer.path, CRS.from_wkt(layer.crs), layer.bounds, crs))
        return out

    target = build_grid(footprints_of, extent, grid=grid, grid_like=grid_like,
                        limit=MAX_GRID_PIXELS if max_grid_pixels is None else max_grid_pixels)
    key_name = name or (Path(modalities[0][1]).name if modalities else "aligned")
    return Aligned(key_name, target, specs, times, tuple(sorted((k, tuple(v)) for k, v in stacks.items())),
                   warp_block, group_by, extent)


def _is_static(image: Image, static: set[str]) -> bool:
    return bool(image.bands) and image.bands[0][0] in static


def _band_order(name: str) -> tuple[bool, str]:
    """The main folder's bands first, then each modality's, by name."""
    return "." in name, name


def _band_spec(band: str, layers: list[Layer], apply_scale: bool, default, by_name) -> BandSpec:
    dtypes = {}
    for layer in layers:
        dtypes.setdefault(layer.dtype, layer.path)
    if len(dtypes) > 1:
        (a, pa), (b, pb) = list(dtypes.items())[:2]
        raise InputError(printable(pb), f"band {band} is {b} here but {a} in {pa}; a band name must have one dtype "
                         "across files")
    dtype = layers[0].dtype
    method = resampling_of(band, dtype, default, by_name)
    if apply_scale and any(layer.scale for layer in layers):
        return BandSpec(band, "float32", math.nan, method, True)
    nodatas = [layer.nodata for layer in layers if layer.nodata is not None]
    nodata = nodatas[0] if nodatas else (math.nan if np.dtype(dtype).kind == "f" else 0.0)
    return BandSpec(band, dtype, float(nodata), method)


def check_modalities(values: Sequence[str] | None) -> list[tuple[str, Path]]:
    """``--modality NAME=PATH``: a folder or raster whose bands are named ``NAME.<band>``."""
    out = []
    for value in values or ():
        name, sep, path = value.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
            raise ConfigError(f"--modality {value!r}: expected NAME=PATH (NAME: letters, digits, _ or -)")
        out.append((name, Path(path)))
    return out
