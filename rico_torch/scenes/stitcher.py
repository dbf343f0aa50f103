"""Stitching per-patch predictions back into a GeoTIFF of the scene, or a NetCDF of the cube.

Predictions arrive in any order, so each is first appended to a temporary file (float32,
on disk, not in memory). The output is then built one band of rows at a time: every
prediction overlapping the band is read back, weighted and summed; the band is divided by
its summed weights and written. Memory is bounded by one band of rows (``memory`` bytes),
never the whole scene: a 10,980 x 10,980 Sentinel-2 scene with 10 channels stitches within
2 GB.

Outputs: the blended scores (float32 by default, NaN where nothing was predicted; an integer
dtype rounds and clips them and needs a ``nodata`` value), or with ``argmax=True`` a class map:
one band, the index of the highest blended score per pixel, uint8 (nodata 255) or, beyond 255
classes, uint16 (nodata 65535), computed band of rows by band of rows like the rest: a
10,980 px scene with 10 classes is a 120 MB uint8 raster instead of 4.8 GB of float32.

A cube encode (``encode cube``) stitches the same way over (time, row, col): a window's
prediction ``Tp x C x h x w`` covers the last ``Tp`` of its time steps (a forecaster's one step,
or all of them), and the output is a NetCDF with the cube's time axis (CF values, units and
calendar), y/x coordinates, and CRS as a CF ``grid_mapping`` variable; one variable per channel.
An aligned stack chipped over time (``encode scenes --group-by time --patch-time``) is such a cube
(NetCDF/Zarr output), and also a scene: into a GeoTIFF on its target grid, one ``C x h x w`` map per
window, blended with every window that covers the cell, whatever its dates.

Blends: ``mean`` (every covering patch weighs 1, so stitching the patches' own values gives
the scene back exactly) or ``cosine`` (Hann weights ``sin^2(pi (i + 1/2) / n)`` that fall
towards zero at a patch's inner edges and stay 1 from the middle out where the patch edge
is the scene's border, so seams vanish and border pixels keep full weight).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DatasetNotFoundError, FormatError, UnknownKeyError
from ..manifest import merge

BLENDS = ("cosine", "mean")
TILE = 256
DEFAULT_MEMORY = 512 << 20  # bytes for one band of rows (accumulators and output)
GDAL_CACHE_MB = 64


def scene_manifest(target_dir) -> dict:
    """The (shard-merged) manifest of a chipped LMDB or a cube encode; refuses any other."""
    from ..data.store import Store

    manifest = Store(target_dir).manifest()
    if not manifest or not ("scenes" in manifest or "cube" in manifest) or not manifest.has_column("row"):
        raise FormatError(f"{target_dir}: not an LMDB of chipped scenes or of a cube (its manifest.json has neither); "
                          "create it with `python -m rico_torch.encode scenes ...` or `... encode cube ...`")
    return manifest


def _merged(target_dir) -> dict:
    """Scenes and windows of every shard (each shard's manifest checked to be one of scenes)."""
    paths = target_dir if isinstance(target_dir, (list, tuple)) else [target_dir]
    return merge([scene_manifest(path) for path in paths])


def weights_1d(n: int, start: int, size: int, blend: str) -> np.ndarray:
    """Weights along one axis of a window of ``n`` px starting at ``start`` in a scene of ``size``."""
    if blend == "mean":
        return np.ones(n)
    w = np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2
    half = (n + 1) // 2
    if start <= 0:  # the scene's border: full weight up to the middle
        w[:half] = 1.0
    if start + n >= size:
        w[n - half :] = 1.0
    return w


def output_dtype(dtype: str | None, nodata: float | None, argmax: bool) -> np.dtype | None:
    """The output dtype asked for (None: a class map's, decided by its classes), checked with
    ``nodata`` before anything is predicted."""
    if dtype is None:
        return None if argmax else np.dtype("float32")
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise ConfigError(f"dtype={dtype!r}: not a numpy dtype (e.g. float32, uint8, uint16)") from None
    if argmax and resolved.kind not in "ui":
        raise ConfigError(f"dtype={dtype}: a class map (argmax) is written as integers, e.g. uint8")
    if resolved.kind in "ui":
        info = np.iinfo(resolved)
        if nodata is None and not argmax:
            raise ConfigError(f"dtype={dtype}: give a nodata value for an integer output")
        if nodata is not None and not (info.min <= nodata <= info.max and float(nodata).is_integer()):
            raise ConfigError(f"nodata={nodata}: not a {resolved.name} value ({info.min} .. {info.max})")
    elif resolved.kind != "f":
        raise ConfigError(f"dtype={dtype}: give a float or integer dtype")
    return resolved


class Stitcher:
    """Collects ``(key, C x h x w)`` predictions of one scene (``Tp x C x h x w`` of a cube), then
    writes the GeoTIFF (the NetCDF).

    Args:
        target_dir: the chipped LMDB or cube encode (or its shard directories): its manifest gives
            the grid's CRS, transform, size (and time axis) and every key's window.
        scene: the scene's name (a cube's name).
        output: the GeoTIFF to write (``.tif``), or for a cube the NetCDF (``.nc``).
        names: a cube output's variable names, one per channel (default ``prediction_<c>``).
        blend: ``cosine`` or ``mean``.
        dtype: the output's dtype (default float32; with ``argmax`` uint8, or uint16 beyond 255
            classes); an integer dtype rounds and clips the scores to its range.
        nodata: the output's value where nothing was predicted (default NaN for float dtypes, the
            dtype's largest value for a class map; required for integer scores).
        argmax: write the class map (the index of each pixel's highest blended score) instead of
            the scores.
        memory: bytes for one band of rows.
        compress: GDAL compression of the tiled output; level: its level (deflate level 1 writes
            a 10-channel float32 scene about 20x faster than GDAL's default 6, files ~15 % larger).
    """

    def __init__(self, target_dir, scene: str, output: str | Path, blend: str = "cosine", *,
                 dtype: str | None = None, nodata: float | None = None, memory: int = DEFAULT_MEMORY,
                 compress: str = "deflate", level: int | None = 1, manifest: dict | None = None,
                 argmax: bool = False, names: list[str] | None = None) -> None:
        if blend not in BLENDS:
            raise ConfigError(f"blend={blend!r}: one of {', '.join(BLENDS)}")
        self.argmax = argmax
        self.dtype = output_dtype(dtype, nodata, argmax)  # None: decided by the channels (argmax)
        manifest = manifest or _merged(target_dir)
        self.cube = manifest.get("cube")
        if self.cube and "scenes" in manifest and Path(output).suffix.lower() in (".tif", ".tiff"):
            self.cube = None  # an aligned stack's windows over time onto its grid: a map per window, blended over time
        grids = [self.cube["name"]] if self.cube else list(manifest["scenes"])
        if scene not in grids:
            raise UnknownKeyError(f"{target_dir}: no scene {scene!r}; its scenes: {', '.join(grids)}")
        if self.cube:  # the cube's grid in the scenes' terms, plus its time axis
            length, height, width = self.cube["shape"]
            self.info = {**self.cube, "height": height, "width": width}
        else:
            self.info, length = manifest["scenes"][scene], 1
        self.length, self.names = length, names
        suffix = Path(output).suffix.lower()
        if suffix not in ((".nc", ".zarr") if self.cube else (".tif", ".tiff")):
            raise ConfigError(f"{output}: stitch {'a cube into a NetCDF (.nc) or Zarr (.zarr)' if self.cube else 'a scene into a GeoTIFF (.tif)'}")
        self.windows = manifest.windows
        self.scene, self.output, self.blend, self.nodata = scene, Path(output), blend, nodata
        self.memory, self.compress, self.level = memory, compress, level
        self.channels: int | None = None
        self._placed: dict[str, tuple[int, int, int, int, int, int, int]] = {}  # key -> row, col, h, w, offset, t, steps
        self._tmp = tempfile.TemporaryFile(dir=self.output.parent if self.output.parent.is_dir() else None)
        self._size = 0

    def add(self, key: str, prediction) -> None:
        """Store one patch's prediction (``C x h x w``, the window's size in finest-grid pixels)."""
        array = np.asarray(prediction.detach().cpu() if hasattr(prediction, "detach") else prediction)
        entry = self.windows.get(key)
        if entry is None or entry.get("scene", entry.get("cube")) != self.scene:
            where = "not a key of this LMDB" if entry is None else f"a window of scene {entry['scene']!r}"
            raise UnknownKeyError(f"prediction for key {key!r}: {where}, not of scene {self.scene!r}")
        row, col, h, w = entry["window"]
        if array.ndim == 2:
            array = array[None]
        steps = entry.get("t_size", 1)
        if self.cube and array.ndim == 3:
            array = array[None]  # one step: the window's last
        if array.ndim != 3 + bool(self.cube) or array.shape[-2:] != (h, w) or (self.cube and not 1 <= len(array) <= steps):
            want = f"C x {h} x {w}" if not self.cube else f"C x {h} x {w} or T x C x {h} x {w} with T <= {steps}"
            raise ConfigError(f"prediction for key {key!r} has shape {list(array.shape)}; expected {want} "
                              "(the window's size in finest-grid pixels)")
        if self.channels is None:
            self.channels = array.shape[-3]
        elif array.shape[-3] != self.channels:
            raise ConfigError(f"prediction for key {key!r} has {array.shape[-3]} channels, earlier ones "
                              f"{self.channels}")
        if key in self._placed:
            raise ConfigError(f"prediction for key {key!r} given twice")
        data = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        self._tmp.write(data)
        given = len(array) if self.cube else 1  # a cube window's prediction covers its last steps
        t = entry.get("t_off", 0) + steps - given if self.cube else 0  # a GeoTIFF has one step
        self._placed[key] = (row, col, h, w, self._size, t, given)
        self._size += len(data)

    def _read(self, offset: int, steps: int, h: int, w: int) -> np.ndarray:
        self._tmp.flush()
        n = steps * self.channels * h * w * 4
        return np.frombuffer(os.pread(self._tmp.fileno(), n, offset), np.float32).reshape(steps, self.channels, h, w)

    def output_type(self) -> tuple[np.dtype, float, int]:
        """The output's dtype, nodata value and band count (a class map's from the channels)."""
        c = self.channels or 1
        dtype = self.dtype
        if dtype is None:  # a class map: the smallest unsigned type that leaves its top value for nodata
            dtype = np.dtype("uint8" if c < 255 else "uint16")
        nodata = self.nodata
        if nodata is None:
            nodata = math.nan if dtype.kind == "f" else np.iinfo(dtype).max
        if self.argmax and dtype.kind != "f" and (c - 1 > np.iinfo(dtype).max or 0 <= nodata < c):
            raise ConfigError(f"a class map of {c} classes in {dtype.name} with nodata {nodata}: nodata must not be a "
                              f"class index (0 .. {c - 1}) and the classes must fit; e.g. uint16 with nodata 65535")
        return dtype, nodata, 1 if self.argmax else c

    def rows_per_band(self) -> int:
        width, c = self.info["width"], self.channels or 1
        dtype, _, bands = self.output_type()
        per_row = self.length * width * (c * 8 + 8 + bands * dtype.itemsize)  # sums, weights, output
        rows = max(TILE, self.memory // max(per_row, 1) // TILE * TILE)
        return min(rows, self.info["height"])

    def write(self) -> Path:
        """Blend everything added into the GeoTIFF (tiled, compressed, the scene's CRS and transform),
        or a cube's NetCDF (see the module doc)."""
        if self.channels is None:
            raise ConfigError(f"no predictions for scene {self.scene!r}")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        sink = (_Zarr if self.output.suffix.lower() == ".zarr" else _NetCDF)(self) if self.cube else _GeoTIFF(self)
        height, step = self.info["height"], self.rows_per_band()
        with sink:
            placed = sorted(self._placed.values())
            first = 0  # placed[first:] may still overlap the band
            for r0 in range(0, height, step):
                r1 = min(r0 + step, height)
                while first < len(placed) and placed[first][0] + placed[first][2] <= r0:
                    first += 1
                sink.write(r0, r1, *self._blend(placed[first:], r0, r1))
        self._tmp.close()
        return self.output

    def _blend(self, placed: list, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """The blended rows [r0, r1) of every time step: values (L, C, rows, W) and where any
        prediction covers them (L, rows, W); ``placed`` sorted by row, from the first that may overlap."""
        length, height, width, c = self.length, self.info["height"], self.info["width"], self.channels
        acc = np.zeros((length, c, r1 - r0, width))
        weight = np.zeros((length, r1 - r0, width))
        for row, col, h, w, offset, t, steps in placed:
            if row >= r1:
                break
            if row + h <= r0:
                continue
            a, b = max(row, r0), min(row + h, r1)
            c0, c1 = max(col, 0), min(col + w, width)
            t0, t1 = max(t, 0), min(t + steps, length)
            pred = self._read(offset, steps, h, w)[t0 - t : t1 - t, :, a - row : b - row, c0 - col : c1 - col]
            if self.blend == "mean":
                acc[t0:t1, :, a - r0 : b - r0, c0:c1] += pred
                weight[t0:t1, a - r0 : b - r0, c0:c1] += 1.0
            else:
                wt = weights_1d(steps, t, length, self.blend)[t0 - t : t1 - t] if self.cube else np.ones(1)
                wr = weights_1d(h, row, height, self.blend)[a - row : b - row]
                wc = weights_1d(w, col, width, self.blend)[c0 - col : c1 - col]
                w3 = wt[:, None, None] * wr[None, :, None] * wc[None, None, :]
                acc[t0:t1, :, a - r0 : b - r0, c0:c1] += pred * w3[:, None]
                weight[t0:t1, a - r0 : b - r0, c0:c1] += w3
        covered = weight > 0
        np.divide(acc, weight[:, None], out=acc, where=covered[:, None])
        return acc, covered

    def finish(self, acc: np.ndarray, covered: np.ndarray) -> np.ndarray:
        """Blended values (L, C, rows, W) as the output's (L, bands, rows, W): the class map or
        the scores in the output dtype, nodata where nothing covers a cell."""
        dtype, nodata, _ = self.output_type()
        if self.argmax:
            acc = acc.argmax(1)[:, None]
        elif dtype.kind != "f":
            info = np.iinfo(dtype)
            np.clip(np.rint(acc, out=acc), info.min, info.max, out=acc)
        out = acc.astype(dtype)
        out[np.broadcast_to(~covered[:, None], out.shape)] = nodata
        return out


class _GeoTIFF:
    """A scene's stitched GeoTIFF, written band of rows by band of rows."""

    def __init__(self, stitcher: Stitcher) -> None:
        self.stitcher = stitcher

    def __enter__(self) -> "_GeoTIFF":
        import rasterio
        from affine import Affine

        st = self.stitcher
        dtype, nodata, bands = st.output_type()
        profile = {
            "driver": "GTiff", "width": st.info["width"], "height": st.info["height"], "count": bands,
            "dtype": dtype.name, "tiled": True, "blockxsize": TILE, "blockysize": TILE, "compress": st.compress,
            "nodata": nodata, "transform": Affine(*st.info["transform"]), "BIGTIFF": "IF_SAFER",
            "NUM_THREADS": "ALL_CPUS",
        }
        if st.compress.lower() in ("deflate", "zstd", "lzma") and st.level is not None:
            profile[f"{'ZLEVEL' if st.compress.lower() == 'deflate' else st.compress.upper() + '_LEVEL'}"] = st.level
        if st.info["crs"]:
            profile["crs"] = rasterio.crs.CRS.from_wkt(st.info["crs"])
        # GDAL caches written blocks up to 5 % of RAM by default: bound it, the rows are written in order
        self.env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)
        self.env.__enter__()
        self.dst = rasterio.open(st.output, "w", **profile)
        return self

    def write(self, r0: int, r1: int, acc: np.ndarray, covered: np.ndarray) -> None:
        from rasterio.windows import Window

        self.dst.write(self.stitcher.finish(acc, covered)[0], window=Window(0, r0, self.stitcher.info["width"], r1 - r0))

    def __exit__(self, *exc) -> None:
        self.dst.close()
        self.env.__exit__(*exc)


class _NetCDF:
    """A cube's stitched NetCDF (netCDF4, chunked and compressed): the cube's time axis, y/x
    coordinates (the source's own where it can be read, else cell centres from the transform)
    and CRS as a CF grid_mapping; written band of rows by band of rows."""

    def __init__(self, stitcher: Stitcher) -> None:
        self.stitcher = stitcher

    def __enter__(self) -> "_NetCDF":
        import netCDF4

        st, cube = self.stitcher, self.stitcher.cube
        dtype, nodata, bands = st.output_type()
        names = self.names(bands)
        dims = [cube["dims"][a] for a in ("time", "y", "x")]
        self.dst = netCDF4.Dataset(st.output, "w")
        for dim, size in zip(dims, cube["shape"]):
            self.dst.createDimension(dim, size)
        time = self.dst.createVariable(dims[0], "f8", (dims[0],))
        time[:] = self.time_values()
        time.setncatts(self.time_attributes())
        for axis, dim, values in zip(("Y", "X"), dims[1:], coordinates(cube)):
            values = values.astype(values.dtype.newbyteorder("="))  # a Zarr's may be big-endian
            var = self.dst.createVariable(dim, values.dtype, (dim,))
            var[:] = values
            var.setncattr("axis", axis)
        grid_mapping = self.grid_mapping()
        if grid_mapping:
            self.dst.createVariable("crs", "i4").setncatts(grid_mapping)
        chunks = (1, min(TILE, cube["shape"][1]), min(TILE, cube["shape"][2]))
        self.vars = []
        for name in names:
            var = self.dst.createVariable(name, dtype, dims, zlib=True, complevel=st.level or 1, chunksizes=chunks,
                                          fill_value=np.array(nodata).astype(dtype))
            if grid_mapping:
                var.setncattr("grid_mapping", "crs")
            self.vars.append(var)
        return self

    def names(self, bands: int) -> list[str]:
        st = self.stitcher
        names = ["class"] if st.argmax else (st.names or [f"prediction_{c}" for c in range(bands)])
        if len(names) != bands:
            raise ConfigError(f"names: {len(names)} names for {bands} channels")
        return names

    def time_values(self) -> np.ndarray:
        return np.array([np.nan if v == "nan" else v for v in self.stitcher.cube["time"]["values"]], np.float64)

    def time_attributes(self) -> dict:
        time = self.stitcher.cube["time"]
        return {"units": time["units"], "calendar": time["calendar"], "axis": "T", "standard_name": "time"}

    def grid_mapping(self) -> dict:
        """The CF grid_mapping variable's attributes of the cube's CRS (none without one)."""
        if not self.stitcher.cube["crs"]:
            return {}
        from pyproj import CRS

        return {k: v for k, v in CRS.from_user_input(self.stitcher.cube["crs"]).to_cf().items() if v is not None}

    def write(self, r0: int, r1: int, acc: np.ndarray, covered: np.ndarray) -> None:
        out = self.stitcher.finish(acc, covered)
        for c, var in enumerate(self.vars):
            var[:, r0:r1, :] = out[:, c]

    def __exit__(self, *exc) -> None:
        self.dst.close()


class _Zarr(_NetCDF):
    """A cube's stitched Zarr (v3, chunked and compressed): the same variables, coordinates and
    attributes as the NetCDF (dimension names for xarray), written band of rows by band of rows."""

    def __enter__(self) -> "_Zarr":
        import zarr

        st, cube = self.stitcher, self.stitcher.cube
        dtype, nodata, bands = st.output_type()
        names = self.names(bands)
        dims = [cube["dims"][a] for a in ("time", "y", "x")]
        root = zarr.open_group(st.output, mode="w", zarr_format=3)
        time = root.create_array(dims[0], shape=(cube["shape"][0],), dtype="f8", dimension_names=[dims[0]],
                                 attributes=self.time_attributes())
        time[:] = self.time_values()
        for axis, dim, values in zip(("Y", "X"), dims[1:], coordinates(cube)):
            values = values.astype(values.dtype.newbyteorder("="))
            root.create_array(dim, shape=values.shape, dtype=values.dtype, dimension_names=[dim],
                              attributes={"axis": axis})[:] = values
        grid_mapping = self.grid_mapping()
        if grid_mapping:
            root.create_array("crs", shape=(), dtype="i4", attributes=grid_mapping)
        chunks = (1, min(TILE, cube["shape"][1]), min(TILE, cube["shape"][2]))
        fill = np.array(nodata).astype(dtype)
        self.vars = [root.create_array(name, shape=tuple(cube["shape"]), dtype=dtype, chunks=chunks, dimension_names=dims,
                                       fill_value=fill, attributes={"grid_mapping": "crs"} if grid_mapping else {})
                     for name in names]
        return self

    def __exit__(self, *exc) -> None:
        pass


def coordinates(cube: dict) -> tuple[np.ndarray, np.ndarray]:
    """The cube's y and x coordinates: read from its source where it is an xarray cube still at its
    path, else the cell centres its transform gives."""
    height, width = cube["shape"][1:]
    if cube.get("kind") == "xarray" and Path(cube.get("path", "")).exists():
        try:
            import xarray as xr

            zarr = {"consolidated": False} if str(cube["path"]).endswith(".zarr") else {}
            with xr.open_dataset(cube["path"], decode_times=False, **zarr) as ds:
                y, x = (ds[cube["dims"][a]].values for a in ("y", "x"))
            if y.shape == (height,) and x.shape == (width,):
                return y, x
        except Exception:  # the transform says the same, to float precision
            pass
    a, _, c, _, e, f = cube["transform"]
    return f + e * (np.arange(height) + 0.5), c + a * (np.arange(width) + 0.5)


def stitch(target_dir, scene: str, predictions: Iterable, output: str | Path, blend: str = "cosine", *,
           dtype: str | None = None, nodata: float | None = None, memory: int = DEFAULT_MEMORY,
           compress: str = "deflate", level: int | None = 1, argmax: bool = False) -> Path:
    """Write the GeoTIFF of ``scene`` from ``predictions``: ``(key, C x h x w array)`` pairs in any order.

    The output has the scene's CRS and transform, ``C`` bands (one class map with ``argmax``),
    and ``nodata`` where no patch was predicted (e.g. windows skipped as nodata at chipping).
    See :class:`Stitcher` and the module docstring for the outputs, ``blend`` and the memory bound.

    Raises:
        FormatError: ``target_dir`` is not a chipped LMDB.
        UnknownKeyError: an unknown scene, or a key of another scene.
        ConfigError: a prediction of the wrong shape, or a key given twice.
    """
    if not any(Path(p, "manifest.json").exists()
               for p in (target_dir if isinstance(target_dir, (list, tuple)) else [target_dir])):
        raise DatasetNotFoundError(f"{target_dir}: no manifest.json; chip the scenes first with "
                                   "`python -m rico_torch.encode scenes ...`")
    stitcher = Stitcher(target_dir, scene, output, blend, dtype=dtype, nodata=nodata, memory=memory,
                        compress=compress, level=level, argmax=argmax)
    for key, prediction in predictions:
        stitcher.add(key, prediction)
    return stitcher.write()
