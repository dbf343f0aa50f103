"""Stitching per-patch predictions back into a GeoTIFF of the scene.

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
    """The (shard-merged) manifest of a chipped LMDB; refuses one without scenes."""
    from ..data.store import Store

    manifest = Store(target_dir).manifest()
    if not manifest or "scenes" not in manifest or not manifest.has_column("row"):
        raise FormatError(f"{target_dir}: not an LMDB of chipped scenes (its manifest.json has no scenes); "
                          "create it with `python -m rico_torch.encode scenes ...`")
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
    """Collects ``(key, C x h x w)`` predictions of one scene, then writes the GeoTIFF.

    Args:
        target_dir: the chipped LMDB (or its shard directories): its manifest gives the scene's
            CRS, transform, size and every key's window.
        scene: the scene's name.
        output: the GeoTIFF to write.
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
                 argmax: bool = False) -> None:
        if blend not in BLENDS:
            raise ConfigError(f"blend={blend!r}: one of {', '.join(BLENDS)}")
        self.argmax = argmax
        self.dtype = output_dtype(dtype, nodata, argmax)  # None: decided by the channels (argmax)
        manifest = manifest or _merged(target_dir)
        if scene not in manifest["scenes"]:
            raise UnknownKeyError(f"{target_dir}: no scene {scene!r}; its scenes: {', '.join(manifest['scenes'])}")
        self.info = manifest["scenes"][scene]
        self.windows = manifest.windows
        self.scene, self.output, self.blend, self.nodata = scene, Path(output), blend, nodata
        self.memory, self.compress, self.level = memory, compress, level
        self.channels: int | None = None
        self._placed: dict[str, tuple[int, int, int, int, int]] = {}  # key -> row, col, h, w, offset
        self._tmp = tempfile.TemporaryFile(dir=self.output.parent if self.output.parent.is_dir() else None)
        self._size = 0

    def add(self, key: str, prediction) -> None:
        """Store one patch's prediction (``C x h x w``, the window's size in finest-grid pixels)."""
        array = np.asarray(prediction.detach().cpu() if hasattr(prediction, "detach") else prediction)
        entry = self.windows.get(key)
        if entry is None or entry["scene"] != self.scene:
            where = "not a key of this LMDB" if entry is None else f"a window of scene {entry['scene']!r}"
            raise UnknownKeyError(f"prediction for key {key!r}: {where}, not of scene {self.scene!r}")
        row, col, h, w = entry["window"]
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3 or array.shape[1:] != (h, w):
            raise ConfigError(f"prediction for key {key!r} has shape {list(array.shape)}; expected C x {h} x {w} "
                              "(the window's size in finest-grid pixels)")
        if self.channels is None:
            self.channels = array.shape[0]
        elif array.shape[0] != self.channels:
            raise ConfigError(f"prediction for key {key!r} has {array.shape[0]} channels, earlier ones "
                              f"{self.channels}")
        if key in self._placed:
            raise ConfigError(f"prediction for key {key!r} given twice")
        data = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        self._tmp.write(data)
        self._placed[key] = (row, col, h, w, self._size)
        self._size += len(data)

    def _read(self, offset: int, h: int, w: int) -> np.ndarray:
        self._tmp.flush()
        n = self.channels * h * w * 4
        return np.frombuffer(os.pread(self._tmp.fileno(), n, offset), np.float32).reshape(self.channels, h, w)

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
        per_row = width * (c * 8 + 8 + bands * dtype.itemsize)  # sums, weights, output
        rows = max(TILE, self.memory // max(per_row, 1) // TILE * TILE)
        return min(rows, self.info["height"])

    def write(self) -> Path:
        """Blend everything added into the GeoTIFF (tiled, compressed, the scene's CRS and transform)."""
        import rasterio
        from affine import Affine
        from rasterio.windows import Window

        if self.channels is None:
            raise ConfigError(f"no predictions for scene {self.scene!r}")
        height, width, c = self.info["height"], self.info["width"], self.channels
        dtype, nodata, bands = self.output_type()
        profile = {
            "driver": "GTiff", "width": width, "height": height, "count": bands, "dtype": dtype.name,
            "tiled": True, "blockxsize": TILE, "blockysize": TILE, "compress": self.compress, "nodata": nodata,
            "transform": Affine(*self.info["transform"]), "BIGTIFF": "IF_SAFER", "NUM_THREADS": "ALL_CPUS",
        }
        if self.compress.lower() in ("deflate", "zstd", "lzma") and self.level is not None:
            profile[f"{'ZLEVEL' if self.compress.lower() == 'deflate' else self.compress.upper() + '_LEVEL'}"] = self.level
        if self.info["crs"]:
            profile["crs"] = rasterio.crs.CRS.from_wkt(self.info["crs"])
        placed = sorted(self._placed.values())
        step = self.rows_per_band()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        # GDAL caches written blocks up to 5 % of RAM by default: bound it, the rows are written in order
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), rasterio.open(self.output, "w", **profile) as dst:
            first = 0  # placed[first:] may still overlap the band
            for r0 in range(0, height, step):
                r1 = min(r0 + step, height)
                acc = np.zeros((c, r1 - r0, width))
                weight = np.zeros((r1 - r0, width))
                while first < len(placed) and placed[first][0] + placed[first][2] <= r0:
                    first += 1
                for row, col, h, w, offset in placed[first:]:
                    if row >= r1:
                        break
                    if row + h <= r0:
                        continue
                    a, b = max(row, r0), min(row + h, r1)
                    c0, c1 = max(col, 0), min(col + w, width)
                    pred = self._read(offset, h, w)[:, a - row : b - row, c0 - col : c1 - col]
                    wr = weights_1d(h, row, height, self.blend)[a - row : b - row]
                    wc = weights_1d(w, col, width, self.blend)[c0 - col : c1 - col]
                    if self.blend == "mean":
                        acc[:, a - r0 : b - r0, c0:c1] += pred
                        weight[a - r0 : b - r0, c0:c1] += 1.0
                    else:
                        w2 = wr[:, None] * wc[None, :]
                        acc[:, a - r0 : b - r0, c0:c1] += pred * w2
                        weight[a - r0 : b - r0, c0:c1] += w2
                covered = weight > 0
                np.divide(acc, weight, out=acc, where=covered)
                if self.argmax:
                    acc = acc.argmax(0)[None]
                elif dtype.kind != "f":
                    info = np.iinfo(dtype)
                    np.clip(np.rint(acc, out=acc), info.min, info.max, out=acc)
                out = acc.astype(dtype)
                out[:, ~covered] = nodata
                del acc
                dst.write(out, window=Window(0, r0, width, r1 - r0))
        self._tmp.close()
        return self.output


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
