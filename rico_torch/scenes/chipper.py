"""Chipping scenes into the patch LMDB through the shared writer.

Each scene is one source of an ad-hoc :class:`~rico_torch.catalog.Dataset` named ``scenes``;
each window is a :class:`~rico_torch.encode.discover.Patch` whose reader is a
:class:`~rico_torch.scenes.discover.SceneWindow`. So the writer's guarantees hold unchanged:
deterministic ``data.mdb`` across worker counts, resume after a kill, ``--shard``,
``--skip-invalid``, ``verify``. :class:`SceneManifest` adds the scenes' georeference, each
key's window (offsets in ``keys.index``; its transform is derived from the scene's), and
per-band statistics over valid pixels, gathered from the values as they are written.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..catalog import Band, Dataset, Source
from ..encode.discover import Patch, SourcePatches, in_shard
from ..encode.options import parse_shard
from ..encode.writer import EncodeResult, encode_dataset
from ..format import load_value
from .discover import EDGES, Scene, SceneWindow, check_options, check_sizes, close_rasters, find_scenes, offsets

NAME = "scenes"
EXAMPLE = "python -m rico_torch.encode scenes --dataset-dir scenes/ --target-dir encoded-scenes --patch-size 120"


@dataclass(frozen=True)
class ChipOptions:
    patch_size: int
    stride: int
    edge: str = "shift"
    min_valid: int = 1
    bands: tuple[str, ...] | None = None

    def identity(self) -> str:
        return json.dumps([self.patch_size, self.stride, self.edge, self.min_valid, self.bands])


def key_of(scene: Scene, row: int, col: int) -> str:
    return f"{scene.name}_{row}_{col}"


def plan(scenes: Sequence[Scene], options: ChipOptions,
         shard: tuple[int, int] | None = None) -> tuple[Dataset, list[SourcePatches]]:
    """The ad-hoc dataset (one source per scene) and every window as a patch; with ``shard`` only
    the windows of that shard (``select_shard``'s rule), so a shard job holds only its share."""
    sources, discovered = [], []
    for scene in scenes:
        check_sizes(scene, options.patch_size, options.stride, options.edge)
        names = scene.band_names + (("mask",) if scene.labels is not None else ())
        source = Source(scene.name, "--dataset-dir", re.escape(Path(scene.path).name), Path(scene.path).is_dir(),
                        tuple(Band(n) for n in names), scene.bands[0].dtype, noun=f"windows of {scene.name}")
        path = Path(scene.path)
        rows, cols = (offsets(n, options.patch_size, options.stride, options.edge) for n in (scene.height, scene.width))
        # one pass, no list of every window between: a million windows are ~250 MB of patches already
        patches = [Patch(key, path, reader=SceneWindow(scene, r, c, options.patch_size, options.min_valid))
                   for r in rows for c in cols for key in (key_of(scene, r, c),)
                   if shard is None or in_shard(key, *shard)]
        sources.append(source)
        discovered.append(SourcePatches(source, Path(scene.path), patches))
    dataset = Dataset(NAME, "Scenes", tuple(sources), description="windows of GeoTIFF scenes", example=EXAMPLE,
                      datamodule="rico_torch.data.GeoPatchDataModule", config="configs/scenes.yaml")
    return dataset, discovered


class _Moments:
    """Count, mean, M2 (Chan et al.'s parallel update), min and max of a band's valid pixels."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf

    def add(self, values: np.ndarray) -> None:
        n = int(values.size)
        if n == 0:
            return
        values = values.astype(np.float64, copy=False)
        mean = float(values.mean())
        m2 = float(((values - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.min, self.max = min(self.min, float(values.min())), max(self.max, float(values.max()))

    def summary(self) -> dict:
        if self.count == 0:
            return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
        return {"count": self.count, "mean": self.mean, "std": math.sqrt(self.m2 / self.count),
                "min": self.min, "max": self.max}


class SceneManifest:
    """The :class:`~rico_torch.manifest.Extension` of a chip run."""

    def __init__(self, scenes: Sequence[Scene], discovered: list[SourcePatches], options: ChipOptions) -> None:
        self.scenes = {s.name: s for s in scenes}
        self.options = options
        self.identity = options.identity()
        # every window's key and offsets, as arrays filled without a list between (a dict of a
        # million windows costs ~200 MB)
        count = sum(len(sp.patches) for sp in discovered)
        width = max((len(p.key.encode()) for sp in discovered for p in sp.patches), default=1)
        self.windows = np.fromiter((p.key.encode() for sp in discovered for p in sp.patches), f"S{width}", count)
        self.offsets = np.fromiter((v for sp in discovered for p in sp.patches for v in (p.reader.row, p.reader.col)),
                                   "<i4", 2 * count).reshape(-1, 2)
        self.nodata = {s.name: {b.name: b.nodata for b in s.bands} for s in scenes}
        self.moments: dict[str, _Moments] = {}

    def observe(self, source: str, key: str, value: bytes) -> None:
        nodata = self.nodata.get(source, {})
        for band, array in load_value(value, key).items():
            if band not in nodata:  # the label mask
                continue
            fill = nodata[band]
            if fill is None:
                valid = array.ravel()
            elif math.isnan(fill):
                valid = array[~np.isnan(array)]
            else:
                valid = array[array != np.array(fill).astype(array.dtype)]
            self.moments.setdefault(band, _Moments()).add(valid)

    def manifest(self, written: np.ndarray) -> dict:
        size = self.options.patch_size
        return {
            "chip": {"patch_size": size, "stride": self.options.stride, "edge": self.options.edge,
                     "min_valid": self.options.min_valid,
                     "bands": list(self.options.bands) if self.options.bands else None},
            "scenes": {name: scene.info() for name, scene in self.scenes.items()},
            "statistics": {band: m.summary() for band, m in sorted(self.moments.items())},
            "skipped_nodata": len(self.windows) - len(written),
        }

    def columns(self, written: np.ndarray) -> dict[str, np.ndarray]:
        """Each written window's offsets in its scene (the row's source); its transform is derived
        from the scene's (:func:`rico_torch.manifest.window_transform`)."""
        order = np.argsort(self.windows)
        at = order[np.searchsorted(self.windows, written, sorter=order)]
        return {"row": self.offsets[at, 0].copy(), "col": self.offsets[at, 1].copy()}


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
    num_workers: int = 0,
    overwrite: bool = False,
    skip_invalid: bool = False,
    quiet: bool = True,
    shard: tuple[int, int] | None = None,
) -> EncodeResult:
    """Chip every scene in ``dataset_dir`` into the LMDB at ``target_dir`` (see the module doc).

    ``min_valid``: the fewest valid finest-grid pixels a kept window has; a value below 1 is a
    fraction of the window's pixels.
    """
    stride = patch_size if stride is None else stride
    if 0 < min_valid < 1:
        min_valid = math.ceil(min_valid * patch_size * patch_size)
    min_valid = int(min_valid)
    check_options(patch_size, stride, edge, min_valid)
    options = ChipOptions(patch_size, stride, edge, min_valid, tuple(bands) if bands else None)
    try:
        scenes = find_scenes(Path(dataset_dir), options.bands, None if labels is None else Path(labels))
        dataset, discovered = plan(scenes, options, shard)
    finally:
        close_rasters()
    extension = SceneManifest(scenes, discovered, options)
    try:
        return encode_dataset(dataset, discovered, Path(target_dir), num_workers=num_workers, overwrite=overwrite,
                              skip_invalid=skip_invalid, quiet=quiet,
                              sources_info={s.name: str(Path(s.path).resolve()) for s in scenes}, shard=shard,
                              extension=extension)
    finally:
        close_rasters()


def verify_scenes(target_dir: str | Path, dataset_dir: str | Path | None = None, num_workers: int = 0,
                  quiet: bool = True):
    """``verify`` of a chipped LMDB; with ``dataset_dir``, every window is read again from the
    scenes (with the options and label rasters the manifest records) and compared."""
    from ..encode.verify import verify
    from ..encode.writer import read_manifest
    from .discover import attach_labels

    target = Path(target_dir)
    if dataset_dir is None:
        return verify(target, num_workers=num_workers, quiet=quiet)
    manifest = read_manifest(target) or {}
    chip_options = manifest.get("chip", {})
    options = ChipOptions(chip_options["patch_size"], chip_options["stride"], chip_options["edge"],
                          chip_options["min_valid"], tuple(chip_options["bands"]) if chip_options.get("bands") else None)
    try:
        scenes = [s for s in find_scenes(Path(dataset_dir), options.bands) if s.name in manifest.get("scenes", {})]
        scenes = [attach_labels(s, Path(manifest["scenes"][s.name]["labels"])) if manifest["scenes"][s.name].get("labels")
                  else s for s in scenes]
        _, discovered = plan(scenes, options)
    finally:
        close_rasters()
    report = verify(target, {s.name: Path(s.path) for s in scenes}, num_workers=num_workers, quiet=quiet,
                    dataset=NAME, discovered=discovered)
    found = {s.name for s in scenes}
    report.problems.extend(f"{name}: scene in {target / 'manifest.json'} is not in {dataset_dir}"
                           for name in manifest.get("scenes", {}) if name not in found)
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
                   help="skip windows with fewer valid pixels (a value below 1: a fraction of the window); "
                   "default 1")
    p.add_argument("--labels", type=Path, metavar="L",
                   help="label raster on the finest grid (a file, or a folder of <scene name>.tif), stored as 'mask'")
    common(p)
    p.add_argument("--overwrite", action="store_true", help="replace an LMDB already in the target")
    p.add_argument("--shard", type=parse_shard, metavar="I/N", help="write only shard I of N (crc32(key) %% N == I)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip windows that cannot be read (listed in the manifest) instead of stopping")
    p.set_defaults(dataset=NAME)


def run(args: argparse.Namespace) -> EncodeResult:
    return chip(args.dataset_dir, args.target_dir, args.patch_size, args.stride, bands=args.bands, edge=args.edge,
                min_valid=args.min_valid, labels=args.labels, num_workers=args.num_workers,
                overwrite=args.overwrite, skip_invalid=args.skip_invalid, quiet=args.quiet, shard=args.shard)
