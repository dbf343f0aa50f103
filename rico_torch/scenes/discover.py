"""Finding scenes, checking their grids, laying windows over them and reading one window.

A scene is a raster file (every band of it, keys ``B1``..``Bn`` or the band descriptions when
every band has a distinct one) or a folder of single-band rasters (key = file stem), whose
bands may differ in resolution by integer factors (Sentinel-2: 10, 20, 60 m). Windows count
pixels of the finest band; each band is read at its own resolution, so a 120 px window gives
B02 120x120, B05 60x60 and B01 20x20, values exactly as rasterio's windowed read gives them.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..cube.plan import EDGES
from ..encode.discover import SkipPatch, printable
from ..encode.read import first_line, gdal_reason
from ..errors import ConfigError, InputError

#: files that are rasters by their name; other files are tried with GDAL unless they are sidecars
RASTER_SUFFIXES = {".tif", ".tiff", ".jp2", ".vrt", ".img", ".nc", ".hdf", ".h5", ".png", ".jpg", ".jpeg"}
SIDECAR_SUFFIXES = {".xml", ".ovr", ".msk", ".aux", ".json", ".txt", ".md", ".prj", ".tfw", ".wld", ".hdr", ".csv",
                    ".yaml", ".yml", ".html", ".pdf", ".py", ".zip", ".gz", ".mdb"}
MAX_PIXELS = 1 << 40  # a size beyond this is a damaged header, not a scene
ALLOW_UNGEOREFERENCED = "--allow-ungeoreferenced"


@dataclass(frozen=True)
class BandFile:
    """One band of a scene: where it is and its grid relative to the scene's finest band.

    ``ratio``: its pixel size over the finest band's (1, 2, 6 for Sentinel-2 10/20/60 m);
    ``masked``: validity comes from the file's mask (no nodata value, but an internal mask or
    alpha band); without either every pixel is valid.
    """

    name: str
    path: str
    index: int
    ratio: int
    width: int
    height: int
    dtype: str
    nodata: float | None
    masked: bool
    resolution: tuple[float, float]
    block_rows: int = 0  # rows of its file read together (a tile's or strip's; a warp block's); 0: unknown


@dataclass(frozen=True)
class Scene:
    """A scene: its name (the key prefix), bands, finest grid and optional label raster.

    ``naming``: where the band keys come from: ``"index"`` (``B1``..``Bn``, the band's number),
    ``"description"`` (the raster's band descriptions) or ``"file"`` (file stems of a folder).
    """

    name: str
    path: str
    bands: tuple[BandFile, ...]
    width: int
    height: int
    crs: str  # WKT; "" for a raster without georeference
    transform: tuple[float, ...]  # the finest grid's 6 affine coefficients (a, b, c, d, e, f)
    labels: BandFile | None = None
    naming: str = "index"
    aligned: object | None = None  # a rico_torch.align Aligned set: files warped onto this grid (--grid)

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    @property
    def ratios(self) -> set[int]:
        return {b.ratio for b in self.bands}

    def info(self) -> dict:
        """The scene's entry in manifest.json."""
        return {
            "path": self.path,
            "crs": self.crs,
            "transform": list(self.transform),
            "width": self.width,
            "height": self.height,
            "bands": {b.name: {"resolution": list(b.resolution), "ratio": b.ratio, "nodata": b.nodata,
                               "dtype": b.dtype, "width": b.width, "height": b.height} for b in self.bands},
            "band_names": self.naming,
            "labels": None if self.labels is None else self.labels.path,
            **({} if self.aligned is None else {"align": self.aligned.info()}),
        }


# --- opening rasters ------------------------------------------------------------------------

_OPEN: OrderedDict[str, object] = OrderedDict()  # path -> open rasterio dataset, per process
_OPEN_LIMIT = 64
_OPENED_BY = [os.getpid()]  # the process _OPEN's datasets belong to


def open_raster(path: str):
    """A rasterio dataset for ``path``, kept open for the next window of the same scene; a forked
    child opens its own (an inherited handle shares its file offset with the parent's)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    if _OPENED_BY[0] != os.getpid():
        _OPEN.clear()  # the parent's copies, never read here (dropping them closes only this process's)
        _OPENED_BY[0] = os.getpid()
    src = _OPEN.get(path)
    if src is not None:
        _OPEN.move_to_end(path)
        return src
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
    except Exception as e:
        raise InputError(printable(path), f"not a raster GDAL can open ({first_line(e, type(e).__name__)})") from None
    _OPEN[path] = src
    if len(_OPEN) > _OPEN_LIMIT:
        _OPEN.popitem(last=False)[1].close()
    return src


def close_rasters() -> None:
    """Close the rasters :func:`open_raster` keeps open in this process."""
    while _OPEN:
        _OPEN.popitem()[1].close()


def check_georeference(path: str, src) -> None:
    """Refuse a raster without a geotransform (a plain TIFF, or one georeferenced only by GCPs
    or RPCs such as Sentinel-1 GRD): its windows would get an identity transform and no CRS."""
    from affine import Affine

    if src.crs is not None or tuple(src.transform)[:6] != tuple(Affine.identity())[:6]:
        return
    if src.gcps[0]:
        what, fix = "is georeferenced only by GCPs", "warp it onto a grid first: gdalwarp -t_srs <CRS> in.tif out.tif"
    elif src.rpcs is not None:
        what, fix = "is georeferenced only by RPCs", "orthorectify it first: gdalwarp -rpc -t_srs <CRS> in.tif out.tif"
    else:
        what, fix = "has no georeference (no CRS, no geotransform)", "georeference it first"
    raise InputError(printable(path), f"{what}, so its windows would have no georeference; {fix}, or pass "
                     f"{ALLOW_UNGEOREFERENCED} to chip it in pixel coordinates")


def _band_files(path: str, names: Sequence[str] | None, allow_ungeoreferenced: bool = False) -> list[BandFile]:
    """The bands of one raster file (all of them, or ``names`` as keys for a 1-band file)."""
    src = open_raster(path)
    width, height, count = int(src.width), int(src.height), int(src.count)
    if not (0 < width and 0 < height and width * height < MAX_PIXELS and 0 < count < 1 << 16):
        raise InputError(printable(path), f"implausible raster size {width}x{height} px, {count} bands")
    if not allow_ungeoreferenced:
        check_georeference(path, src)
    a, b, _, d, e, _ = tuple(src.transform)[:6]
    if b != 0 or d != 0:
        raise InputError(printable(path), "has a rotated or sheared grid; only north-up grids can be chipped")
    descriptions = list(src.descriptions or [])
    if names is not None:
        keys = list(names)
    elif len(descriptions) == count and all(descriptions) and len(set(descriptions)) == count:
        keys = descriptions
    else:
        keys = [f"B{i}" for i in range(1, count + 1)]
    flags = src.mask_flag_enums
    out = []
    for i, key in enumerate(keys, start=1):
        nodata = src.nodatavals[i - 1]
        masked = nodata is None and any(f.name in ("per_dataset", "alpha") for f in flags[i - 1])
        out.append(BandFile(key, path, i, 1, width, height, src.dtypes[i - 1],
                            None if nodata is None else float(nodata), masked, (abs(a), abs(e)),
                            int(src.block_shapes[i - 1][0])))
    return out


def _grid(path: str) -> tuple[object, tuple[float, ...]]:
    src = open_raster(path)
    return src.crs, tuple(src.transform)[:6]


def _relate(scene_path: str, bands: list[BandFile]) -> tuple[list[BandFile], int, int, object, tuple]:
    """Each band's ratio to the finest; the finest grid. Errors name the file that does not fit."""
    finest = min(bands, key=lambda b: (b.resolution[0], b.resolution[1]))
    crs, transform = _grid(finest.path)
    related = []
    for band in bands:
        band_crs, band_transform = _grid(band.path)
        if band_crs != crs:
            raise InputError(printable(band.path), f"band {band.name} is in another CRS than {Path(finest.path).name} "
                             f"({band_crs} vs {crs}); a scene's bands must share one CRS")
        rx, ry = band.resolution[0] / finest.resolution[0], band.resolution[1] / finest.resolution[1]
        ratio = round(rx)
        if ratio < 1 or abs(rx - ratio) > 1e-6 * ratio or abs(ry - ratio) > 1e-6 * ratio:
            raise InputError(printable(band.path), f"band {band.name}'s pixel size {band.resolution} is not an integer "
                             f"multiple of the finest band's {finest.resolution} ({Path(finest.path).name})")
        tol = 1e-6 * finest.resolution[0]
        if abs(band_transform[2] - transform[2]) > tol or abs(band_transform[5] - transform[5]) > tol or \
                (band_transform[4] > 0) != (transform[4] > 0):
            raise InputError(printable(band.path), f"band {band.name}'s origin differs from "
                             f"{Path(finest.path).name}'s; a scene's bands must share one origin")
        if band.width * ratio != finest.width or band.height * ratio != finest.height:
            raise InputError(printable(band.path), f"band {band.name} is {band.width}x{band.height} px at {ratio}x the "
                             f"finest pixel size, so it does not cover the extent of {Path(finest.path).name} "
                             f"({finest.width}x{finest.height} px)")
        related.append(BandFile(band.name, band.path, band.index, ratio, band.width, band.height, band.dtype,
                                band.nodata, band.masked, band.resolution, band.block_rows))
    return related, finest.width, finest.height, crs, transform


def is_raster_name(path: Path) -> bool | None:
    """True: a raster by its name; False: a sidecar or hidden file; None: ask GDAL."""
    if path.name.startswith(".") or path.name.endswith(".aux.xml"):
        return False
    suffix = path.suffix.lower()
    if suffix in RASTER_SUFFIXES:
        return True
    return False if suffix in SIDECAR_SUFFIXES else None


def _rasters_in(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if not path.is_file():
            continue
        kind = is_raster_name(path)
        if kind is None:  # an unusual name: a raster if GDAL opens it
            try:
                open_raster(os.fspath(path))
                kind = True
            except InputError:
                kind = False
        if kind:
            found.append(path)
    return found


def read_scene(path: Path, bands: Sequence[str] | None = None, allow_ungeoreferenced: bool = False) -> Scene:
    """The scene at ``path`` (a raster file or a folder of single-band rasters), checked."""
    spath = os.fspath(path)
    if path.is_dir():
        files = _rasters_in(path)
        if not files:
            raise InputError(printable(spath), "scene folder holds no rasters (one single-band raster per band)")
        found: list[BandFile] = []
        seen: dict[str, Path] = {}
        for file in files:
            if file.stem in seen:
                raise InputError(printable(file), f"band {file.stem!r} twice in the scene folder (also {seen[file.stem].name})")
            seen[file.stem] = file
            count = open_raster(os.fspath(file)).count
            if count != 1:
                raise InputError(printable(file), f"has {count} bands; a scene folder holds one single-band raster per "
                                 "band (the file stem is the band key)")
            found.extend(_band_files(os.fspath(file), [file.stem], allow_ungeoreferenced))
        name, naming = path.name, "file"
    else:
        found = _band_files(spath, None, allow_ungeoreferenced)
        name = path.stem
        descriptions = open_raster(spath).descriptions or ()
        naming = "description" if tuple(descriptions[:1]) == (found[0].name,) else "index"
    if bands is not None:
        by_name = {b.name: b for b in found}
        missing = [b for b in bands if b not in by_name]
        if missing:
            raise InputError(printable(spath), f"has no band {missing[0]!r} (its bands: {', '.join(by_name)})")
        found = [by_name[b] for b in bands]
    related, width, height, crs, transform = _relate(spath, found)
    return Scene(name, spath, tuple(related), width, height, crs.to_wkt() if crs else "", transform, naming=naming)


def find_scenes(dataset_dir: Path, bands: Sequence[str] | None = None, labels: Path | None = None,
                label_nodata: float | None = None, allow_ungeoreferenced: bool = False) -> list[Scene]:
    """Every scene in ``dataset_dir`` (raster files and sub-folders of rasters), in name order,
    each with its label raster where ``labels`` is given (a file for a single scene, or a
    folder holding ``<scene name>.<ext>`` per scene); ``label_nodata`` overrides the label
    rasters' own nodata (see :func:`label_nodata`)."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise InputError(printable(root), "input directory does not exist" if not root.exists() else
                         "input is not a directory")
    entries = [p for p in sorted(root.iterdir(), key=lambda p: p.name) if not p.name.startswith(".")]
    skip = Path(labels).resolve() if labels is not None else None  # a labels folder kept among the scenes
    candidates = [p for p in entries if p.is_dir() and p.resolve() != skip]
    candidates += [p for p in _rasters_in(root) if p.resolve() != skip]
    if not candidates:
        raise InputError(printable(root), "no scenes found (raster files, or folders of single-band rasters)")
    scenes, seen = [], {}
    for path in sorted(candidates, key=lambda p: p.name):
        scene = read_scene(path, bands, allow_ungeoreferenced)
        if scene.name in seen:
            raise InputError(printable(path), f"scene name {scene.name!r} twice (also {seen[scene.name].name})")
        seen[scene.name] = path
        scenes.append(scene)
    if labels is not None:
        scenes = [attach_labels(s, _labels_for(s, Path(labels), len(scenes)), allow_ungeoreferenced)
                  for s in scenes]
        nodata = label_nodata_of(scenes, label_nodata)
        scenes = [replace(s, labels=replace(s.labels, nodata=nodata)) for s in scenes]
    return scenes


def label_nodata_of(scenes: Sequence[Scene], given: float | None = None) -> float | None:
    """The one label value that marks "no label" (pixels outside the scene with ``--edge pad``,
    the label rasters' own nodata): ``given`` (``--label-nodata``), else the label rasters'
    nodata, which must then agree; None where neither says.

    Raises:
        InputError: two label rasters with different nodata values.
    """
    if given is not None:
        return float(given)
    found = {}
    for scene in scenes:
        if scene.labels is not None and scene.labels.nodata is not None:
            found.setdefault(scene.labels.nodata, scene.labels.path)
    if len(found) > 1:
        (a, pa), (b, pb) = sorted(found.items())[:2]
        raise InputError(printable(pb), f"label nodata {b:g} differs from {a:g} of {Path(pa).name}; give one "
                         "value for all with --label-nodata")
    return next(iter(found), None)


def _labels_for(scene: Scene, labels: Path, count: int) -> Path:
    if labels.is_file():
        if count != 1:
            raise InputError(printable(labels), f"one label file for {count} scenes; give a folder holding "
                             "<scene name>.tif per scene")
        return labels
    if not labels.is_dir():
        raise InputError(printable(labels), "labels: no such file or directory")
    matches = [p for p in _rasters_in(labels) if p.stem == scene.name]
    if len(matches) != 1:
        what = "no" if not matches else "more than one"
        raise InputError(printable(labels), f"{what} label raster named {scene.name}.* for scene {scene.name}")
    return matches[0]


def attach_labels(scene: Scene, path: Path, allow_ungeoreferenced: bool = False) -> Scene:
    """``scene`` with the label raster at ``path``, which must lie on its finest grid."""
    src = open_raster(os.fspath(path))
    if src.count != 1:
        raise InputError(printable(path), f"label raster has {src.count} bands, expected 1")
    crs, transform = _grid(os.fspath(path))
    same_crs = (crs.to_wkt() if crs else "") == scene.crs or (crs is not None and scene.crs and
                                                              crs == _crs(scene.crs))
    tol = 1e-6 * abs(scene.transform[0])
    differs = []
    if not same_crs:
        theirs, ours = crs.to_string() if crs else "none", _crs(scene.crs).to_string() if scene.crs else "none"
        differs.append(f"CRS {theirs} vs {ours}")
    if (src.width, src.height) != (scene.width, scene.height):
        differs.append(f"{src.width}x{src.height} px vs {scene.width}x{scene.height} px")
    if any(abs(x - y) > tol for x, y in zip(transform, scene.transform)):
        differs.append(f"transform ({', '.join(f'{v:g}' for v in transform[:6])}) vs "
                       f"({', '.join(f'{v:g}' for v in scene.transform[:6])})")
    if differs:
        raise InputError(printable(path), f"label raster is not on scene {scene.name}'s finest grid "
                         f"({'; '.join(differs)})")
    band = _band_files(os.fspath(path), ["mask"], allow_ungeoreferenced)[0]
    return replace(scene, labels=band)


def _crs(wkt: str):
    from rasterio.crs import CRS

    return CRS.from_wkt(wkt)


# --- windows --------------------------------------------------------------------------------


def check_sizes(scene: Scene, patch: int, stride: int, edge: str) -> None:
    """Patch size and stride fit every band's grid, and the scene is large enough for ``edge``."""
    for band in scene.bands:
        for what, n in (("--patch-size", patch), ("--stride", stride)):
            if n % band.ratio:
                raise InputError(printable(scene.path), f"{what} {n} is not a multiple of {band.ratio}, band "
                                 f"{band.name}'s pixel size over the finest band's, so windows would not start on "
                                 "its pixels")
    if edge == "shift" and (scene.width < patch or scene.height < patch):
        raise InputError(printable(scene.path), f"scene is {scene.width}x{scene.height} px, smaller than --patch-size "
                         f"{patch}; use --edge pad")


# --- reading one window ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SceneWindow:
    """The reader of one window: a :class:`~rico_torch.encode.discover.Patch`'s ``reader``.

    Every band is read at its own resolution; pixels outside the scene (``--edge pad``) are the
    band's nodata (0 without one). Fewer than ``min_valid`` valid finest-grid pixels (a pixel is
    valid where every band's covering pixel is) raises :class:`SkipPatch`.
    """

    scene: Scene
    row: int
    col: int
    size: int
    min_valid: int
    owned: tuple[int, int, int, int] | None = None  # (row0, row1, col0, col1): the pixels its statistics count
    # an aligned stack chipped over time (--patch-time): the window's first date and its dates
    # (0: every date, the window keyed by row and col alone)
    t: int = 0
    steps: int = 0
    owned_time: tuple[int, int] = (0, 0)  # [t0, t1): the dates its statistics count

    def __call__(self) -> dict[str, np.ndarray]:
        if self.scene.aligned is not None:
            from ..align.scene import read_window

            out, valid = read_window(self.scene, self.row, self.col, self.size, self.t, self.steps)
            self._check_valid(int(valid.sum()))
            return out
        valid = np.ones((self.size, self.size), bool)
        out: dict[str, np.ndarray] = {}
        for band in self.scene.bands:
            data, mask = self._read(band)
            out[band.name] = data
            if band.ratio > 1:
                mask = mask.repeat(band.ratio, 0).repeat(band.ratio, 1)
            valid &= mask
        self._check_valid(int(valid.sum()))
        if self.scene.labels is not None:
            out["mask"] = self._read(self.scene.labels)[0]
        return out

    def _check_valid(self, count: int) -> None:
        if count < self.min_valid:
            raise too_few_valid(self.scene, self.row, self.col, count, self.min_valid, self.t if self.steps else None)

    @property
    def key(self) -> str:
        if self.steps:
            return f"{self.scene.name}_{self.t}_{self.row}_{self.col}"
        return f"{self.scene.name}_{self.row}_{self.col}"

    def moments(self, arrays: dict[str, np.ndarray]) -> tuple[tuple, ...]:
        """The window's statistics (:func:`window_moments`), made in the worker beside its value;
        a window over time counts only the dates it owns (each (t, y, x) cell once)."""
        if self.steps:
            t0, t1 = self.owned_time
            arrays = {name: a[t0 - self.t : t1 - self.t] for name, a in arrays.items()}
        return window_moments(self.scene, arrays, self.row, self.col, self.owned)

    def _read(self, band: BandFile) -> tuple[np.ndarray, np.ndarray]:
        r = band.ratio
        row, col, n = self.row // r, self.col // r, self.size // r
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + n, band.height), min(col + n, band.width)
        try:
            inner = _cut(band, r0, c0, r1, c1)
            inner_mask = valid_pixels(band, inner, (r0, c0, r1, c1))
        except InputError:
            raise
        except Exception as e:
            raise InputError(printable(band.path), f"reading band {band.name} of window {self.key} failed "
                             f"({gdal_reason(e, Path(band.path))})") from None
        if (r0, c0, r1, c1) == (row, col, row + n, col + n):
            return np.ascontiguousarray(inner), inner_mask
        fill = 0 if band.nodata is None else band.nodata
        data = np.full((n, n), fill, dtype=inner.dtype)
        mask = np.zeros((n, n), bool)
        data[r0 - row : r1 - row, c0 - col : c1 - col] = inner
        mask[r0 - row : r1 - row, c0 - col : c1 - col] = inner_mask
        return data, mask


def too_few_valid(scene: Scene, row: int, col: int, count: int, min_valid: int, t: int | None = None) -> SkipPatch:
    if t is not None:  # a window over time (--patch-time)
        return SkipPatch(f"{scene.path}: window {scene.name}_{t}_{row}_{col} (date {t}, row {row}, col {col}) has "
                         f"{count:,} valid cells, fewer than --min-valid {min_valid:,}")
    return SkipPatch(f"{scene.path}: window {scene.name}_{row}_{col} (row {row}, col {col}) has {count:,} valid "
                     f"pixels, fewer than --min-valid {min_valid:,}")


def window_moments(scene: Scene, arrays: dict[str, np.ndarray], row: int, col: int,
                   owned: tuple[int, int, int, int]) -> tuple[tuple, ...]:
    """Per band of ``scene``, the moments (count, mean, m2, min, max) of the valid pixels that the
    window at (``row``, ``col``) owns (``owned``: row0, row1, col0, col1 on the finest grid; padding
    never counts); the worker measures a value it reads with it, a resumed run one it finds stored."""
    from .statistics import batch_moments

    r0, r1, c0, c1 = owned
    out = []
    for band in scene.bands:
        r, data = band.ratio, arrays[band.name]
        box = (..., slice((r0 - row) // r, (r1 - row) // r), slice((c0 - col) // r, (c1 - col) // r))
        valid = np.zeros(data.shape, bool)
        valid[box] = valid_pixels(band, data[box], (r0 // r, c0 // r, r1 // r, c1 // r))
        out.append(tuple(batch_moments(data.reshape(1, -1), valid.reshape(1, -1))[0].tolist()))
    return tuple(out)


# Blocks of the source the windows of the current worker task cover, read once by
# :func:`prefetch_windows`: (path, band index) -> (row0, col0, array) on the band's own grid.
_BLOCKS: dict[tuple[str, int], list[tuple[int, int, np.ndarray]]] = {}


def prefetch_windows(scene: Scene, size: int, offsets: np.ndarray) -> None:
    """Read the blocks that the windows at ``offsets`` ((row, col) rows, finest grid) cover: one
    read per band file and window row (all bands of a file at once), kept until the next task's."""
    _BLOCKS.clear()
    if scene.aligned is not None:  # its bands are other grids' files, warped by its own reader
        return
    by_file: dict[str, list[BandFile]] = {}
    for band in scene.bands + ((scene.labels,) if scene.labels is not None else ()):
        by_file.setdefault(band.path, []).append(band)
    rows: dict[int, tuple[int, int]] = {}
    if len(offsets):  # each run of one row (the plan's order): its first and last column
        starts = np.concatenate([[0], np.flatnonzero(np.diff(offsets[:, 0])) + 1])
        firsts, lasts = np.minimum.reduceat(offsets[:, 1], starts), np.maximum.reduceat(offsets[:, 1], starts)
        for row, first, last in zip(offsets[starts, 0].tolist(), firsts.tolist(), lasts.tolist()):
            lo, hi = rows.get(row, (first, last))
            rows[row] = (min(lo, first), max(hi, last))
    for path, bands in by_file.items():
        r = bands[0].ratio
        height, width = bands[0].height, bands[0].width
        for row, (first, last) in rows.items():
            r0, r1 = max(row // r, 0), min((row + size) // r, height)
            c0, c1 = max(first // r, 0), min((last + size) // r, width)
            if r0 >= r1 or c0 >= c1:
                continue
            try:
                block = open_raster(path).read([b.index for b in bands], window=_window(r0, c0, r1, c1))
            except Exception:
                continue  # each window then reads (and reports) its own part
            for b, data in zip(bands, block):
                _BLOCKS.setdefault((path, b.index), []).append((r0, c0, data))


def prefetched(band: BandFile) -> list[tuple[int, int, np.ndarray]]:
    """The blocks of ``band`` the current task prefetched: (row0, col0, array) on its own grid."""
    return _BLOCKS.get((band.path, band.index), [])


def _cut(band: BandFile, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
    """The band's pixels [r0, r1) x [c0, c1): cut from a prefetched block that holds them, else read."""
    for b0, bc0, data in prefetched(band):
        if b0 <= r0 and bc0 <= c0 and r1 <= b0 + data.shape[0] and c1 <= bc0 + data.shape[1]:
            return data[r0 - b0 : r1 - b0, c0 - bc0 : c1 - bc0]
    return open_raster(band.path).read(band.index, window=_window(r0, c0, r1, c1))


def _window(r0: int, c0: int, r1: int, c1: int):
    from rasterio.windows import Window

    return Window(c0, r0, c1 - c0, r1 - r0)


def valid_pixels(band: BandFile, data: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Where ``data``, the band's pixels in ``box`` (row0, col0, row1, col1 of its own grid), is
    valid: by the file's internal mask or alpha band, else by its nodata value (every pixel
    where it has neither). ``--min-valid`` and the statistics both ask this."""
    if band.masked:
        return open_raster(band.path).read_masks(band.index, window=_window(*box)) != 0
    if band.nodata is None:
        return np.ones(data.shape, bool)
    if math.isnan(band.nodata):
        return ~np.isnan(data)
    return data != np.array(band.nodata).astype(data.dtype)


def check_options(patch: int, stride: int, edge: str, min_valid: int, steps: int = 1) -> None:
    """``steps``: the dates of a window over time (``--patch-time``, or every date of a full
    aligned stack), whose cells ``min_valid`` counts."""
    if patch < 1:
        raise ConfigError(f"--patch-size {patch}: must be at least 1")
    if not 1 <= stride <= patch:
        raise ConfigError(f"--stride {stride}: must be between 1 and the patch size {patch} (windows cover the scene)")
    if edge not in EDGES:
        raise ConfigError(f"--edge {edge!r}: one of {', '.join(EDGES)}")
    if min_valid < 0:
        raise ConfigError(f"--min-valid {min_valid}: must be >= 0")
    if min_valid > steps * patch * patch:
        if steps > 1:
            raise ConfigError(f"--min-valid {min_valid:,}: more than the {steps * patch * patch:,} cells of a window "
                              f"({steps} dates x {patch} x {patch}), so no window could be kept")
        raise ConfigError(f"--min-valid {min_valid:,}: more than the {patch * patch:,} pixels of a window "
                          f"(--patch-size {patch}), so no window could be kept")
