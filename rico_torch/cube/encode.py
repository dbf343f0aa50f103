"""Chipping a datacube into the patch LMDB: ``python -m rico_torch.encode cube``.

The cube (:mod:`rico_torch.cube.source`) is one source of an ad-hoc dataset named ``cube``; its
windows come from the one planner (:mod:`rico_torch.cube.plan`) and each is a
:class:`~rico_torch.encode.discover.Patch` whose reader is a :class:`CubeWindow`, so the writer's
guarantees hold unchanged (byte-identical ``data.mdb`` across worker counts and runs, resume after a
kill, ``--shard``, ``verify``). Keys ``<cube>_<t>_<row>_<col>`` (offsets in cells); values
``{band: array(T, H, W)}`` in the stored dtype. :class:`CubeManifest` records the cube (dims, time
axis and calendar, CRS, transform, patch/stride/edge per axis), each window's offsets in
``keys.index`` (``time``, ``row``, ``col``), and per-band statistics over valid cells, each
(t, y, x) cell counted once (the planner's ownership rule), gathered from the values written.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..catalog import Band, Dataset, Source
from ..encode.discover import Patch, SkipPatch, SourcePatches, WindowList, printable
from ..encode.options import parse_shard
from ..encode.writer import EncodeResult, encode_dataset
from ..errors import ConfigError, InputError
from ..format import load_value
from ..scenes.statistics import Running, pooled_row
from .plan import EDGES, Axis, WindowPlan, key_offsets
from .source import AXES, Cube, close_cubes, inside, open_cube, prefetch_windows, read_window, valid_cells, \
    window_moments

NAME = "cube"
EXAMPLE = ("python -m rico_torch.encode cube --source sst.mnmean.nc --vars sst --target-dir encoded-sst "
           "--patch time=12,lat=32,lon=32 --stride time=6,lat=16,lon=16")
#: what trains on a cube encode: the Dataset's hint, named by ``info`` and the encode's last line
DATAMODULE, CONFIG = "rico_torch.data.CubeDataModule", "configs/cube.yaml"


def fit_command(target: object) -> str:
    """The command that trains on the cube encode at ``target`` (the Dataset's ``fit_command``)."""
    return f"python -m rico_torch fit --config {CONFIG} --data.init_args.lmdb_path {target}"


def key_of(cube: Cube, t: int, row: int, col: int) -> str:
    return f"{cube.name}_{t}_{row}_{col}"


def plan_cube(cube: Cube, patch: Mapping[str, int], stride: Mapping[str, int] | None = None,
              edge: str | Mapping[str, str] = "shift") -> WindowPlan:
    """The windows of ``cube``: ``patch``, ``stride`` and ``edge`` per dimension, named by the cube's
    own dimension names (or ``time``/``y``/``x``); a dimension not in ``patch`` takes windows of 1
    (time) or is refused (y, x). Stride defaults to the patch; edge is one rule or one per dimension.

    Raises:
        ConfigError: an unknown dimension name, a size that is not a size, an unknown edge rule.
        InputError: a cube smaller than a patch where ``shift`` needs it whole.
    """
    by_name = {cube.dims[a]: a for a in AXES}

    def per_axis(values: Mapping | str | None, option: str, default) -> dict[str, object]:
        if values is None or isinstance(values, str):
            return {a: (default(a) if callable(default) else default) if values is None else values for a in AXES}
        out = {}
        for dim, v in values.items():
            axis = by_name.get(dim, dim if dim in AXES else None)
            if axis is None:
                raise InputError(printable(cube.path), f"has no dimension {dim!r} ({option} {dim}={v}); its dimensions "
                                 f"are {', '.join(f'{cube.dims[a]} ({a})' for a in AXES)}")
            out[axis] = v
        return {a: out.get(a, default(a) if callable(default) else default) for a in AXES}

    patches = per_axis(patch, "--patch", lambda a: 1 if a == "time" else None)
    for axis in ("y", "x"):
        if patches[axis] is None:
            raise ConfigError(f"--patch: give the window size of {cube.dims[axis]} ({axis}), e.g. --patch "
                              f"{cube.dims['time']}=4,{cube.dims['y']}=64,{cube.dims['x']}=64")
    strides = per_axis(stride, "--stride", lambda a: patches[a])
    edges = per_axis(edge, "--edge", "shift")
    axes = []
    for axis, size in zip(AXES, cube.shape):
        p, s, e = patches[axis], strides[axis], edges[axis]
        dim = cube.dims[axis]
        if not isinstance(p, int) or p < 1:
            raise ConfigError(f"--patch {dim}={p}: must be a whole number >= 1")
        if not isinstance(s, int) or not 1 <= s <= p:
            raise ConfigError(f"--stride {dim}={s}: must be between 1 and the patch size {p} (windows cover the cube)")
        if e not in EDGES:
            raise ConfigError(f"--edge {dim}={e}: one of {', '.join(EDGES)}")
        if e == "shift" and size < p:
            raise InputError(printable(cube.path), f"{dim} has {size} cells, fewer than --patch {dim}={p}; use --edge "
                             f"{dim}=pad or a smaller patch")
        axes.append(Axis(dim, size, p, s, e))
    return WindowPlan(tuple(axes))


@dataclass(frozen=True, slots=True)
class CubeWindow:
    """The reader of one window (a :class:`Patch`'s ``reader``): :func:`read_window`, skipped
    (:class:`SkipPatch`) with fewer than ``min_valid`` valid cells."""

    cube: Cube
    t: int
    row: int
    col: int
    patch: tuple[int, int, int]
    min_valid: int
    owned: tuple[tuple[int, int], ...] = ()  # [lo, hi) per axis: the cells its statistics count

    def moments(self, arrays: dict[str, np.ndarray]) -> tuple[tuple, ...]:
        return window_moments(self.cube, arrays, (self.t, self.row, self.col), self.owned)

    def __call__(self) -> dict[str, np.ndarray]:
        arrays = read_window(self.cube, self.t, self.row, self.col, self.patch)
        if self.min_valid:
            count = int(valid_cells(self.cube, arrays, inside(self.cube, self.t, self.row, self.col, self.patch)).sum())
            if count < self.min_valid:
                raise SkipPatch(f"{self.cube.path}: window {key_of(self.cube, self.t, self.row, self.col)} has "
                                f"{count:,} valid cells, fewer than --min-valid {self.min_valid:,}")
        return arrays


def windows_of(cube: Cube, plan: WindowPlan, min_valid: int,
               shard: tuple[int, int] | None = None) -> tuple[Dataset, list[SourcePatches]]:
    """The ad-hoc dataset (one source: the cube) and its windows as patches (a shard's only)."""
    source = Source(cube.name, "--source", "", Path(cube.path).is_dir(), tuple(Band(b) for b in cube.band_names),
                    None, noun=f"windows of {cube.name}")
    make = CubeWindows(cube, plan, min_valid)
    windows = WindowList(make, plan.rows())  # (t, row, col), made for the windows asked for
    if shard is not None:
        windows = windows.shard(*shard)
    dataset = Dataset(NAME, "Datacube", (source,), description="windows of a datacube over (time, y, x)",
                      example=EXAMPLE, datamodule=DATAMODULE, config=CONFIG)
    return dataset, [SourcePatches(source, Path(cube.path), windows)]


@dataclass(frozen=True)
class CubeWindows:
    """Makes the patch of the window at (t, row, col) (a :class:`WindowList`'s ``make``), and reads
    the blocks a worker task's windows cover once (``prefetch``)."""

    cube: Cube
    plan: WindowPlan
    min_valid: int

    def key(self, t: int, row: int, col: int) -> str:
        return key_of(self.cube, t, row, col)

    def __call__(self, t: int, row: int, col: int) -> Patch:
        return Patch(self.key(t, row, col), Path(self.cube.path),
                     reader=CubeWindow(self.cube, t, row, col, self.plan.patch, self.min_valid,
                                       self.plan.owned(t, row, col)))

    def prefetch(self, rows: np.ndarray) -> None:
        prefetch_windows(self.cube, self.plan.patch, rows)

    def block_of(self, t: int, row: int, col: int) -> tuple:
        """The window's time offset and row of storage chunks (the writer gives the windows of one
        to one worker, so that each chunk is decoded once)."""
        chunks = self.cube.bands[0].chunks
        return (t, row // chunks[1]) if len(chunks) == 3 and chunks[1] > 0 else (t, row)


class CubeManifest:
    """The :class:`~rico_torch.manifest.Extension` of a cube encode: the cube's facts, the chip
    options, each written window's offsets, statistics over the cells each window owns."""

    def __init__(self, cube: Cube, plan: WindowPlan, options: dict) -> None:
        self.cube, self.plan, self.options = cube, plan, options
        self.identity = json.dumps(options, sort_keys=True)
        self.moments = [Running() for _ in cube.bands]

    def measure(self, source: str, key: str, value: bytes) -> tuple[tuple, ...]:
        """A stored value's statistics (a resumed run's), as the worker measures a value it reads."""
        start = _offsets_of(key)
        return window_moments(self.cube, load_value(value, key), start, self.plan.owned(*start))

    def add_moments(self, source: str, rows: np.ndarray) -> None:
        """One write chunk's windows' statistics ((n, bands, 5), in write order)."""
        for b, running in enumerate(self.moments):
            running.add(pooled_row(rows[:, b]))

    def manifest(self, written: np.ndarray) -> dict:
        statistics = {b: r.moments().entry() for b, r in zip(self.cube.band_names, self.moments)}
        return {
            "cube": cube_facts(self.cube, self.plan, self.options["min_valid"], self.options["time_from_name"],
                               statistics),
            "statistics": statistics,
        }  # the windows skipped as nodata: counted by the writer (skipped_nodata)

    def columns(self, written: np.ndarray) -> dict[str, np.ndarray]:
        offsets = key_offsets(written, 3)
        return {"time": offsets[:, 0], "row": offsets[:, 1], "col": offsets[:, 2]}  # contiguous columns


def cube_facts(cube: Cube, plan: WindowPlan, min_valid: int, time_from_name: str | None, statistics: dict) -> dict:
    """``manifest["cube"]``: the cube's facts and its windows' patch, stride and edge per axis (what
    the cube's readers take): of an ``encode cube``, and of an aligned stack chipped over time
    (``encode scenes --group-by time --patch-time``)."""
    axes = dict(zip(AXES, plan.axes))
    return {**cube.info(), "patch": {a: x.patch for a, x in axes.items()}, "stride": {a: x.stride for a, x in axes.items()},
            "edge": {a: x.edge for a, x in axes.items()}, "min_valid": min_valid, "time_from_name": time_from_name,
            "statistics": statistics}


def _offsets_of(key: str) -> tuple[int, int, int]:
    t, row, col = key.rsplit("_", 3)[1:]
    return int(t), int(row), int(col)


def planned(source: str | Path, patch: Mapping[str, int], stride: Mapping[str, int] | None = None,
            edge: str | Mapping[str, str] = "shift", variables: Sequence[str] | None = None,
            dims: Mapping[str, str] | None = None, time_from_name: str | None = None, min_valid: float = 1,
            shard: tuple[int, int] | None = None, chunk_cache: int = 0):
    """The cube, its windows (a shard's only) and the manifest extension of an encode with these
    options (see :func:`encode_cube`): what :func:`encode_cube` writes and
    :class:`rico_torch.data.CubePatchDataset` reads on the fly (``chunk_cache``: the bytes of
    decoded chunks its window reads keep per process, :attr:`Cube.chunk_cache`; the encoder reads
    each block once and keeps none)."""
    cube = open_cube(source, variables, dims, time_from_name)
    if chunk_cache:
        cube = replace(cube, chunk_cache=int(chunk_cache))
    plan = plan_cube(cube, patch, stride, edge)
    cells = math.prod(plan.patch)
    if 0 < min_valid < 1:
        min_valid = math.ceil(min_valid * cells)
    min_valid = int(min_valid)
    if not 0 <= min_valid <= cells:
        raise ConfigError(f"--min-valid {min_valid:,}: must be between 0 and the {cells:,} cells of a window")
    dataset, discovered = windows_of(cube, plan, min_valid, shard)
    options = {"patch": list(plan.patch), "stride": [a.stride for a in plan.axes],
               "edge": [a.edge for a in plan.axes], "min_valid": min_valid, "bands": list(cube.band_names),
               "dims": dict(cube.dims), "time": list(cube.time), "time_from_name": time_from_name}
    return cube, dataset, discovered, CubeManifest(cube, plan, options)


def encode_cube(
    source: str | Path,
    target_dir: str | Path,
    patch: Mapping[str, int],
    stride: Mapping[str, int] | None = None,
    *,
    edge: str | Mapping[str, str] = "shift",
    variables: Sequence[str] | None = None,
    dims: Mapping[str, str] | None = None,
    time_from_name: str | None = None,
    min_valid: float = 1,
    num_workers: int = 0,
    overwrite: bool = False,
    skip_invalid: bool = False,
    quiet: bool = True,
    shard: tuple[int, int] | None = None,
) -> EncodeResult:
    """Chip the cube at ``source`` into the LMDB at ``target_dir`` (see the module doc).

    ``min_valid``: the fewest valid cells (every band neither NaN nor a fill value) a kept window
    has; below 1 a fraction of the window's cells. Raises :class:`InputError` when no window is written.
    """
    try:
        cube, dataset, discovered, extension = planned(source, patch, stride, edge, variables, dims, time_from_name,
                                                       min_valid, shard)
        min_valid = extension.options["min_valid"]
        result = encode_dataset(dataset, discovered, Path(target_dir), num_workers=num_workers, overwrite=overwrite,
                                skip_invalid=skip_invalid, quiet=quiet, sources_info={cube.name: cube.path},
                                shard=shard, extension=extension)
    finally:
        close_cubes()
    if result.written == 0 and discovered[0].patches:
        raise InputError(printable(Path(target_dir)), f"no window was written: all {len(discovered[0].patches):,} were skipped "
                         f"(fewer than --min-valid {min_valid:,} valid cells); lower --min-valid")
    return result


def verify_cube(target_dir: str | Path, source: str | Path | None = None, num_workers: int = 0, quiet: bool = True):
    """``verify`` of a cube encode; with ``source``, every window is read again from it (with the
    options the manifest records) and compared."""
    from ..encode.verify import verify
    from ..encode.writer import read_manifest

    target = Path(target_dir)
    if source is None:
        return verify(target, num_workers=num_workers, quiet=quiet)
    recorded = (read_manifest(target) or {}).get("cube", {})
    try:
        cube = open_cube(source, list(recorded["bands"]), recorded["dims"] if recorded["kind"] == "xarray" else None,
                         recorded.get("time_from_name"))
        by_axis = {a: cube.dims[a] for a in AXES}
        plan = plan_cube(cube, *({by_axis[a]: v for a, v in recorded[k].items()} for k in ("patch", "stride", "edge")))
        _, discovered = windows_of(cube, plan, int(recorded["min_valid"]))
    finally:
        close_cubes()
    return verify(target, {cube.name: Path(cube.path)}, num_workers=num_workers, quiet=quiet, dataset=NAME,
                  discovered=discovered)


# --- the command line (``python -m rico_torch.encode cube``) ---------------------------------------


def parse_sizes(text: str) -> dict[str, int]:
    """``time=12,lat=32,lon=32`` -> {"time": 12, "lat": 32, "lon": 32}."""
    out = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        if not eq or not name.strip():
            raise argparse.ArgumentTypeError(f"{text!r}: give DIM=N pairs separated by commas, e.g. time=12,lat=32,lon=32")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: {value!r} is not a whole number") from None
    return out


def parse_names(text: str) -> dict[str, str]:
    """``time=t,y=lat,x=lon`` (``--dims``) or ``time=drop,lat=shift`` (``--edge``) -> a dict."""
    out = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"{text!r}: give NAME=VALUE pairs separated by commas")
        out[name.strip()] = value.strip()
    return out


def parse_edge(text: str) -> str | dict[str, str]:
    return text if "=" not in text else parse_names(text)


def add_parser(sub, common) -> None:
    """The ``cube`` subcommand; ``common`` adds the options every subcommand shares."""
    p = sub.add_parser(
        NAME,
        help="chip a datacube (NetCDF/HDF5/Zarr, or a folder of dated GeoTIFFs) into windows over time, y and x",
        description="Chip the variables of a datacube over (time, y, x) into windows of --patch cells per dimension "
        "(the cube's own dimension names); each value is {variable: array(T, H, W)} as stored (no masking, no "
        "scaling, no resampling). manifest.json records dims, time axis and calendar, CRS, transform and per-band "
        "statistics over valid cells; keys.index each window's time, row and col offsets.",
        epilog=f"examples:\n  {EXAMPLE}\n  python -m rico_torch.encode cube --source stack/ --time-from-name "
        "'(?P<date>\\d{8})' --target-dir encoded-stack --patch time=4,y=128,x=128",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--source", required=True, type=Path, metavar="PATH",
                   help="a NetCDF/HDF5 file, a Zarr store, or a folder of GeoTIFFs on one grid (one per time step)")
    p.add_argument("--patch", required=True, type=parse_sizes, metavar="DIM=N,...",
                   help="window size per dimension, e.g. time=12,lat=32,lon=32 (time defaults to 1)")
    p.add_argument("--stride", type=parse_sizes, metavar="DIM=N,...", help="window step per dimension (default: the patch)")
    p.add_argument("--edge", type=parse_edge, default="shift", metavar="RULE",
                   help="the last windows of each dimension: shift inward (default), pad with the fill value, or drop; "
                   "one rule, or per dimension (time=drop,lat=shift,lon=shift)")
    p.add_argument("--vars", nargs="+", metavar="VAR",
                   help="variables (NetCDF/Zarr) or bands (GeoTIFF) to store, in this order (default: all over the "
                   "cube's dims, in the file's order; a Zarr store's by name)")
    p.add_argument("--dims", type=parse_names, metavar="time=T,y=Y,x=X",
                   help="which dimensions are time, y and x (default: found from CF attributes axis, standard_name, units)")
    p.add_argument("--time-from-name", metavar="REGEX",
                   help="a GeoTIFF's date from its file name: a regex with a group named date (default: the TIFF "
                   "DateTime tag)")
    p.add_argument("--min-valid", type=float, default=1, metavar="N",
                   help="skip windows with fewer valid cells (not NaN, not _FillValue/missing_value/nodata; below 1: a "
                   "fraction of the window); default 1")
    common(p)
    p.add_argument("--overwrite", action="store_true", help="replace an LMDB already in the target")
    p.add_argument("--shard", type=parse_shard, metavar="I/N", help="write only shard I of N (crc32(key) %% N == I)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip windows that cannot be read (listed in the manifest) instead of stopping")
    p.set_defaults(dataset=NAME)


def run(args: argparse.Namespace) -> EncodeResult:
    return encode_cube(args.source, args.target_dir, args.patch, args.stride, edge=args.edge, variables=args.vars,
                       dims=args.dims, time_from_name=args.time_from_name, min_valid=args.min_valid,
                       num_workers=args.num_workers, overwrite=args.overwrite, skip_invalid=args.skip_invalid,
                       quiet=args.quiet, shard=args.shard)
