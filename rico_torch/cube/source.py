"""Datacube sources: what a cube is (:class:`Cube`) and reading one window of it (:func:`read_window`).

Two backends behind one interface:

* ``xarray``: a NetCDF/HDF5 file or a Zarr store, opened with ``mask_and_scale=False`` and
  ``decode_times=False`` so that values are the stored ones (packed integers stay packed:
  ``scale_factor``/``add_offset`` are recorded, never applied) and times the stored CF numbers.
  A window is a lazily indexed ``isel``: only the chunks it touches are read, no dask.
* ``geotiff``: a folder of GeoTIFF/COG rasters on one grid, one time step each (all bands of a file
  are bands of the cube), dated by ``--time-from-name`` or the TIFF ``DateTime`` tag.

Which dimensions are time, y and x: ``dims`` (``--dims``), else CF attributes of the coordinates
(``axis``, ``standard_name``, ``units``), else the usual names. The grid's transform comes from
regularly spaced coordinates (cell centres; descending latitude gives a negative y step, longitudes
0..360 stay 0..360), the CRS from the CF ``grid_mapping`` (``pyproj.CRS.from_cf``: WKT, EPSG or
projection parameters); a geostationary grid's scan-angle coordinates (radians) are scaled by the
satellite height; plain latitude/longitude without a grid mapping is EPSG:4326.

Invalid cells: NaN, the ``_FillValue`` and ``missing_value`` of a variable, the nodata of a raster.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import product
from pathlib import Path

import numpy as np

from ..encode.discover import printable
from ..encode.read import first_line
from ..errors import ConfigError, InputError

AXES = ("time", "y", "x")
#: time values of a GeoTIFF stack are stored in these units
STACK_TIME_UNITS = "seconds since 1970-01-01 00:00:00"
STACK_CALENDAR = "proleptic_gregorian"
_CF_AXIS = {"time": "T", "y": "Y", "x": "X"}
_STANDARD_NAMES = {
    "time": {"time"},
    "y": {"latitude", "projection_y_coordinate", "projection_y_angular_coordinate", "grid_latitude"},
    "x": {"longitude", "projection_x_coordinate", "projection_x_angular_coordinate", "grid_longitude"},
}
_UNITS = {"y": {"degrees_north", "degree_north", "degree_n", "degrees_n"},
          "x": {"degrees_east", "degree_east", "degree_e", "degrees_e"}}
_NAMES = {"time": ("time", "t"), "y": ("y", "lat", "latitude", "rlat"), "x": ("x", "lon", "longitude", "rlon")}
_DATE_FORMATS = ("%Y%m%d", "%Y-%m-%d", "%Y%m%dT%H%M%S", "%Y-%m-%dT%H:%M:%S", "%Y%m%d%H%M%S", "%Y-%m-%d %H:%M:%S",
                 "%Y_%m_%d", "%Y%j")


@dataclass(frozen=True)
class CubeBand:
    """One variable (xarray) or raster band (GeoTIFF, 1-based ``index``) of a cube.

    ``fill``: the value cells outside the cube get (``--edge pad``): the ``_FillValue`` /
    ``missing_value`` / nodata, else NaN for floats, else 0. ``invalid``: every stored value that
    marks a cell invalid (besides NaN).
    """

    name: str
    dtype: str
    fill: float
    invalid: tuple[float, ...] = ()
    scale_factor: float | None = None
    add_offset: float | None = None
    units: str | None = None
    index: int = 0
    chunk_bytes: int = 0  # bytes of one stored (compressed-unit) chunk, 0 where unchunked or unknown
    chunks: tuple[int, ...] = ()  # the stored chunk's cells on (time, y, x); () where unchunked or unknown

    def info(self) -> dict:
        return {"dtype": self.dtype, "fill": _json_number(self.fill), "invalid": [_json_number(v) for v in self.invalid],
                "scale_factor": self.scale_factor, "add_offset": self.add_offset, "units": self.units}


@dataclass(frozen=True)
class Cube:
    """A datacube: bands over (time, y, x) on one grid; plain data, picklable (files open per process)."""

    name: str
    path: str
    kind: str  # "xarray" | "geotiff"
    bands: tuple[CubeBand, ...]
    dims: Mapping[str, str]  # "time"/"y"/"x" -> the source's dimension name
    shape: tuple[int, int, int]  # T, H, W
    time: tuple[float, ...]  # CF numbers in time_units / calendar
    time_units: str
    calendar: str
    crs: str  # WKT; "" where the source has none
    transform: tuple[float, ...]  # a, b, c, d, e, f (GDAL order, origin at the first cell's corner)
    files: tuple[str, ...] = ()  # geotiff: one raster per time step
    engine: str | None = None
    attrs: Mapping[str, object] = field(default_factory=dict)
    #: bytes of decoded storage chunks that reads of this cube keep per process (option II, see
    #: :func:`read_window`); 0 (the encoder's): none, each read decodes what it covers
    chunk_cache: int = 0

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    def iso_times(self, start: int = 0, stop: int | None = None) -> list[str]:
        """The time steps as ISO 8601 strings (cftime's, so 360-day dates such as 2000-02-30 print)."""
        return iso_times(self.time[start:stop], self.time_units, self.calendar)

    def info(self) -> dict:
        """The cube's facts for manifest.json."""
        return {
            "name": self.name, "path": self.path, "kind": self.kind, "dims": dict(self.dims),
            "shape": list(self.shape), "crs": self.crs, "transform": list(self.transform),
            "time": {"values": [_json_number(v) for v in self.time], "units": self.time_units,
                     "calendar": self.calendar, "iso": self.iso_times()},
            "bands": {b.name: b.info() for b in self.bands},
            **({"files": [Path(f).name for f in self.files]} if self.files else {}),
        }


def _json_number(v: float) -> float | str | None:
    """A number JSON can hold: NaN as the string "nan" (JSON has no NaN)."""
    if v is None:
        return None
    v = float(v)
    if math.isnan(v):
        return "nan"
    return int(v) if v.is_integer() and abs(v) < 2**53 else v


def iso_times(values: Sequence[float], units: str, calendar: str) -> list[str]:
    import cftime

    return [d.isoformat() for d in cftime.num2date(np.asarray(values, np.float64), units, calendar,
                                                   only_use_cftime_datetimes=True)]


# --- opening ----------------------------------------------------------------------------------------


def open_cube(path: str | Path, variables: Sequence[str] | None = None, dims: Mapping[str, str] | None = None,
              time_from_name: str | None = None) -> Cube:
    """The cube at ``path``: a NetCDF/HDF5 file or Zarr store (``variables`` as bands: default every
    variable over the time, y and x dimensions), or a folder of GeoTIFFs (one per time step).

    Raises:
        InputError: one line naming the source and what is wrong (missing variable, a variable
            without one of the dimensions, time that is not increasing or not decodable, rasters on
            different grids, a source that is not a cube).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(printable(path), "cube source does not exist")
    if path.is_dir() and not _is_zarr(path):
        return _open_stack(path, variables, time_from_name)
    if time_from_name is not None:
        raise ConfigError("--time-from-name: only for a folder of GeoTIFF rasters; a NetCDF/Zarr cube has its own "
                          "time coordinate")
    return _open_xarray(path, variables, dims)


def _is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr" or any((path / n).exists() for n in ("zarr.json", ".zgroup", ".zattrs", ".zarray"))


def _open_dataset(path: str, engine: str | None = None):
    """The dataset at ``path`` as stored: no masking, no scaling, raw CF time numbers, nothing cached."""
    import xarray as xr

    kwargs = dict(mask_and_scale=False, decode_times=False, decode_timedelta=False, cache=False, chunks=None)
    if engine != "zarr":
        return xr.open_dataset(path, engine=engine, **kwargs)
    with warnings.catch_warnings():  # a store without consolidated metadata reads as well, a little slower
        warnings.simplefilter("ignore", RuntimeWarning)
        return xr.open_dataset(path, engine="zarr", consolidated=None, **kwargs)


def _engine(path: Path) -> str | None:
    if _is_zarr(path):
        return "zarr"
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic.startswith((b"\x89HDF", b"CDF")):
        return "netcdf4"  # HDF5-based NetCDF4 and classic NetCDF alike
    return None


def _open_xarray(path: Path, variables: Sequence[str] | None, dims: Mapping[str, str] | None) -> Cube:
    where = printable(path)
    try:
        engine = _engine(path)
        ds = _open_dataset(os.fspath(path), engine)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise InputError(where, f"not a NetCDF/HDF5 file or Zarr store xarray can open ({first_line(e, type(e).__name__)})") from None
    try:
        names = _find_dims(ds, dims, where)
        wanted = tuple(names[a] for a in AXES)
        if variables:
            missing = [v for v in variables if v not in ds.data_vars]
            if missing:
                raise InputError(where, f"has no variable {missing[0]!r} (its variables: {', '.join(map(str, ds.data_vars))})")
            chosen = list(variables)
        else:
            chosen = [str(v) for v, a in ds.data_vars.items() if set(a.dims) == set(wanted)]
            if engine == "zarr":  # a store lists its arrays in directory order, which varies: by name
                chosen.sort()
            if not chosen:
                raise InputError(where, f"is not a cube: no variable has the dimensions {', '.join(wanted)} "
                                 f"(its variables: {', '.join(f'{v}{tuple(a.dims)}' for v, a in ds.data_vars.items())})")
        bands = []
        for name in chosen:
            var = ds[name]
            for axis, dim in zip(AXES, wanted):
                if dim not in var.dims:
                    raise InputError(where, f"variable {name!r} has no dimension {dim!r} ({axis}; its dimensions: "
                                     f"{', '.join(map(str, var.dims))}); its grid differs from the cube's")
            extra = [d for d in var.dims if d not in wanted]
            if extra:
                raise InputError(where, f"is not a cube of (time, y, x): variable {name!r} also has dimension "
                                 f"{extra[0]!r}; select one level first (e.g. ds.isel({extra[0]}=0)) or name other variables")
            if var.dtype.kind not in "biuf":
                raise InputError(where, f"variable {name!r} holds {var.dtype} values, not numbers")
            bands.append(_xarray_band(name, var, wanted))
        shape = tuple(int(ds.sizes[d]) for d in wanted)
        time, units, calendar = _time_of(ds, names["time"], where)
        crs, transform = _georeference(ds, [ds[b.name] for b in bands], names, where)
        name = path.name[: -len(".zarr")] if path.name.endswith(".zarr") else path.stem
        return Cube(name, os.fspath(path.resolve()), "xarray", tuple(bands), dict(names), shape, time, units, calendar,
                    crs, transform, engine=engine)
    finally:
        ds.close()


def _find_dims(ds, given: Mapping[str, str] | None, where: str) -> dict[str, str]:
    """time/y/x -> dimension name: ``given`` (``--dims``), else CF attributes, else usual names."""
    all_dims = [str(d) for d in ds.dims]
    found: dict[str, str] = {}
    for axis, dim in (given or {}).items():
        if axis not in AXES:
            raise ConfigError(f"--dims {axis}={dim}: the axes are {', '.join(AXES)}")
        if dim not in all_dims:
            raise InputError(where, f"has no dimension {dim!r} (--dims {axis}={dim}; its dimensions: {', '.join(all_dims)})")
        found[axis] = dim
    for axis in AXES:
        if axis in found:
            continue
        candidates = [d for d in all_dims if d not in found.values() and _is_axis(ds, d, axis)]
        if not candidates:
            candidates = [d for d in all_dims if d.lower() in _NAMES[axis] and d not in found.values()]
        if len(candidates) != 1:
            what = "no" if not candidates else f"several ({', '.join(candidates)})"
            raise InputError(where, f"is not a cube: {what} {axis} dimension found by CF attributes (axis, standard_name, "
                             f"units) among {', '.join(all_dims)}; name it with --dims {axis}=NAME")
        found[axis] = candidates[0]
    return found


def _is_axis(ds, dim: str, axis: str) -> bool:
    if dim not in ds.variables:
        return False
    attrs = ds[dim].attrs
    if str(attrs.get("axis", "")).upper() == _CF_AXIS[axis]:
        return True
    if str(attrs.get("standard_name", "")) in _STANDARD_NAMES[axis]:
        return True
    units = str(attrs.get("units", "")).lower()
    if axis == "time":
        return " since " in units
    return units in _UNITS[axis]


def _xarray_band(name: str, var, axes: Sequence[str]) -> CubeBand:
    attrs = var.attrs
    markers = [v for k in ("_FillValue", "missing_value")
               for v in np.atleast_1d(np.asarray(attrs.get(k, var.encoding.get(k, [])), np.float64)).tolist()]
    invalid = list(dict.fromkeys(v for v in markers if not math.isnan(v)))  # NaN is always invalid
    dtype = np.dtype(var.dtype)
    fill = markers[0] if markers else (math.nan if dtype.kind == "f" else 0.0)
    scale, offset = attrs.get("scale_factor"), attrs.get("add_offset")
    chunks = var.encoding.get("chunksizes") or var.encoding.get("chunks")
    chunk_bytes = math.prod(chunks) * dtype.itemsize if chunks else 0
    on_axes = tuple(int(chunks[var.dims.index(d)]) for d in axes) if chunks and len(chunks) == len(var.dims) else ()
    return CubeBand(name, dtype.name, fill, tuple(invalid), None if scale is None else float(scale),
                    None if offset is None else float(offset), attrs.get("units"), chunk_bytes=chunk_bytes,
                    chunks=on_axes)


def _time_of(ds, dim: str, where: str) -> tuple[tuple[float, ...], str, str]:
    """The time coordinate's stored numbers, units and calendar; checked decodable and increasing."""
    if dim not in ds.variables:
        raise InputError(where, f"time dimension {dim!r} has no coordinate, so windows would have no dates")
    coord = ds[dim]
    units = str(coord.attrs.get("units", ""))
    calendar = str(coord.attrs.get("calendar", "standard"))
    values = np.asarray(coord.values)
    if values.dtype.kind not in "iuf":
        raise InputError(where, f"time coordinate {dim!r} holds {values.dtype} values, not CF numbers")
    values = values.astype(np.float64)
    try:
        iso_times(values[:1], units, calendar)
        iso_times(values[-1:], units, calendar)
    except Exception as e:
        raise InputError(where, f"time coordinate {dim!r} cannot be decoded (units {units!r}, calendar {calendar!r}: "
                         f"{first_line(e, type(e).__name__)})") from None
    _check_increasing(values, where, dim)
    return tuple(values.tolist()), units, calendar


def _check_increasing(values: np.ndarray, where: str, what: str) -> None:
    steps = np.diff(values)
    if len(steps) and not (steps > 0).all():
        i = int(np.argmax(~(steps > 0)))
        raise InputError(where, f"time coordinate {what!r} is not increasing (step {i}: {values[i]:g} then {values[i + 1]:g}); "
                         "sort the time steps and remove duplicates first")


def _georeference(ds, variables, names: Mapping[str, str], where: str) -> tuple[str, tuple[float, ...]]:
    """(CRS as WKT or "", transform) of the cube's grid."""
    from pyproj import CRS

    mapping = None
    for var in variables:
        gm = var.attrs.get("grid_mapping") or var.encoding.get("grid_mapping")
        if gm:
            gm = str(gm).split(":")[0].strip()
            if gm not in ds.variables:
                raise InputError(where, f"variable {var.name!r} names grid_mapping {gm!r}, which is not in the file")
            mapping = ds[gm].attrs
            break
    scale = 1.0
    if mapping is not None:
        try:
            crs = CRS.from_cf(dict(mapping))
        except Exception as e:
            raise InputError(where, f"grid_mapping is not a CRS pyproj understands ({first_line(e, type(e).__name__)})") from None
        units = str(ds[names["x"]].attrs.get("units", "")).lower() if names["x"] in ds.variables else ""
        if mapping.get("grid_mapping_name") == "geostationary" and units.startswith("rad"):
            scale = float(mapping["perspective_point_height"])  # scan angle -> metres on the projection plane
        wkt = crs.to_wkt()
    elif all(names[a] in ds.variables and _degrees(ds[names[a]], a) for a in ("y", "x")):
        wkt = CRS.from_epsg(4326).to_wkt()
    else:
        wkt = ""
    ys, xs = (_coordinate(ds, names[a], int(ds.sizes[names[a]]), where) for a in ("y", "x"))
    (y0, dy), (x0, dx) = ys, xs
    dy, dx, y0, x0 = dy * scale, dx * scale, y0 * scale, x0 * scale
    return wkt, (dx, 0.0, x0 - dx / 2, 0.0, dy, y0 - dy / 2)


def _degrees(coord, axis: str) -> bool:
    units = str(coord.attrs.get("units", "")).lower()
    return units in _UNITS[axis] or str(coord.attrs.get("standard_name", "")) in ("latitude", "longitude")


def _coordinate(ds, dim: str, size: int, where: str) -> tuple[float, float]:
    """(first value, step) of a regularly spaced coordinate (cell centres); cell indices without one."""
    if dim not in ds.variables:
        return 0.5, 1.0  # no coordinate: cell indices, the grid in pixel units
    values = np.asarray(ds[dim].values, np.float64)
    if size == 1:
        return float(values[0]), 1.0
    step = (values[-1] - values[0]) / (size - 1)
    if step == 0 or np.abs(values - (values[0] + step * np.arange(size))).max() > 1e-3 * abs(step):
        raise InputError(where, f"coordinate {dim!r} is not regularly spaced, so windows would have no transform; "
                         "regrid it onto a regular grid first")
    return float(values[0]), float(step)


# --- a folder of dated GeoTIFFs ------------------------------------------------------------------


def _open_stack(folder: Path, variables: Sequence[str] | None, time_from_name: str | None) -> Cube:
    from ..scenes.discover import _rasters_in, close_rasters, read_scene

    where = printable(folder)
    try:
        files = _rasters_in(folder)
        if not files:
            raise InputError(where, "is not a cube: no NetCDF/Zarr, and the folder holds no rasters (one GeoTIFF per "
                             "time step)")
        pattern = _date_pattern(time_from_name)
        dated = sorted(((_date_of(f, pattern), f) for f in files), key=lambda d: d[0])
        for (a, fa), (b, fb) in zip(dated, dated[1:]):
            if a == b:
                raise InputError(printable(fb), f"has the same date as {fa.name} ({_iso(a)}); one raster per time step")
        first = read_scene(dated[0][1], variables, allow_ungeoreferenced=True)
        if first.ratios != {1}:
            raise InputError(printable(first.path), "has bands at different resolutions; a cube's bands share one grid")
        for _, f in dated[1:]:
            scene = read_scene(f, variables, allow_ungeoreferenced=True)
            same = (scene.crs == first.crs and (scene.width, scene.height) == (first.width, first.height)
                    and np.allclose(scene.transform, first.transform, rtol=0, atol=1e-6 * abs(first.transform[0]))
                    and [(b.name, b.dtype) for b in scene.bands] == [(b.name, b.dtype) for b in first.bands])
            if not same:
                raise InputError(printable(f), f"is not on the grid of {dated[0][1].name} ({scene.width}x{scene.height} "
                                 f"px vs {first.width}x{first.height}, or another CRS, transform or bands); a cube's "
                                 "rasters share one grid")
    finally:
        close_rasters()
    bands = tuple(CubeBand(b.name, b.dtype, 0.0 if b.nodata is None else b.nodata, () if b.nodata is None else (b.nodata,),
                           index=b.index) for b in first.bands)
    times = tuple(float(t) for t, _ in dated)
    return Cube(folder.name, os.fspath(folder.resolve()), "geotiff", bands, {"time": "time", "y": "y", "x": "x"},
                (len(dated), first.height, first.width), times, STACK_TIME_UNITS, STACK_CALENDAR, first.crs,
                tuple(first.transform), files=tuple(os.fspath(f.resolve()) for _, f in dated))


def _date_pattern(time_from_name: str | None) -> re.Pattern | None:
    if time_from_name is None:
        return None
    try:
        pattern = re.compile(time_from_name)
    except re.error as e:
        raise ConfigError(f"--time-from-name {time_from_name}: not a regular expression ({e})") from None
    if "date" not in pattern.groupindex:
        raise ConfigError(f"--time-from-name {time_from_name}: needs a group named date, e.g. '(?P<date>\\d{{8}})'")
    return pattern


def _date_of(path: Path, pattern: re.Pattern | None) -> float:
    """Seconds since 1970 of a raster's date: from its name by ``pattern``, else its TIFF DateTime tag."""
    if pattern is not None:
        match = pattern.search(path.name)
        if match is None:
            raise InputError(printable(path), f"name does not match --time-from-name {pattern.pattern}")
        text = match.group("date")
        source = f"date {text!r} from its name"
    else:
        from ..scenes.discover import open_raster

        text = open_raster(os.fspath(path)).tags().get("TIFFTAG_DATETIME")
        if not text:
            raise InputError(printable(path), "has no date: no TIFF DateTime tag; give --time-from-name with a group "
                             "named date, e.g. '(?P<date>\\d{8})'")
        text = text.strip().replace(":", "-", 2)
        source = f"TIFF DateTime {text!r}"
    for fmt in _DATE_FORMATS:
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            continue
    raise InputError(printable(path), f"{source} is not a date (formats: YYYYMMDD, YYYY-MM-DD, YYYYMMDDTHHMMSS, ...)")


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


# --- reading a window ----------------------------------------------------------------------------

_OPEN: OrderedDict[str, object] = OrderedDict()  # path -> open xarray dataset, per process
_OPEN_LIMIT = 8
_OPENED_BY = [os.getpid()]  # the process _OPEN's datasets, _BLOCKS and _CHUNKS belong to
_LEAN: set[str] = set()  # paths in _OPEN opened with HDF5's smallest chunk cache (see _dataset)


#: Bounds of the NetCDF/HDF5 chunk cache of each variable (per process). The windows of one row
#: share chunks (a month of a global grid is often one chunk): those of a window's time steps must
#: stay decompressed, not be inflated again for every window (netCDF's default 64 MB holds three
#: 16 MB chunks, so 4 steps of such a grid were inflated 32 times: 12x slower than one read).
CHUNK_CACHE_MIN, CHUNK_CACHE_MAX = 16 << 20, 384 << 20

#: Default bytes of decoded storage chunks that option II's reads keep per process
#: (:class:`~rico_torch.data.CubePatchDataset`'s ``chunk_cache``).
DECODED_CHUNKS_BYTES = 256 << 20


class DecodedChunks:
    """Decoded storage chunks of cube variables, least recently used evicted first, at most
    ``limit`` bytes in all: windows read one by one (in a random order, or neighbours that share
    a chunk) cut their cells from chunks decoded once, not decompress each chunk again per window.

    Keys: ((cube path, its dimensions on (time, y, x), band), chunk index on (time, y, x)).
    ``hits``/``misses`` count chunks found and decoded."""

    def __init__(self, limit: int = DECODED_CHUNKS_BYTES) -> None:
        self.limit = limit
        self.chunks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.nbytes = self.hits = self.misses = 0

    def get(self, key: tuple) -> np.ndarray | None:
        chunk = self.chunks.get(key)
        if chunk is None:
            self.misses += 1
            return None
        self.chunks.move_to_end(key)
        self.hits += 1
        return chunk

    def put(self, key: tuple, chunk: np.ndarray) -> None:
        """Keep ``chunk`` (owned by the cache from now on: never handed out, never written to)."""
        old = self.chunks.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        if chunk.nbytes > self.limit:
            return
        self.chunks[key] = chunk
        self.nbytes += chunk.nbytes
        self.shrink()

    def bound(self, limit: int) -> None:
        """At most ``limit`` bytes from now on."""
        if limit != self.limit:
            self.limit = limit
            self.shrink()

    def shrink(self) -> None:
        while self.nbytes > self.limit:
            self.nbytes -= self.chunks.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        self.chunks.clear()
        self.nbytes = self.hits = self.misses = 0


_CHUNKS = DecodedChunks()


def _this_process() -> None:
    """A forked child drops what it inherited (HDF5 and netCDF handles must not cross a fork; the
    parent's decoded chunks and blocks are memory it would keep for nothing) and starts its own."""
    if _OPENED_BY[0] != os.getpid():
        _OPEN.clear()  # the parent's handles, never read here
        _BLOCKS.clear()
        _CHUNKS.clear()
        _LEAN.clear()
        _OPENED_BY[0] = os.getpid()


def _keeps_chunks(cube: Cube, band: CubeBand) -> bool:
    """Whether reads of ``band`` go through the decoded chunks (:data:`_CHUNKS`): the cube keeps
    some (option II) and the band is chunked, in chunks that fit."""
    return bool(cube.chunk_cache and band.chunks and band.chunk_bytes <= cube.chunk_cache)


def _dataset(cube: Cube, steps: int = 1):
    """The open dataset of ``cube`` in this process; a NetCDF file is opened with a chunk cache that
    holds the chunks of ``steps`` + 1 time steps (the time extent of the windows read from it), the
    least where every band is cut from decoded chunks (each read then covers whole chunks, once); a
    forked child opens its own (HDF5 and netCDF handles must not cross a fork)."""
    _this_process()
    ds = _OPEN.get(cube.path)
    lean = cube.engine == "netcdf4" and all(_keeps_chunks(cube, b) for b in cube.bands)
    if ds is not None and cube.path in _LEAN and not lean:  # the encoder after option II: HDF5's cache as it needs
        _OPEN.pop(cube.path).close()
        ds = None
    if ds is None:
        if cube.engine == "netcdf4":
            import netCDF4

            largest = 0 if lean else max((b.chunk_bytes for b in cube.bands), default=0)
            netCDF4.set_chunk_cache(min(max((steps + 1) * largest, CHUNK_CACHE_MIN), CHUNK_CACHE_MAX))
        ds = _OPEN[cube.path] = _open_dataset(cube.path, cube.engine)
        (_LEAN.add if lean else _LEAN.discard)(cube.path)
        if len(_OPEN) > _OPEN_LIMIT:
            _OPEN.popitem(last=False)[1].close()
    else:
        _OPEN.move_to_end(cube.path)
    return ds


def close_cubes() -> None:
    """Close the files :func:`read_window` keeps open in this process, and drop its decoded chunks."""
    from ..scenes.discover import close_rasters

    while _OPEN:
        _OPEN.popitem()[1].close()
    _LEAN.clear()
    _BLOCKS.clear()
    _CHUNKS.clear()
    close_rasters()


def read_window(cube: Cube, t: int, row: int, col: int, patch: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The window at (``t``, ``row``, ``col``) of ``patch`` = (steps, rows, cols) cells: band ->
    C-contiguous ``(steps, rows, cols)`` array in the stored dtype, values as stored; cells outside
    the cube (``--edge pad``) hold the band's fill value.

    Cut from a block :func:`prefetch_windows` read where one holds it; else, where the cube has a
    ``chunk_cache`` (option II) and the band is chunked, from its storage chunks, each decoded once
    and kept (:class:`DecodedChunks`, least recently used dropped past ``chunk_cache`` bytes);
    else read from the source on its own."""
    start = (t, row, col)
    lo = tuple(max(s, 0) for s in start)
    hi = tuple(min(s + p, n) for s, p, n in zip(start, patch, cube.shape))
    inner = _read_box(cube, lo, hi)
    if lo == start and tuple(h - s for h, s in zip(hi, start)) == tuple(patch):
        return inner
    out = {}
    where = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
    for band in cube.bands:
        full = np.full(patch, band.fill, dtype=band.dtype)
        full[where] = inner[band.name]
        out[band.name] = full
    return out


# Blocks of the cube the windows of the current worker task cover, read once by
# :func:`prefetch_windows`: (cube, lo, hi, band -> array) boxes on (time, y, x); the cube (path, bands)
# is part of each, so that a process reading several cubes (option II) never cuts one's window from another's.
_BLOCKS: list[tuple[tuple, tuple[int, int, int], tuple[int, int, int], dict[str, np.ndarray]]] = []


def prefetch_windows(cube: Cube, patch: tuple[int, int, int], offsets: np.ndarray) -> None:
    """Read the blocks that the windows at ``offsets`` ((t, row, col) rows) cover: one read per
    band and window row, kept until the next task's; :func:`read_window` cuts windows from them."""
    _BLOCKS.clear()
    rows: dict[tuple[int, int], tuple[int, int]] = {}
    for t, row, col in offsets.tolist():
        first, last = rows.get((t, row), (col, col))
        rows[(t, row)] = (min(first, col), max(last, col))
    for (t, row), (first, last) in rows.items():
        lo = (max(t, 0), max(row, 0), max(first, 0))
        hi = tuple(min(s + p, n) for s, p, n in zip((t, row, last), patch, cube.shape))
        if all(a < b for a, b in zip(lo, hi)):
            try:
                _BLOCKS.append(((cube.path, cube.band_names), lo, hi, _read_box(cube, lo, hi)))
            except InputError:
                pass  # each window then reads (and reports) its own part


def _read_box(cube: Cube, lo: tuple[int, int, int], hi: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Each band's cells [lo, hi) on (time, y, x), as stored (cut from a prefetched block that holds
    them, else from decoded chunks where the cube keeps them)."""
    for of, b_lo, b_hi, arrays in _BLOCKS:
        if of == (cube.path, cube.band_names) and all(bl <= l and h <= bh for bl, l, h, bh in zip(b_lo, lo, hi, b_hi)):
            box = tuple(slice(l - bl, h - bl) for l, h, bl in zip(lo, hi, b_lo))
            return {name: np.ascontiguousarray(a[box]) for name, a in arrays.items()}
    try:
        if cube.kind == "geotiff":
            return _read_stack_box(cube, lo, hi)
        if cube.chunk_cache:
            _this_process()
            _CHUNKS.bound(cube.chunk_cache)
        return {b.name: _cut_from_chunks(cube, b, lo, hi) if _keeps_chunks(cube, b) else _read_variable(cube, b, lo, hi)
                for b in cube.bands}
    except InputError:
        raise
    except Exception as e:
        raise InputError(printable(cube.path), f"reading cells {list(lo)}..{list(hi)} failed "
                         f"({first_line(e, type(e).__name__)})") from None


def _read_variable(cube: Cube, band: CubeBand, lo: tuple[int, ...], hi: tuple[int, ...]) -> np.ndarray:
    """A band's cells [lo, hi) on (time, y, x), read from the source (C-contiguous, as stored)."""
    ds = _dataset(cube, hi[0] - lo[0])
    index = {cube.dims[a]: slice(a0, a1) for a, a0, a1 in zip(AXES, lo, hi)}
    order = [cube.dims[a] for a in AXES]
    return np.ascontiguousarray(ds[band.name].variable.isel(index).transpose(*order).values)


def _cut_from_chunks(cube: Cube, band: CubeBand, lo: tuple[int, ...], hi: tuple[int, ...]) -> np.ndarray:
    """A band's cells [lo, hi), copied out of its decoded storage chunks: those in :data:`_CHUNKS`,
    the others read in one chunk-aligned box (decoded once) and kept."""
    shape = band.chunks
    # per axis, each chunk the box touches: (its index, the box's cells in it, where they go in the box)
    spans = [[(i, slice(max(l, i * c) - i * c, min(h, (i + 1) * c) - i * c),
               slice(max(l, i * c) - l, min(h, (i + 1) * c) - l)) for i in range(l // c, (h - 1) // c + 1)]
             for l, h, c in zip(lo, hi, shape)]
    variable = (cube.path, tuple(cube.dims[a] for a in AXES), band.name)
    out = np.empty(tuple(h - l for l, h in zip(lo, hi)), dtype=band.dtype)
    missing = []
    for (t, t_in, t_out), (y, y_in, y_out), (x, x_in, x_out) in product(*spans):
        chunk = _CHUNKS.get((variable, (t, y, x)))
        if chunk is None:
            missing.append(((t, y, x), (t_in, y_in, x_in), (t_out, y_out, x_out)))
        else:
            out[t_out, y_out, x_out] = chunk[t_in, y_in, x_in]
    if missing:
        first = [min(m[0][k] for m in missing) for k in range(3)]
        last = [max(m[0][k] for m in missing) for k in range(3)]
        box_lo = tuple(i * c for i, c in zip(first, shape))
        box = _read_variable(cube, band, box_lo, tuple(min((i + 1) * c, n) for i, c, n in zip(last, shape, cube.shape)))
        whole = first == last  # the box is one chunk: kept as read
        chunks = {}
        for index in product(*(range(a, b + 1) for a, b in zip(first, last))):
            # a copy, so that the box's memory goes once its chunks are cut (the cache counts its own bytes)
            chunks[index] = chunk = box if whole else box[tuple(slice(i * c - b, (i + 1) * c - b) for i, c, b
                                                                in zip(index, shape, box_lo))].copy()
            _CHUNKS.put((variable, index), chunk)
        for index, cells, where in missing:
            out[where] = chunks[index][cells]
    return out


def _read_stack_box(cube: Cube, lo, hi) -> dict[str, np.ndarray]:
    from rasterio.windows import Window

    from ..scenes.discover import open_raster

    window = Window(lo[2], lo[1], hi[2] - lo[2], hi[1] - lo[1])
    indexes = [b.index for b in cube.bands]
    steps = [open_raster(cube.files[t]).read(indexes, window=window) for t in range(lo[0], hi[0])]
    stack = np.stack(steps, axis=1) if steps else np.zeros((len(indexes), 0, hi[1] - lo[1], hi[2] - lo[2]))
    return {b.name: np.ascontiguousarray(stack[i]) for i, b in enumerate(cube.bands)}


def window_moments(cube: Cube, arrays: Mapping[str, np.ndarray], start: tuple[int, int, int],
                   owned: tuple[tuple[int, int], ...]) -> tuple[tuple, ...]:
    """Per band, the moments (count, mean, m2, min, max) of the valid cells that the window at
    ``start`` owns (``owned``: [lo, hi) per axis, from the planner); the worker measures a value it
    reads with it, a resumed run one it finds stored, so both give the same numbers."""
    from ..scenes.statistics import Moments

    box = tuple(slice(lo - s, hi - s) for (lo, hi), s in zip(owned, start))
    parts = {name: a[box] for name, a in arrays.items()}
    valid = valid_cells(cube, parts)
    out = []
    for band in cube.bands:
        m = Moments.of(parts[band.name][valid])
        out.append((m.count, m.mean, m.m2, m.min, m.max))
    return tuple(out)


def valid_cells(cube: Cube, arrays: Mapping[str, np.ndarray], inside: tuple[slice, ...] | None = None) -> np.ndarray:
    """Where a window's cells are valid: every band neither NaN nor one of its invalid values
    (``_FillValue``, ``missing_value``, nodata). ``inside``: the part of the window inside the cube
    (cells outside are invalid; default: all inside)."""
    valid = None
    for band in cube.bands:
        data = arrays[band.name]
        ok = ~np.isnan(data) if data.dtype.kind == "f" else np.ones(data.shape, bool)
        for v in band.invalid:
            ok &= data != np.array(v).astype(data.dtype)
        valid = ok if valid is None else valid & ok
    if inside is not None:
        mask = np.zeros(valid.shape, bool)
        mask[inside] = True
        valid &= mask
    return valid


def inside(cube: Cube, t: int, row: int, col: int, patch: tuple[int, int, int]) -> tuple[slice, ...]:
    """The part of the window at (t, row, col) that lies inside the cube, as slices of the window."""
    return tuple(slice(0, max(0, min(p, n - s))) for s, p, n in zip((t, row, col), patch, cube.shape))
