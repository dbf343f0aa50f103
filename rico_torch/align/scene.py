"""An aligned set as one scene of ``encode scenes`` (``--grid``/``--grid-like``).

The scene's grid is the target grid, its bands the aligned bands (all at the grid's resolution,
ratio 1), its label raster (``--labels``, warped nearest) the band ``mask``. A window reads its
cells from the fixed warp blocks (:class:`~rico_torch.align.warp.BlockWarper`, one per process
and aligned set), so the scenes chipper's writer, manifest, statistics, shards, resume and
verify hold unchanged. With ``--group-by time`` a value holds every date: ``{band: (T, H, W)}``;
with ``--patch-time N`` windows run over time too (the one planner's time axis,
:mod:`rico_torch.cube.plan`): keys ``<scene>_<t>_<row>_<col>`` and values ``{band: (N, H, W)}``. Either
way the manifest describes the stack as a cube as well (:func:`as_cube`; every window of the full
stack starts at date 0 and holds them all), so the cube's readers take it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from hashlib import sha256
from pathlib import Path

import numpy as np

from ..scenes.discover import BandFile, Scene
from .sources import WARP_BLOCK, Aligned, align, check_modalities
from .warp import BlockWarper

_WARPERS: dict[str, BlockWarper] = {}  # token -> the process's warper (cached blocks)


@dataclass(frozen=True)
class AlignOptions:
    """What ``encode scenes`` was told about alignment: recorded in the manifest so ``verify``
    builds the same aligned set again."""

    grid: str | None = None
    grid_like: str | None = None
    extent: str | None = None
    resampling: tuple[str, ...] = ()
    group_by: str | None = None
    time_from_name: str | None = None
    modalities: tuple[str, ...] = ()
    apply_scale: bool = False
    warp_block: int = WARP_BLOCK
    max_grid_pixels: int | None = None
    labels: str | None = field(default=None, compare=False)

    @property
    def active(self) -> bool:
        return self.grid is not None or self.grid_like is not None

    def build(self, dataset_dir: Path, bands=None) -> Aligned:
        modalities = [("", Path(dataset_dir)), *check_modalities(self.modalities)]
        return align(modalities, grid=self.grid, grid_like=self.grid_like, extent=self.extent,
                     resampling=self.resampling, group_by=self.group_by, time_from_name=self.time_from_name,
                     bands=bands, apply_scale=self.apply_scale, warp_block=self.warp_block,
                     max_grid_pixels=self.max_grid_pixels, labels=self.labels)

    def record(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def aligned_scene(aligned: Aligned, path: str | Path) -> Scene:
    """The aligned set of ``--dataset-dir`` ``path`` as a :class:`Scene` on its target grid
    (``mask``: its label band)."""
    grid = aligned.grid
    res = grid.resolution

    def band_file(spec) -> BandFile:
        return BandFile(spec.name, aligned.name, 0, 1, grid.width, grid.height, spec.dtype, spec.nodata, False, res,
                        aligned.warp_block)

    bands = tuple(band_file(b) for b in aligned.bands if b.name != "mask")
    labels = next((band_file(b) for b in aligned.bands if b.name == "mask"), None)
    return Scene(aligned.name, str(path), bands, grid.width, grid.height, grid.crs, grid.transform, labels,
                 naming="aligned", aligned=aligned)


def token(aligned: Aligned) -> str:
    """A stable name of an aligned set (its recorded description): the per-process warper's key."""
    return sha256(json.dumps(aligned.info(), sort_keys=True, default=str).encode()).hexdigest()


def warper_of(aligned: Aligned) -> BlockWarper:
    """The process's warper of ``aligned``: windows of one set arrive in chunks, each unpickled
    anew, so the warper (and its cached blocks) is found by the set's content."""
    key = aligned.__dict__.get("_token")
    if key is None:
        key = token(aligned)
        object.__setattr__(aligned, "_token", key)
    found = _WARPERS.get(key)
    if found is None:
        found = _WARPERS[key] = BlockWarper(aligned)
    return found


def read_window(scene: Scene, row: int, col: int, size: int, t: int = 0,
                steps: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every band of a window (``(H, W)``, or ``(T, H, W)`` with a time axis) and where any of
    its bands holds a value (the label band does not count): sources of several dates and
    modalities rarely cover the same cells, so a cell with a value in one of them is kept.
    ``steps`` > 0: only the dates ``t`` .. ``t + steps - 1`` (``--patch-time``; dates past the
    last, ``--edge pad``, are nodata and invalid); 0: every date."""
    aligned = scene.aligned
    warper = warper_of(aligned)
    timed = bool(aligned.times)
    dates = range(t, t + steps) if steps else range(aligned.length)
    out, valid = {}, None
    for band in (*scene.bands, *((scene.labels,) if scene.labels is not None else ())):
        steps = [warper.read(band.name, d, row, row + size, col, col + size) if d < aligned.length
                 else _past_the_end(warper, band.name, size) for d in dates]
        data = np.stack([d for d, _ in steps]) if timed else steps[0][0]
        out[band.name] = np.ascontiguousarray(data)
        if band is not scene.labels:
            mask = np.stack([v for _, v in steps]) if timed else steps[0][1]
            valid = mask if valid is None else valid | mask
    return out, valid


def _past_the_end(warper: BlockWarper, band: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A date past the last (``--edge pad`` over time): the band's nodata, invalid."""
    from .warp import _fill

    spec = warper.bands[band]
    return np.full((size, size), _fill(spec), dtype=spec.dtype), np.zeros((size, size), bool)


def as_cube(scene: Scene):
    """The aligned stack of ``scene`` (``--group-by time``) as a :class:`~rico_torch.cube.source.Cube`
    over (time, y, x): its dates as the times of a GeoTIFF stack (seconds since 1970, proleptic
    Gregorian), its bands with their nodata as fill. What a window over time (``--patch-time``)
    and a window holding every date record, so that the cube's readers (dataset
    ``time``/``bounds``/``crs``, window entries, NetCDF stitching) read it as they read a cube's."""
    labels = (scene.labels,) if scene.labels is not None else ()
    bands = [(b.name, b.dtype, b.nodata) for b in (*scene.bands, *labels)]
    return _stack_cube(scene.name, scene.path, scene.aligned.times, bands, (scene.height, scene.width), scene.crs,
                       scene.transform)


def recorded_cube(name: str, scene: dict, label_nodata: float | None):
    """:func:`as_cube` of an aligned stack from its scene entry in manifest.json (``scenes.<name>``)
    alone, no source at hand: what ``upgrade`` records for an encode made before the cube facts were."""
    bands = [(band, entry["dtype"], entry["nodata"]) for band, entry in scene["bands"].items()]
    if scene.get("labels"):  # the label band's effective nodata is the chip's (--label-nodata or the raster's)
        bands.append(("mask", scene["align"]["bands"]["mask"]["dtype"], label_nodata))
    return _stack_cube(name, scene["path"], scene["align"]["times"], bands, (scene["height"], scene["width"]),
                       scene["crs"], scene["transform"])


def _stack_cube(name: str, path: str, times, bands, shape: tuple[int, int], crs: str, transform):
    from datetime import datetime, timezone

    from ..cube.source import STACK_CALENDAR, STACK_TIME_UNITS, Cube, CubeBand

    seconds = tuple(datetime.fromisoformat(d).replace(tzinfo=timezone.utc).timestamp() for d in times)
    cube_bands = tuple(CubeBand(band, dtype, nodata, () if nodata is None or math.isnan(nodata) else (nodata,))
                       for band, dtype, nodata in bands)
    return Cube(name, path, "aligned", cube_bands, {"time": "time", "y": "y", "x": "x"}, (len(times), *shape),
                seconds, STACK_TIME_UNITS, STACK_CALENDAR, crs, tuple(transform))


def identity(aligned: Aligned, options: AlignOptions) -> str:
    """The alignment's part of an encode's identity: the grid, extent rule, warp block, grouping,
    resampling per band, every source file with its size (a change is "other inputs")."""
    import os

    files = sorted({layer.path for _, layers in aligned.stacks for layer in layers})
    return json.dumps({"align": aligned.info(), "options": options.record(),
                       "files": [[os.path.basename(p), os.path.getsize(p)] for p in files]}, sort_keys=True,
                      default=str)


def to_sources(stitched: str | Path, aligned_info: dict, out_dir: str | Path, resampling: str = "nearest") -> list[Path]:
    """A prediction stitched on the target grid warped back onto each source file's own grid
    (``--to-source``): ``<out_dir>/<source file stem>.tif`` per file, nearest by default (classes)."""
    import rasterio
    from rasterio.warp import Resampling, reproject

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted({path for by_date in aligned_info["sources"].values() for files in by_date.values()
                    for path, _ in files})
    written = []
    with rasterio.open(stitched) as pred:
        data = pred.read()
        nodata = pred.nodata if pred.nodata is not None else (math.nan if data.dtype.kind == "f" else 0)
        for path in files:
            with rasterio.open(path) as src:
                profile = {"driver": "GTiff", "width": src.width, "height": src.height, "count": pred.count,
                           "dtype": data.dtype.name, "crs": src.crs, "transform": src.transform, "nodata": nodata,
                           "compress": "deflate", "tiled": True}
                warped = np.full((pred.count, src.height, src.width), nodata, data.dtype)
                reproject(data, warped, src_transform=pred.transform, src_crs=pred.crs, src_nodata=nodata,
                          dst_transform=src.transform, dst_crs=src.crs, dst_nodata=nodata,
                          resampling=Resampling[resampling])
            target = out_dir / f"{Path(path).name.split('.')[0]}.tif"
            with rasterio.open(target, "w", **profile) as dst:
                dst.write(warped)
            written.append(target)
    return written


def describe(name: str, info: dict) -> list[str]:
    """``info``'s lines for an aligned scene: the grid, extent rule, warp block, grouping,
    resampling per band and source files."""
    from rasterio.crs import CRS

    grid = info["grid"]
    crs = CRS.from_wkt(grid["crs"])
    code = crs.to_string() if crs.to_epsg() else crs.to_wkt()[:60]
    a, e = grid["transform"][0], grid["transform"][4]
    times = info.get("times") or []
    grouping = f"group by {info['group_by']}" if info.get("group_by") else "one mosaic"
    if times:
        grouping += f": {len(times)} dates {times[0]} .. {times[-1]}"
    methods: dict[str, list[str]] = {}
    for band, spec in info["bands"].items():
        methods.setdefault(spec["resampling"] + (" (scaled)" if spec.get("scaled") else ""), []).append(band)
    files = {path for by_date in info["sources"].values() for entries in by_date.values() for path, _ in entries}
    return [f"aligned {name}: grid {code}, {abs(a):g} x {abs(e):g} per cell, {grid['width']:,} x {grid['height']:,} "
            f"cells, --extent {info.get('extent') or 'of --grid-like'}, warp block {info['warp_block']} px, "
            f"{grouping}, {len(files)} source files",
            "  resampling: " + "; ".join(f"{m} {' '.join(b)}" for m, b in methods.items())]
