"""Chipping scenes into the patch LMDB through the shared writer.

Each scene is one source of an ad-hoc :class:`~rico_torch.catalog.Dataset` named ``scenes``;
each window is a :class:`~rico_torch.encode.discover.Patch` whose reader is a
:class:`~rico_torch.scenes.discover.SceneWindow`. So the writer's guarantees hold unchanged:
deterministic ``data.mdb`` across worker counts, resume after a kill, ``--shard``,
``--skip-invalid``, ``verify``. :class:`SceneManifest` adds the scenes' georeference, each
key's window (offsets in ``keys.index``; its transform is derived from the scene's), and
per-band statistics of each scene over its valid pixels (each counted once;
:mod:`rico_torch.scenes.statistics`), gathered from the values as they are written.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..catalog import Band, Dataset, Source
from ..cube.plan import WindowPlan, axis_owned, axis_starts as offsets, key_offsets
from ..errors import ConfigError, InputError
from ..encode.discover import Patch, SourcePatches, WindowList, printable
from ..encode.options import parse_shard
from ..encode.read import value_layout, value_parts
from ..encode.writer import Block, EncodeResult, encode_dataset, patch_item
from ..format import load_value
from ..manifest import lacks_stack_facts
from .discover import ALLOW_UNGEOREFERENCED, EDGES, Scene, SceneWindow, check_options, check_sizes, close_rasters, \
    find_scenes, prefetch_windows, prefetched, too_few_valid, window_moments
from .statistics import Moments, Running, batch_moments, pool, pooled_row

if TYPE_CHECKING:
    from ..align.scene import AlignOptions

NAME = "scenes"
EXAMPLE_CONFIG = "configs/scenes.yaml"
EXAMPLE = "python -m rico_torch.encode scenes --dataset-dir scenes/ --target-dir encoded-scenes --patch-size 120"


@dataclass(frozen=True)
class ChipOptions:
    patch_size: int
    stride: int
    edge: str = "shift"
    min_valid: int = 1
    bands: tuple[str, ...] | None = None
    patch_time: int | None = None  # dates per window of an aligned --group-by time stack (None: every date)
    stride_time: int | None = None
    # --min-valid as a fraction, kept until a full stack's dates are known (over_dates); min_valid is the count
    min_valid_fraction: float | None = None

    def identity(self) -> str:
        # the time window enters only where given, so encodes without it keep their fingerprint
        timed = [self.patch_time, self.stride_time] if self.patch_time else []
        return json.dumps([self.patch_size, self.stride, self.edge, self.min_valid, self.bands, *timed])

    def over_dates(self, dates: int) -> ChipOptions:
        """The options of windows holding all ``dates`` dates of an aligned stack (no ``--patch-time``):
        ``--min-valid`` counts their ``dates`` x P x P cells, so a fraction is taken of those."""
        min_valid = self.min_valid
        if self.min_valid_fraction is not None:
            min_valid = math.ceil(self.min_valid_fraction * dates * self.patch_size * self.patch_size)
        check_options(self.patch_size, self.stride, self.edge, min_valid, dates)
        return replace(self, min_valid=min_valid)

    def window_plan(self, scene: Scene) -> WindowPlan:
        """The scene's windows: over (row, col), and over its dates too with ``patch_time``."""
        time = (scene.aligned.length, self.patch_time, self.stride_time) if self.patch_time else (1, 1, 1)
        return WindowPlan.scene(scene.height, scene.width, self.patch_size, self.stride, self.edge, time)


def key_of(scene: Scene, row: int, col: int) -> str:
    return f"{scene.name}_{row}_{col}"


def plan(scenes: Sequence[Scene], options: ChipOptions,
         shard: tuple[int, int] | None = None) -> tuple[Dataset, list[SourcePatches]]:
    """The ad-hoc dataset (one source per scene) and every window as a patch; with ``shard`` only
    the windows of that shard (``select_shard``'s rule), so a shard job holds only its share."""
    sources, discovered = [], []
    for scene in scenes:
        check_sizes(scene, options.patch_size, options.stride, options.edge)
        if options.patch_time:
            check_dates(scene, options.patch_time, options.edge)
        names = scene.band_names + (("mask",) if scene.labels is not None else ())
        source = Source(scene.name, "--dataset-dir", re.escape(Path(scene.path).name), Path(scene.path).is_dir(),
                        tuple(Band(n) for n in names), scene.bands[0].dtype, noun=f"windows of {scene.name}")
        windows = options.window_plan(scene)
        # (row, col), or (t, row, col) over time; no object per window (12 B each)
        rows = windows.rows(slice(0 if options.patch_time else 1, None))  # no table of every window
        make = (DatedWindows if options.patch_time else SceneWindows)(scene, windows, options.min_valid)
        patches = WindowList(make, rows)
        sources.append(source)
        discovered.append(SourcePatches(source, Path(scene.path), patches if shard is None else patches.shard(*shard)))
    dataset = Dataset(NAME, "Scenes", tuple(sources), description="windows of GeoTIFF scenes", example=EXAMPLE,
                      datamodule="rico_torch.data.GeoPatchDataModule", config=EXAMPLE_CONFIG)
    return dataset, discovered


@dataclass(frozen=True)
class SceneWindows:
    """Makes the patch of a scene's window at (row, col) (a :class:`WindowList`'s ``make``), and
    reads the blocks a worker task's windows cover once (``prefetch``)."""

    scene: Scene
    plan: WindowPlan
    min_valid: int

    def key(self, row: int, col: int) -> str:
        return key_of(self.scene, row, col)

    def block_of(self, row: int, col: int) -> int | None:
        """Which row of the source's blocks the window at (row, col) starts in (the writer gives the
        windows of one block row to one worker, so that each block is decoded once); None: unknown."""
        return block_row(self.scene, row)

    def __call__(self, row: int, col: int) -> Patch:
        (_, _), (r0, r1), (c0, c1) = self.plan.owned(0, row, col)
        return Patch(self.key(row, col), Path(self.scene.path),
                     reader=SceneWindow(self.scene, row, col, self.plan.patch[1], self.min_valid, (r0, r1, c0, c1)))

    def prefetch(self, rows: np.ndarray) -> None:
        prefetch_windows(self.scene, self.plan.patch[1], rows)

    def encoded(self, rows: np.ndarray, measure: bool) -> Iterator:
        """The windows at ``rows`` as the writer's items (:func:`~rico_torch.encode.writer.patch_item`),
        in order. Windows of one row inside a scene whose bands share one grid are cut from the
        blocks read once and laid out, measured and checked together (numpy over the windows, no
        object per window); the others (edges with ``--edge pad``, multi-resolution or masked
        bands) one by one. Both give the same bytes and statistics."""
        scene, size = self.scene, self.plan.patch[1]
        self.prefetch(rows)
        together = scene.aligned is None and all(b.ratio == 1 and not b.masked for b in scene.bands)
        for group in np.split(rows, np.flatnonzero(np.diff(rows[:, 0])) + 1) if len(rows) else ():
            row = int(group[0, 0])
            inside = (group[:, 1] >= 0) & (group[:, 1] + size <= scene.width) & (0 <= row) & (row + size <= scene.height)
            if together and inside.all() and len(group) > 1:
                yield from self._encoded_row(row, group[:, 1], measure)
            else:
                for r, c in group.tolist():
                    yield patch_item(None, self(r, c), measure)

    def _encoded_row(self, row: int, cols: np.ndarray, measure: bool) -> Iterator:
        scene, size = self.scene, self.plan.patch[1]
        bands = scene.bands + ((scene.labels,) if scene.labels is not None else ())
        windows = {b.name: _windows_of(b, row, cols, size) for b in bands}
        first = {name: w[0] for name, w in windows.items() if w is not None}
        layout = value_layout(first) if len(first) == len(bands) else None
        if layout is None:  # a block that could not be read, or no reusable header (a non-native byte order)
            for c in cols.tolist():
                yield patch_item(None, self(row, c), measure)
            return
        header, order = layout
        table = value_parts(first)[1]
        n = len(cols)
        values = np.empty((n, len(header) + sum(windows[name][0].nbytes for name in order)), np.uint8)
        values[:, : len(header)] = np.frombuffer(header, np.uint8)
        at = len(header)
        for name in order:
            flat = windows[name].reshape(n, -1).view(np.uint8)
            values[:, at : at + flat.shape[1]] = flat
            at += flat.shape[1]
        valid = {b.name: _valid_windows(b, windows[b.name]) for b in scene.bands}
        count = np.logical_and.reduce(list(valid.values())).reshape(n, -1).sum(axis=1)
        moments = None
        if measure:
            r0, r1 = self.plan.axes[1].owned[row]
            by_col = self.plan.axes[2].owned  # a window owns its columns from its start: [c, c1)
            widths = np.array([by_col[c][1] for c in cols.tolist()]) - cols
            owned = np.zeros((n, size, size), bool)
            owned[:, r0 - row : r1 - row, :] = (np.arange(size) < widths[:, None])[:, None, :]
            moments = np.stack([batch_moments(windows[b.name].reshape(n, -1), (valid[b.name] & owned).reshape(n, -1))
                                for b in scene.bands], axis=1)
        keys = [self.key(row, c) for c in cols.tolist()]
        kept = count >= self.min_valid
        for i in np.flatnonzero(~kept).tolist():
            yield keys[i], None, None, None, too_few_valid(scene, row, int(cols[i]), int(count[i]), self.min_valid)
        if kept.all():
            yield Block(keys, values, table, moments)
        elif kept.any():
            yield Block([k for k, keep in zip(keys, kept.tolist()) if keep], values[kept], table,
                        None if moments is None else moments[kept])


def block_row(scene: Scene, row: int) -> int | None:
    """Which row of blocks of the scene's bands (finest-grid rows, the coarsest band's blocks) ``row`` is in."""
    rows = max((b.block_rows * b.ratio for b in scene.bands), default=0)
    return row // rows if rows > 0 else None


class SceneManifest:
    """The :class:`~rico_torch.manifest.Extension` of a chip run.

    Statistics: each source pixel of a scene belongs to one window, the last one starting at or
    before it on each axis (so overlapping windows, ``--stride`` < ``--patch-size``, count it once,
    and windows of different shards never share one); a window's moments are those of the valid
    pixels (:func:`~rico_torch.scenes.discover.valid_pixels`, as ``--min-valid`` counts them) it
    owns inside the scene (padding never counts), per band of each scene, and :meth:`add_moments`
    pools a write chunk's windows at a time. A resumed run measures the committed values
    (:meth:`measure`) chunk by chunk in the same order, so its statistics equal an uninterrupted run's.
    """

    def __init__(self, scenes: Sequence[Scene], options: ChipOptions,
                 labels: str = "", align: dict | None = None) -> None:
        self.scenes = {s.name: s for s in scenes}
        self.options = options
        self.align = align  # the alignment options (--grid ...), recorded for verify
        # labels enter the identity only where given, so encodes without them keep their fingerprint
        self.identity = options.identity() + labels
        shape = (options.patch_size, options.stride, options.edge)
        self.owned = {s.name: (axis_owned(s.height, *shape), axis_owned(s.width, *shape)) for s in scenes}
        # windows over time (--patch-time): each stored value is measured by its window's own reader
        self.dated = {s.name: DatedWindows(s, options.window_plan(s), 0) for s in scenes} if options.patch_time else {}
        # every date in each window (--group-by time without --patch-time): described as a cube too
        self.stacked = {s.name: s for s in scenes if full_stack(s, options)}
        self.moments: dict[str, dict[str, Running]] = {}
        self.label_nodata = next((s.labels.nodata for s in scenes if s.labels is not None), None)
        self.refused: dict[str, str] = {}  # band -> why it is not pooled over the scenes

    def measure(self, source: str, key: str, value: bytes) -> tuple[tuple, ...]:
        """A stored value's statistics (a resumed run's), as the worker measures a value it reads."""
        if self.dated:
            t, row, col = (int(v) for v in key.rsplit("_", 3)[1:])
            return self.dated[source].reader(t, row, col, 0).moments(load_value(value, key))
        row, col = _offsets_of(key)
        (r0, r1), (c0, c1) = (owned[at] for owned, at in zip(self.owned[source], (row, col)))
        return window_moments(self.scenes[source], load_value(value, key), row, col, (r0, r1, c0, c1))

    def add_moments(self, source: str, rows: np.ndarray) -> None:
        """One write chunk's windows' statistics ((n, bands, 5): :func:`~rico_torch.scenes.discover.window_moments`)."""
        into = self.moments.get(source)  # one source per scene
        if into is None:
            into = self.moments[source] = [Running() for _ in self.scenes[source].bands]
        for b, running in enumerate(into):
            running.add(pooled_row(rows[:, b]))

    def manifest(self, written: np.ndarray) -> dict:
        size = self.options.patch_size
        scenes = {}
        for name, scene in self.scenes.items():
            moments = {b.name: r.moments() for b, r in zip(scene.bands, self.moments.get(name, ()))}
            scenes[name] = {**scene.info(), "statistics": {b: moments.get(b, Moments()).entry()
                                                           for b in scene.band_names}}
        pooled, self.refused = pool(scenes)
        timed = {"patch_time": self.options.patch_time, "stride_time": self.options.stride_time} \
            if self.options.patch_time else {}
        return {
            "chip": {"patch_size": size, "stride": self.options.stride, "edge": self.options.edge,
                     "min_valid": self.options.min_valid,
                     "bands": list(self.options.bands) if self.options.bands else None,
                     "label_nodata": self.label_nodata, **({"align": self.align} if self.align else {}), **timed},
            "scenes": scenes,
            "statistics": pooled,
            "statistics_not_pooled": self.refused,
            **({"cube": self.cube_facts(scenes)} if self.dated or self.stacked else {}),
        }

    def cube_facts(self, scenes: dict) -> dict:
        """Windows over time: the aligned stack described as a cube (``manifest["cube"]``), so the
        cube's readers take it (dataset ``time``/``bounds``/``crs``, window entries with ``t_off``
        and ``time``, NetCDF stitching). A full stack's windows are one window over time."""
        from ..align.scene import as_cube
        from ..cube.encode import cube_facts

        if self.dated:
            ((name, dated),) = self.dated.items()  # an aligned set is one scene
            scene, windows = dated.scene, dated.plan
        else:
            ((name, scene),) = self.stacked.items()
            options = self.options
            windows = stack_plan(scene.height, scene.width, scene.aligned.length, options.patch_size, options.stride,
                                 options.edge)
        return cube_facts(as_cube(scene), windows, self.options.min_valid, (self.align or {}).get("time_from_name"),
                          scenes[name]["statistics"])

    def columns(self, written: np.ndarray) -> dict[str, np.ndarray]:
        """Each written window's offsets in its scene (the row's source); its transform is derived
        from the scene's (:func:`rico_torch.manifest.window_transform`)."""
        if self.dated:  # keys <scene>_<t>_<row>_<col>: a cube's columns
            offsets = key_offsets(written, 3)
            return {"time": offsets[:, 0], "row": offsets[:, 1], "col": offsets[:, 2]}  # contiguous columns
        offsets = key_offsets(written, 2)
        if self.stacked:  # keys <scene>_<row>_<col> as they were; a cube's columns, every window at date 0
            return {"time": np.zeros(len(written), np.int32), "row": offsets[:, 0], "col": offsets[:, 1]}
        return {"row": offsets[:, 0], "col": offsets[:, 1]}  # contiguous columns, no copy


def _offsets_of(key: str) -> tuple[int, int]:
    """(row, col) of a window's key ``<scene>_<row>_<col>``."""
    row, col = key.rsplit("_", 2)[1:]
    return int(row), int(col)


def _windows_of(band, row: int, cols: np.ndarray, size: int) -> np.ndarray | None:
    """(n, size, size): the band's windows at ``row`` and ``cols``, cut from its prefetched block
    (None where there is none: it could not be read)."""
    from numpy.lib.stride_tricks import sliding_window_view

    for r0, c0, data in prefetched(band):
        if r0 == row and c0 <= cols[0] and cols[-1] + size <= c0 + data.shape[1]:
            windows = sliding_window_view(data[:size], size, axis=1)[:, cols - c0, :]
            return np.ascontiguousarray(windows.transpose(1, 0, 2))
    return None


def _valid_windows(band, windows: np.ndarray) -> np.ndarray:
    """Where (n, h, w) windows of a band without an internal mask are valid (as ``valid_pixels``)."""
    if band.nodata is None:
        return np.ones(windows.shape, bool)
    if math.isnan(band.nodata):
        return ~np.isnan(windows)
    return windows != np.array(band.nodata).astype(windows.dtype)


@dataclass(frozen=True)
class DatedWindows:
    """Makes the patch of an aligned stack's window over (t, row, col) (``--patch-time``): the
    scene's windows on the planner's time axis too, keyed as a cube's (``<scene>_<t>_<row>_<col>``),
    each read from the warp blocks (which the process's warper keeps) by a :class:`SceneWindow`."""

    scene: Scene
    plan: WindowPlan
    min_valid: int

    def key(self, t: int, row: int, col: int) -> str:
        return f"{self.scene.name}_{t}_{row}_{col}"

    def block_of(self, t: int, row: int, col: int) -> tuple | None:
        """The window's time offset and block row (:meth:`SceneWindows.block_of`)."""
        block = block_row(self.scene, row)
        return None if block is None else (t, block)

    def __call__(self, t: int, row: int, col: int) -> Patch:
        return Patch(self.key(t, row, col), Path(self.scene.path), reader=self.reader(t, row, col, self.min_valid))

    def reader(self, t: int, row: int, col: int, min_valid: int) -> SceneWindow:
        (t0, t1), (r0, r1), (c0, c1) = self.plan.owned(t, row, col)
        steps, size = self.plan.patch[:2]
        return SceneWindow(self.scene, row, col, size, min_valid, (r0, r1, c0, c1), t, steps, (t0, t1))


def full_stack(scene: Scene, options: ChipOptions) -> bool:
    """Whether ``scene``'s windows hold every date of an aligned ``--group-by time`` stack
    (values ``{band: (T, H, W)}``, no ``--patch-time``)."""
    return scene.aligned is not None and bool(scene.aligned.times) and not options.patch_time


def stack_plan(height: int, width: int, dates: int, patch_size: int, stride: int, edge: str) -> WindowPlan:
    """A full stack's windows as the one planner's: on the time axis one window of every date."""
    return WindowPlan.scene(height, width, patch_size, stride, edge, (dates, dates, dates))


def recorded_stack_facts(facts: dict) -> dict | None:
    """The cube facts (``manifest["cube"]``) a full stack encoded before they were recorded lacks,
    from its manifest alone (the encoder's, as :meth:`SceneManifest.cube_facts` records them);
    None where nothing is missing. What ``upgrade`` and ``repair`` add."""
    from ..align.scene import recorded_cube
    from ..cube.encode import cube_facts

    if not lacks_stack_facts(facts):
        return None
    chip = facts["chip"]
    ((name, scene),) = facts["scenes"].items()  # an aligned set is one scene
    windows = stack_plan(scene["height"], scene["width"], len(scene["align"]["times"]), chip["patch_size"],
                         chip["stride"], chip["edge"])
    return cube_facts(recorded_cube(name, scene, chip.get("label_nodata")), windows, chip["min_valid"],
                      chip["align"].get("time_from_name"), scene["statistics"])


def check_dates(scene: Scene, patch_time: int, edge: str) -> None:
    """``--patch-time`` fits the aligned stack's dates (``--edge pad`` fills dates past the last)."""
    dates = scene.aligned.length if scene.aligned is not None else 1
    if patch_time > dates and edge != "pad":
        raise InputError(printable(scene.path), f"--patch-time {patch_time} is more than the {dates} dates of the "
                         f"aligned stack, so --edge {edge} leaves no window; use --edge pad or --patch-time {dates} "
                         "or less")


def file_fingerprint(path: str | Path) -> list:
    """A file's name, size and SHA-256: what a label raster adds to an encode's identity."""
    path = Path(path)
    h = sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return [path.name, path.stat().st_size, h.hexdigest()]


def labels_identity(scenes: Sequence[Scene]) -> str:
    """The label rasters' part of an encode's identity ("" without labels): every scene's label
    file (name, size, content hash) and the label nodata value."""
    labelled = [s for s in scenes if s.labels is not None]
    if not labelled:
        return ""
    return json.dumps({"labels": {s.name: file_fingerprint(s.labels.path) for s in labelled},
                       "label_nodata": labelled[0].labels.nodata})


def chip_options(patch_size: int, stride: int | None = None, edge: str = "shift", min_valid: float = 1,
                 bands: Sequence[str] | None = None, patch_time: int | None = None,
                 stride_time: int | None = None, stacked: bool = False) -> ChipOptions:
    """The checked options of a chip run (``min_valid`` below 1: a fraction of a window's pixels,
    of its cells over time with ``patch_time``). ``stacked``: windows will hold every date of an
    aligned ``--group-by time`` stack, whose dates are counted once it is built
    (:meth:`ChipOptions.over_dates`), so ``min_valid`` is checked against them there."""
    stride = patch_size if stride is None else stride
    if patch_time is None and stride_time is not None:
        raise ConfigError("--stride-time needs --patch-time N")
    if patch_time is not None:
        if patch_time < 1:
            raise ConfigError(f"--patch-time {patch_time}: must be at least 1")
        stride_time = patch_time if stride_time is None else stride_time
        if not 1 <= stride_time <= patch_time:
            raise ConfigError(f"--stride-time {stride_time}: must be between 1 and --patch-time {patch_time} "
                              "(windows cover every date)")
    fraction = min_valid if 0 < min_valid < 1 else None
    if fraction is not None:
        min_valid = math.ceil(fraction * (patch_time or 1) * patch_size * patch_size)
    min_valid = int(min_valid)
    # a full stack's windows hold more cells than P x P: the count's upper bound waits for its dates
    check_options(patch_size, stride, edge, min(min_valid, 0) if stacked else min_valid, patch_time or 1)
    return ChipOptions(patch_size, stride, edge, min_valid, tuple(bands) if bands else None, patch_time, stride_time,
                       fraction)


def planned(root: Path, options: ChipOptions, labels: str | Path | None = None, label_nodata: float | None = None,
            allow_ungeoreferenced: bool = False, shard: tuple[int, int] | None = None,
            align: AlignOptions | None = None):
    """The scenes in ``root``, their windows and the manifest extension of a chip run: what
    :func:`chip` writes and :class:`rico_torch.data.ScenePatchDataset` reads on the fly. With
    ``align`` (``--grid``/``--grid-like``) the one scene is every file warped onto that grid."""
    record = None
    if options.patch_time and (align is None or not align.active or align.group_by != "time"):
        raise ConfigError(f"--patch-time {options.patch_time} needs --group-by time (with --grid CRS,RES or "
                          "--grid-like RASTER): windows over time are cut from an aligned stack of dates")
    if align is not None and align.active:
        align = replace(align, labels=None if labels is None else str(labels))
        scenes, identity = aligned_scenes(Path(root), align, options.bands, label_nodata)
        record = align.record()
        if full_stack(scenes[0], options):
            options = options.over_dates(scenes[0].aligned.length)
    else:
        scenes = find_scenes(Path(root), options.bands, None if labels is None else Path(labels), label_nodata,
                             allow_ungeoreferenced)
        identity = labels_identity(scenes)
    check_labels(scenes, options.edge)
    dataset, discovered = plan(scenes, options, shard)
    return scenes, dataset, discovered, SceneManifest(scenes, options, identity, record)


def chip(
    dataset_dir: str | Path,
    target_dir: str | Path,
    patch_size: int,
    stride: int | None = None,
    *,
    bands: Sequence[str] | None = None,
    edge: str = "shift",
    min_valid: float = 1,
    labels: str | Path | None = None,
    label_nodata: float | None = None,
    allow_ungeoreferenced: bool = False,
    num_workers: int = 0,
    overwrite: bool = False,
    skip_invalid: bool = False,
    quiet: bool = True,
    shard: tuple[int, int] | None = None,
    align: AlignOptions | None = None,
    patch_time: int | None = None,
    stride_time: int | None = None,
) -> EncodeResult:
    """Chip every scene in ``dataset_dir`` into the LMDB at ``target_dir`` (see the module doc).

    ``min_valid``: the fewest valid finest-grid pixels a kept window has; a value below 1 is a
    fraction of the window's pixels (with ``--group-by time``, of its cells over its dates).
    ``label_nodata``: the label value that means "no label" (default: the label rasters' nodata);
    ``--edge pad`` fills label pixels outside the scene with it, so labels without one are refused
    with pad. ``allow_ungeoreferenced``: chip rasters without a geotransform (refused otherwise).
    ``align`` (``--grid``/``--grid-like``): every file of ``dataset_dir`` (and the modalities)
    warped onto one target grid, chipped as one scene (:mod:`rico_torch.align.scene`).
    ``patch_time``/``stride_time`` (``--patch-time``, ``--stride-time``; with ``--group-by time``
    only): windows of that many dates, stepping that many, ``edge`` applying on the time axis too;
    keys ``<scene>_<t>_<row>_<col>``.

    Warns (stderr) for every scene that yields no window and for bands that are not pooled
    into dataset-level statistics; raises :class:`InputError` when no window at all is written.
    """
    aligning = align is not None and align.active
    options = chip_options(patch_size, stride, edge, min_valid, bands, patch_time, stride_time,
                           stacked=aligning and align.group_by == "time" and patch_time is None)
    stride = options.stride
    root = Path(dataset_dir)
    try:
        scenes, dataset, discovered, extension = planned(root, options, labels, label_nodata, allow_ungeoreferenced,
                                                         shard, align)
        min_valid = extension.options.min_valid  # of a full stack's cells, once its dates are known
        if not aligning:
            warn_band_files_as_scenes(root, scenes)
    finally:
        close_rasters()
    empty = [s for s in scenes if not (offsets(s.height, patch_size, stride, edge)
                                       and offsets(s.width, patch_size, stride, edge))]
    for scene in empty:
        warn(f"{scene.path}: scene yields no window: it is {scene.width}x{scene.height} px, smaller than "
             f"--patch-size {patch_size}, and --edge drop leaves out partial windows")
    if len(empty) == len(scenes):
        raise InputError(printable(root), f"no scene yields a window of --patch-size {patch_size} with --edge drop; "
                         "use --edge pad or a smaller --patch-size")
    try:
        result = encode_dataset(dataset, discovered, Path(target_dir), num_workers=num_workers, overwrite=overwrite,
                                skip_invalid=skip_invalid, quiet=quiet,
                                sources_info={s.name: str(Path(s.path).resolve()) for s in scenes}, shard=shard,
                                extension=extension)
    finally:
        close_rasters()
    for band, why in extension.refused.items():
        warn(f"band {band} is not in the dataset-level statistics: {why}; its statistics are per scene "
             "(manifest.json: scenes.<name>.statistics)")
    for sp in discovered:
        if sp.patches and not result.counts.get(sp.source.name):
            nodata = result.skipped_nodata.get(sp.source.name, 0)
            why = (f"each has fewer than --min-valid {min_valid:,} valid pixels" if nodata == len(sp.patches) else
                   f"{nodata:,} have fewer than --min-valid {min_valid:,} valid pixels, {len(sp.patches) - nodata:,} "
                   "could not be read")
            warn(f"{sp.source.name}: none of its {len(sp.patches):,} windows was written ({why})")
    if result.written == 0 and any(sp.patches for sp in discovered):
        raise InputError(printable(Path(target_dir)), f"no window was written: all {sum(len(sp.patches) for sp in discovered):,} "
                         "were skipped (see the warnings); lower --min-valid or check the scenes' nodata")
    return result


def aligned_scenes(root: Path, align: AlignOptions, bands, label_nodata: float | None = None) -> tuple[list[Scene], str]:
    """The aligned set of ``root`` as the one scene to chip, and its part of the identity."""
    from ..align.scene import aligned_scene, identity

    aligned = align.build(root, bands)
    scene = aligned_scene(aligned, root)
    if scene.labels is not None and label_nodata is not None:
        scene = replace(scene, labels=replace(scene.labels, nodata=float(label_nodata)))
    return [scene], identity(aligned, align)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def check_labels(scenes: Sequence[Scene], edge: str) -> None:
    """Labels fit ``--edge``: pad fills label pixels outside the scene with the label nodata, so
    there must be one (else they would read as class 0); the value must fit the label dtype."""
    labelled = [s for s in scenes if s.labels is not None]
    if not labelled:
        return
    nodata = labelled[0].labels.nodata
    if nodata is None and edge == "pad":
        raise InputError(printable(labelled[0].labels.path), "label raster has no nodata value, so --edge pad would "
                         "fill label pixels outside the scene with class 0; give --label-nodata (e.g. 255)")
    for scene in labelled:
        dtype = np.dtype(scene.labels.dtype)
        if nodata is not None and dtype.kind in "iu" and not (
                nodata == int(nodata) and np.iinfo(dtype).min <= nodata <= np.iinfo(dtype).max):
            raise InputError(printable(scene.labels.path), f"label nodata {nodata:g} does not fit the label "
                             f"raster's dtype {dtype}")


BAND_LIKE = re.compile(r"(^|_)(B\d{1,2}A?|VV|VH|HH|HV)(_|$)", re.IGNORECASE)


def warn_band_files_as_scenes(root: Path, scenes: Sequence[Scene]) -> None:
    """Warn when ``--dataset-dir`` looks like one product's folder: every scene a single-band
    file named like a band (``B02``, ``..._B8A_20m``, ``VV``), all over one extent."""
    if len(scenes) < 2 or any(len(s.bands) != 1 or Path(s.path).is_dir() for s in scenes):
        return
    if not all(BAND_LIKE.search(s.name) for s in scenes):
        return
    extents = {(s.crs, round(s.transform[2], 6), round(s.transform[5], 6), round(s.transform[0] * s.width, 6),
                round(s.transform[4] * s.height, 6)) for s in scenes}
    if len(extents) == 1:
        warn(f"{root}: every scene is one single-band file named like a band ({', '.join(s.name for s in scenes[:4])}"
             f"{' ...' if len(scenes) > 4 else ''}) over one extent, so each band becomes its own scene; if they "
             f"are the bands of one product, give the folder above it (--dataset-dir {root.parent})")


def verify_scenes(target_dir: str | Path, dataset_dir: str | Path | None = None, num_workers: int = 0,
                  quiet: bool = True):
    """``verify`` of a chipped LMDB; with ``dataset_dir``, every window is read again from the
    scenes (with the options and label rasters the manifest records) and compared."""
    from dataclasses import replace

    from ..encode.verify import verify
    from ..encode.writer import read_manifest
    from .discover import attach_labels

    target = Path(target_dir)
    if dataset_dir is None:
        return verify(target, num_workers=num_workers, quiet=quiet)
    manifest = read_manifest(target) or {}
    chip_options = manifest.get("chip", {})
    options = ChipOptions(chip_options["patch_size"], chip_options["stride"], chip_options["edge"],
                          chip_options["min_valid"], tuple(chip_options["bands"]) if chip_options.get("bands") else None,
                          chip_options.get("patch_time"), chip_options.get("stride_time"))
    try:
        if chip_options.get("align"):
            from ..align.scene import AlignOptions

            align = AlignOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in chip_options["align"].items()})
            scenes = aligned_scenes(Path(dataset_dir), align, options.bands, chip_options.get("label_nodata"))[0]
            _, discovered = plan(scenes, options)
            return _verify_aligned(target, manifest, scenes, discovered, dataset_dir, num_workers, quiet)
        scenes = [s for s in find_scenes(Path(dataset_dir), options.bands, allow_ungeoreferenced=True)
                  if s.name in manifest.get("scenes", {})]
        scenes = [attach_labels(s, Path(manifest["scenes"][s.name]["labels"]), True)
                  if manifest["scenes"][s.name].get("labels") else s for s in scenes]
        scenes = [replace(s, labels=replace(s.labels, nodata=chip_options.get("label_nodata")))
                  if s.labels is not None else s for s in scenes]
        _, discovered = plan(scenes, options)
    finally:
        close_rasters()
    report = verify(target, {s.name: Path(s.path) for s in scenes}, num_workers=num_workers, quiet=quiet,
                    dataset=NAME, discovered=discovered)
    found = {s.name for s in scenes}
    report.problems.extend(f"{name}: scene in {target / 'manifest.json'} is not in {dataset_dir}"
                           for name in manifest.get("scenes", {}) if name not in found)
    return report


def _verify_aligned(target: Path, manifest: dict, scenes, discovered, dataset_dir, num_workers: int, quiet: bool):
    """Every window warped again from the recorded sources onto the recorded grid and compared."""
    from ..encode.verify import verify

    (scene,) = scenes
    report = verify(target, {scene.name: Path(scene.path)}, num_workers=num_workers, quiet=quiet, dataset=NAME,
                    discovered=discovered)
    recorded = manifest.get("scenes", {}).get(scene.name, {}).get("align", {})
    if recorded.get("grid") != scene.aligned.info()["grid"]:
        report.problems.append(f"{scene.name}: the target grid of {dataset_dir} now differs from the one in "
                               f"{target / 'manifest.json'}")
    return report


# --- the command line (``python -m rico_torch.encode scenes``) ------------------------------


def add_parser(sub, common) -> None:
    """The ``scenes`` subcommand; ``common`` adds the options every subcommand shares."""
    p = sub.add_parser(
        NAME,
        help="chip GeoTIFF/COG/JP2 scenes into patches that keep their georeference",
        description="Chip scenes (raster files, or folders of one single-band raster per band at resolutions "
        "that are integer multiples of the finest) into windows of --patch-size finest-grid pixels; every band "
        "is stored at its own resolution, values as rasterio's windowed read. manifest.json records each "
        "scene's CRS and transform and per-band statistics; keys.index each key's window.",
        epilog=f"example:\n  {EXAMPLE} --stride 60 --labels labels/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset-dir", required=True, type=Path, metavar="DIR",
                   help="folder of scenes: raster files and/or folders of single-band rasters")
    p.add_argument("--patch-size", required=True, type=int, metavar="P", help="window size in finest-band pixels")
    p.add_argument("--stride", type=int, metavar="S", help="window step in finest-band pixels (default: P)")
    p.add_argument("--bands", nargs="+", metavar="BAND", help="bands to store, in this order (default: all)")
    p.add_argument("--edge", choices=EDGES, default="shift",
                   help="the last windows: shift inward (default), pad with nodata, or drop")
    p.add_argument("--min-valid", type=float, default=1, metavar="N",
                   help="skip windows with fewer valid pixels (a value below 1: a fraction of the window; with "
                   "--group-by time, of its cells over its dates); default 1")
    p.add_argument("--labels", type=Path, metavar="L",
                   help="label raster on the finest grid (a file, or a folder of <scene name>.tif), stored as 'mask'")
    p.add_argument("--label-nodata", type=float, metavar="V",
                   help="the label value meaning 'no label' (default: the label rasters' nodata); --edge pad fills "
                   "label pixels outside the scene with it, and training ignores it")
    p.add_argument(ALLOW_UNGEOREFERENCED, action="store_true",
                   help="chip rasters without a geotransform (plain images, GCP/RPC-only rasters) in pixel "
                   "coordinates; refused by default")
    add_align_arguments(p)
    common(p)
    p.add_argument("--overwrite", action="store_true", help="replace an LMDB already in the target")
    p.add_argument("--shard", type=parse_shard, metavar="I/N", help="write only shard I of N (crc32(key) %% N == I)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip windows that cannot be read (listed in the manifest) instead of stopping")
    p.set_defaults(dataset=NAME)


def add_align_arguments(p) -> None:
    from ..align.grid import EXTENTS, MAX_GRID_OPTION, MAX_GRID_PIXELS
    from ..align.sources import GROUPS, RESAMPLINGS, WARP_BLOCK

    g = p.add_argument_group("many files, one grid", "warp every file of --dataset-dir (and --modality sources) "
                             "onto one declared grid, chipped as one scene named after --dataset-dir")
    g.add_argument("--grid", metavar="CRS,RES", help="target CRS and square cell size, e.g. EPSG:32633,10 (origin "
                   "snapped to a multiple of the cell size)")
    g.add_argument("--grid-like", metavar="RASTER", help="the target grid of this raster (its CRS, transform and "
                   "size; with --extent its CRS and cell phase)")
    g.add_argument("--extent", choices=EXTENTS, help="the sources' footprints to cover (default with --grid: union)")
    g.add_argument("--resampling", nargs="+", metavar="METHOD|NAME=METHOD",
                   help=f"{', '.join(RESAMPLINGS)}: for the image bands, or for one band or modality (NAME=METHOD); "
                   "default: bilinear for float bands, nearest for integer bands; class bands (--labels, SCL, "
                   "QA_PIXEL) stay nearest unless named")
    g.add_argument("--group-by", choices=GROUPS, help="time: mosaic the files of one date, stack dates as T "
                   "(values T x H x W); band: each single-band file is one band of one image; default: one mosaic")
    g.add_argument("--patch-time", type=int, metavar="N", help="with --group-by time: windows of N dates too "
                   "(keys <scene>_<t>_<row>_<col>, values N x H x W, each window's dates in the manifest; --edge "
                   "applies to the dates as well); default: every date in each window")
    g.add_argument("--stride-time", type=int, metavar="S", help="the step between windows over time, 1 .. N "
                   "(default: N)")
    g.add_argument("--time-from-name", metavar="REGEX", help="a file's or product's date from its name (a group "
                   "'date' or the first group: YYYYMMDD or YYYY-MM-DD); default: the product name, else date tags")
    g.add_argument("--modality", action="append", metavar="NAME=PATH",
                   help="another folder or raster on the same grid, its bands named NAME.<band> (repeatable); "
                   "undated with --group-by time: the same at every date")
    g.add_argument("--apply-scale", action="store_true", help="apply a product's scale and offset: float32 "
                   "reflectance and Kelvin (Landsat C2 L2, from the MTL), reflectance (Sentinel-2, from MTD_MSI*.xml); "
                   "NaN where fill")
    g.add_argument("--warp-block", type=int, default=WARP_BLOCK, metavar="PX",
                   help=f"the grid is warped in blocks of PX cells from its origin (default {WARP_BLOCK}); values "
                   "depend on it, never on windows")
    g.add_argument(MAX_GRID_OPTION, type=int, default=MAX_GRID_PIXELS, metavar="N",
                   help=f"refuse a target grid of more cells (default {MAX_GRID_PIXELS:,})")


def align_options(args: argparse.Namespace) -> AlignOptions | None:
    """The alignment asked for on the command line; None without --grid/--grid-like."""
    given = [name for name in ("extent", "resampling", "group_by", "time_from_name", "modality")
             if getattr(args, name, None)] + (["apply_scale"] if getattr(args, "apply_scale", False) else [])
    if args.grid is None and args.grid_like is None:
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} needs --grid CRS,RES or --grid-like RASTER")
        return None
    from ..align.scene import AlignOptions

    return AlignOptions(args.grid, None if args.grid_like is None else str(args.grid_like), args.extent,
                        tuple(args.resampling or ()), args.group_by, args.time_from_name, tuple(args.modality or ()),
                        args.apply_scale, args.warp_block, args.max_grid_pixels)


def run(args: argparse.Namespace) -> EncodeResult:
    return chip(args.dataset_dir, args.target_dir, args.patch_size, args.stride, bands=args.bands, edge=args.edge,
                min_valid=args.min_valid, labels=args.labels, label_nodata=args.label_nodata,
                allow_ungeoreferenced=args.allow_ungeoreferenced, num_workers=args.num_workers,
                overwrite=args.overwrite, skip_invalid=args.skip_invalid, quiet=args.quiet, shard=args.shard,
                align=align_options(args), patch_time=args.patch_time, stride_time=args.stride_time)


def unlabelled_scenes(manifest: dict) -> list[str]:
    """The scenes of a chipped LMDB's manifest chipped without a label raster (no ``mask`` band)."""
    return sorted(name for name, scene in manifest["scenes"].items() if not scene.get("labels"))


def fit_suggestion(target, manifest: dict) -> str:
    """What to train on a chipped LMDB with: the fit command where every scene has labels, else
    why there is none (no target to train the segmentation config on)."""
    unlabelled = unlabelled_scenes(manifest)
    if not unlabelled:
        return f"`python -m rico_torch fit --config {EXAMPLE_CONFIG} --data.init_args.lmdb_path {target}` trains on it"
    which = "its scenes were" if len(unlabelled) == len(manifest["scenes"]) else \
        f"{len(unlabelled)} of its {len(manifest['scenes'])} scenes were"
    return f"{which} chipped without --labels: no target to train {EXAMPLE_CONFIG} on (chip with --labels to train)"
