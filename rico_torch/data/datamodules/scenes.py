"""GeoPatchDataModule: train on windows chipped from your own scenes, predict whole scenes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ...errors import ConfigError, DatasetNotFoundError
from ...scenes.statistics import merge_entries, pool
from ...scenes.chipper import unlabelled_scenes
from ..dataset import LMDBPatchDataset
from ..store import Store
from .base import SPLITS, LMDBDataModule, LoaderKind

CHIP_HINT = "`python -m rico_torch.encode scenes --dataset-dir <scenes> --target-dir {path} --patch-size 256`"


class GeoPatchDataset(LMDBPatchDataset):
    """LMDBPatchDataset whose samples also carry ``bounds`` and ``crs`` (TorchGeo's keys).

    ``bounds``: float64 ``(left, bottom, right, top)`` of the window in the scene's CRS
    (rasterio's order); ``crs``: the scene's CRS as WKT.
    """

    def __init__(self, *args, geo: dict[str, tuple[tuple[float, ...], str]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.geo = geo

    def fields(self, indices) -> dict[str, Any]:
        out = super().fields(indices)
        out["bounds"] = torch.tensor([self.geo[k][0] for k in out["key"]], dtype=torch.float64)
        out["crs"] = [self.geo[k][1] for k in out["key"]]
        return out


def window_bounds(window: list[int], transform: list[float]) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a window from its own transform (north-up grids)."""
    _, _, h, w = window
    a, _, c, _, e, f = transform
    xs, ys = (c, c + a * w), (f, f + e * h)
    return min(xs), min(ys), max(xs), max(ys)


class GeoPatchDataModule(LMDBDataModule):
    """Windows of scenes chipped with ``python -m rico_torch.encode scenes``.

    Normalisation comes from the per-band statistics the chipper saved in ``manifest.json``
    (over valid pixels). The label raster's windows (band ``mask``) are the segmentation
    target where the scenes have one. Splits never share pixels:

    * ``block`` (default): each scene is cut into ``block_size`` squares dealt to train/val/test
      at random (seeded); a window touching blocks of two splits is left out;
    * ``scene``: whole scenes (``val_scenes``/``test_scenes``, or dealt at random);
    * ``random``: windows dealt at random, only when asked (overlapping windows leak pixels).

    ``predict`` reads every window of ``predict_scenes`` (default: ``scenes``), for
    :class:`rico_torch.scenes.callback.GeoTIFFPredictionWriter` to stitch into GeoTIFFs.

    Args:
        lmdb_path: the chipped LMDB (or its shard directories).
        scenes: the scenes to train, validate and test on; ``None``: all. Only the scenes in
            use (these and ``predict_scenes``) must have the bands, so one LMDB may hold scenes
            with different bands.
        bands: bands in this order; ``None``: those every scene in use has, in the first one's order.
        split, val_fraction, test_fraction, val_scenes, test_scenes, block_size: see above;
            ``block_size`` counts finest-grid pixels (default: 4 patch sizes).
        predict_scenes: scenes to predict; ``None``: ``scenes``.
        mask: use band ``mask`` as the target (when the scenes were chipped with ``--labels``).
        ignore_index: what label pixels equal to the chipper's label nodata (``--label-nodata``,
            or the label rasters' own nodata; pixels ``--edge pad`` added) become in the batch's
            ``mask``: the models' ``ignore_index`` (torch's default -100), so loss and metrics
            leave them out.
        size: output size; ``None``: the chip's patch size (its finest grid), so that a window's
            prediction covers the window whatever bands are selected (coarse bands are upsampled).
        batch_size, num_workers, pin_memory, mean, std, flips, native, interpolation,
            readahead, seed, loader: as :class:`~rico_torch.data.LMDBDataModule`.
    """

    name = "scenes"

    def __init__(
        self,
        lmdb_path: str | list[str],
        bands: list[str] | None = None,
        scenes: list[str] | None = None,
        split: Literal["block", "scene", "random"] = "block",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        val_scenes: list[str] | None = None,
        test_scenes: list[str] | None = None,
        block_size: int | None = None,
        predict_scenes: list[str] | None = None,
        mask: bool = True,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        flips: bool = False,
        native: bool | Literal["auto"] = "auto",
        size: int | None = None,
        interpolation: str = "nearest",
        readahead: bool = False,
        seed: int = 0,
        ignore_index: int = -100,
        loader: LoaderKind = "patch",
    ) -> None:
        paths = [Path(p) for p in (lmdb_path if isinstance(lmdb_path, (list, tuple)) else [lmdb_path])]
        manifest = self._scene_manifest(paths)
        stored = manifest["scenes"]
        for name in (scenes or []) + (val_scenes or []) + (test_scenes or []) + (predict_scenes or []):
            if name not in stored:
                raise ConfigError(f"scene {name!r} is not in {paths[0]}; its scenes: {', '.join(stored)}")
        used = list(scenes or stored)
        for name in (val_scenes or []) + (test_scenes or []):
            if name not in used:
                raise ConfigError(f"scene {name!r} of val_scenes/test_scenes is not one of scenes: {', '.join(used)}")
        in_use = {n: stored[n] for n in dict.fromkeys(used + list(predict_scenes or []))}  # the bands must be here
        if bands is None:
            first = list(next(iter(in_use.values()))["bands"])
            bands = [b for b in first if all(b in s["bands"] for s in in_use.values())]
            if not bands:
                raise ConfigError(f"{paths[0]}: its scenes ({', '.join(in_use)}) share no band; name the bands "
                                  "(data.init_args.bands), or pick scenes (data.init_args.scenes)")
        super().__init__(lmdb_path, list(bands), batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, mean=mean, std=std, flips=flips, native=native, size=size,
                         interpolation=interpolation, readahead=readahead, seed=seed, loader=loader)
        self._manifest = manifest
        for band in self.bands:
            lacking = [n for n, s in in_use.items() if band not in s["bands"]]
            if lacking:
                raise ConfigError(f"band {band!r} is not in scene {lacking[0]!r} of {self.lmdb_path}; its bands: "
                                  f"{', '.join(stored[lacking[0]]['bands'])}; pick the scenes that have it "
                                  "(data.init_args.scenes)")
        if split not in ("block", "scene", "random"):
            raise ConfigError(f"split={split!r}: one of block, scene, random")
        for fraction in (val_fraction, test_fraction):
            if not 0 <= fraction < 1 or val_fraction + test_fraction >= 1:
                raise ConfigError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must leave "
                                  "some windows for training")
        self.scenes = used
        self.split, self.val_fraction, self.test_fraction = split, val_fraction, test_fraction
        self.val_scenes, self.test_scenes, self.predict_scenes = val_scenes, test_scenes, predict_scenes
        self.block_size = block_size or 4 * self.patch_size
        self.mask = mask
        self.use_mask = mask and not self.unlabelled()
        self.ignore_index = ignore_index
        self._splits: dict[str, np.ndarray] | None = None

    @property
    def patch_size(self) -> int:
        """The chip's window size in finest-grid pixels (the manifest's)."""
        return self.manifest()["chip"]["patch_size"]

    @property
    def output_size(self) -> int:
        """``size``, else the chip's finest grid: a window's prediction covers the window."""
        return self.size if self.size is not None else self.patch_size

    def unlabelled(self) -> list[str]:
        """The scenes in use (train/val/test) chipped without labels."""
        return [n for n in unlabelled_scenes(self.manifest()) if n in self.scenes]

    @staticmethod
    def _scene_manifest(paths: list[Path]) -> dict:
        merged: dict = {}
        for path in paths:
            if not (path / "data.mdb").exists():
                raise DatasetNotFoundError(f"{path}: no chipped scenes here (data.mdb missing); create it with "
                                           + CHIP_HINT.format(path=path))
            manifest = Store(path).manifest()
            if not manifest or "scenes" not in manifest:
                raise ConfigError(f"{path}: not an LMDB of chipped scenes (manifest.json has no scenes); "
                                  f"chip scenes with {CHIP_HINT.format(path=path)}")
            if not merged:
                merged = {**manifest, "scenes": dict(manifest["scenes"]), "windows": dict(manifest["windows"])}
            else:  # another shard: the same scenes, other windows; statistics merged exactly
                for name, scene in manifest["scenes"].items():
                    if name in merged["scenes"] and "statistics" in scene:
                        scene = {**scene, "statistics": merge_entries(merged["scenes"][name].get("statistics", {}),
                                                                      scene["statistics"])}
                    merged["scenes"][name] = scene
                merged["windows"].update(manifest["windows"])
        return merged

    def encode_hint(self, path: Path) -> str:
        return CHIP_HINT.format(path=path)

    # --- splits -------------------------------------------------------------------------

    def _keys(self, scenes: list[str] | None = None) -> list[str]:
        """Every stored window of ``scenes`` (default: those in use), scene by scene, row by row."""
        windows, used = self._manifest["windows"], set(scenes or self.scenes)
        return sorted((k for k in windows if windows[k]["scene"] in used),
                      key=lambda k: (windows[k]["scene"], windows[k]["window"][:2]))

    def _deal(self, items: list, rng: np.random.Generator) -> dict:
        """item -> split, at random with the configured fractions."""
        order = rng.permutation(len(items))
        n_val = int(round(len(items) * self.val_fraction))
        n_test = int(round(len(items) * self.test_fraction))
        split_of = {}
        for rank, i in enumerate(order):
            split_of[items[i]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
        return split_of

    def splits(self) -> dict[str, np.ndarray]:
        """The keys of train, val and test (computed once)."""
        if self._splits is not None:
            return self._splits
        windows, keys = self._manifest["windows"], self._keys()
        rng = np.random.default_rng(self.seed)
        parts: dict[str, list[str]] = {s: [] for s in SPLITS}
        if self.split == "random":
            split_of = self._deal(keys, rng)
            for key in keys:
                parts[split_of[key]].append(key)
        elif self.split == "scene":
            names = sorted(self.scenes)
            if self.val_scenes is not None or self.test_scenes is not None:
                split_of = {n: "val" if n in (self.val_scenes or []) else "test" if n in (self.test_scenes or [])
                            else "train" for n in names}
            else:
                split_of = self._deal(names, rng)
            for key in keys:
                parts[split_of[windows[key]["scene"]]].append(key)
        else:
            b = self.block_size
            blocks = sorted({(windows[k]["scene"], r // b, c // b) for k in keys
                             for r, c in self._corners(windows[k]["window"])})
            split_of = self._deal(blocks, rng)
            for key in keys:
                scene = windows[key]["scene"]
                touched = {split_of[(scene, r // b, c // b)] for r, c in self._corners(windows[key]["window"])}
                if len(touched) == 1:  # else it would share pixels with another split
                    parts[touched.pop()].append(key)
        self._splits = {s: np.array(v, dtype=np.bytes_) for s, v in parts.items()}
        return self._splits

    @staticmethod
    def _corners(window: list[int]) -> list[tuple[int, int]]:
        row, col, h, w = window
        return [(max(row, 0), max(col, 0)), (max(row, 0), col + w - 1), (row + h - 1, max(col, 0)),
                (row + h - 1, col + w - 1)]

    def predict_keys(self) -> np.ndarray:
        return np.array(self._keys(self.predict_scenes), dtype=np.bytes_)

    def split_items(self, split: str):
        keys = self.predict_keys() if split == "predict" else self.splits()[split]
        return keys, None

    # --- datasets -----------------------------------------------------------------------

    def dataset_kwargs(self) -> dict[str, Any]:
        return {"mask_band": "mask"} if self.use_mask else {}

    def make_dataset(self, split: str) -> LMDBPatchDataset:
        items, _ = self.split_items(split)
        if len(items) == 0:
            raise ConfigError(f"{self.lmdb_path}: the {split} split is empty (split={self.split!r}); give more "
                              "scenes, a smaller block_size, or other fractions")
        scenes, windows = self._manifest["scenes"], self._manifest["windows"]
        geo = {k.decode(): (window_bounds(windows[k.decode()]["window"], windows[k.decode()]["transform"]),
                            scenes[windows[k.decode()]["scene"]]["crs"]) for k in items.tolist()}
        return GeoPatchDataset(self.lmdb_paths, self.bands, keys=items, size=self.output_size,
                               interpolation=self.interpolation, align_corners=self.align_corners,
                               native=self.loads_native, readahead=self.readahead, geo=geo, **self.dataset_kwargs())

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std per band from the chipper's statistics: each scene's moments over its
        valid pixels, merged exactly over the scenes (and shards) read.

        Raises:
            ConfigError: a band whose scenes are unrelated (``B1`` of an RGB image and of a
                hillshade), which one mean and std cannot describe; give ``mean`` and ``std``.
        """
        scenes = {n: self._manifest["scenes"][n] for n in self.scenes}  # those trained on, not every stored one
        if not all("statistics" in s for s in scenes.values()):  # chipped before per-scene statistics
            stats = self._manifest.get("statistics", {})
        else:
            stats, refused = pool(scenes, self.bands)
            for band in self.bands:
                if band in refused:
                    raise ConfigError(f"{self.lmdb_path}: cannot normalise {refused[band]}; give mean and std "
                                      "(data.init_args.mean/std) or chip unrelated scenes into separate targets")
        if not all(stats.get(b, {}).get("count") for b in self.bands):
            return super().statistics()
        mean = torch.tensor([stats[b]["mean"] for b in self.bands], dtype=torch.float32)
        std = torch.tensor([max(stats[b]["std"], 1e-6) for b in self.bands], dtype=torch.float32)
        return mean, std

    @property
    def label_nodata(self) -> float | None:
        """The label value that means "no label" (the chipper's ``--label-nodata``), if any."""
        return self._manifest.get("chip", {}).get("label_nodata")

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if "mask" in batch and self.label_nodata is not None:  # unlabelled pixels: left out of loss and metrics
            batch["mask"] = batch["mask"].masked_fill(batch["mask"] == self.label_nodata, self.ignore_index)
        return batch

    def setup(self, stage: str | None = None) -> None:
        if stage != "predict":
            self._check_targets()
            return super().setup(stage)
        if "predict" not in self.datasets:
            self.check_lmdb()
            self.datasets["predict"] = self.make_dataset("predict")
        if self.loads_native and self.assembler is None:
            self.assembler = self.datasets["predict"].native_assembler()
        if self.mean is None:
            self.mean, self.std = self.statistics()

    def _check_targets(self) -> None:
        """Training and testing need the ``mask`` target on every window: say so up front rather
        than fail in the model's first step."""
        unlabelled = self.unlabelled()
        if self.mask and unlabelled:
            some = f"scene {unlabelled[0]!r}" if len(unlabelled) == 1 else f"{len(unlabelled)} scenes ({', '.join(unlabelled[:3])}{', ...' * (len(unlabelled) > 3)})"
            raise ConfigError(f"{self.lmdb_path}: {some} chipped without --labels: no mask to train or test on; "
                              "chip with `--labels <label rasters>`, or set data.init_args.mask false for a model "
                              "that needs no target")

    def predict_dataloader(self):
        return self._loader("predict", shuffle=False, hook="predict")
