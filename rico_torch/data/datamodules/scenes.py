"""GeoPatchDataModule: train on windows chipped from your own scenes, predict whole scenes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ...errors import ConfigError
from ...manifest import Manifest, merge, window_bounds
from ...scenes.chipper import unlabelled_scenes
from ...scenes.statistics import pool
from ..dataset import LMDBPatchDataset
from .base import SPLITS, LMDBDataModule, LoaderKind, block_split, count_left_out, dealt, windows_manifest

CHIP_HINT = "`python -m rico_torch.encode scenes --dataset-dir <scenes> --target-dir {path} --patch-size 256`"


class GeoPatchDataset(LMDBPatchDataset):
    """LMDBPatchDataset whose samples also carry ``bounds`` and ``crs`` (TorchGeo's keys).

    ``bounds``: float64 ``(left, bottom, right, top)`` of the window in the scene's CRS
    (rasterio's order); ``crs``: the scene's CRS as WKT.
    """

    def __init__(self, *args, windows: np.ndarray, window_size: int, scenes: list[dict], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # per item its scene index and window offsets (N x 3 int32, no per-key objects); per scene
        # its transform and CRS: bounds are derived per batch
        self.windows, self.window_size = torch.as_tensor(windows), window_size
        self.scene_transforms = [list(s["transform"]) for s in scenes]
        self.crs = [s["crs"] for s in scenes]

    def fields(self, indices) -> dict[str, Any]:
        out = super().fields(indices)
        scene, row, col = self.windows[list(indices)].numpy().T
        bounds = np.zeros((len(scene), 4), np.float64)
        for i in np.unique(scene).tolist():
            mine = scene == i
            bounds[mine] = window_bounds(row[mine], col[mine], self.window_size, self.scene_transforms[i])
        out["bounds"] = torch.from_numpy(bounds)
        out["crs"] = [self.crs[i] for i in scene.tolist()]
        return out


class GeoPatchDataModule(LMDBDataModule):
    """Windows of scenes chipped with ``python -m rico_torch.encode scenes``.

    Normalisation comes from the per-band statistics the chipper saved in ``manifest.json``
    (over valid pixels). The label raster's windows (band ``mask``) are the segmentation
    target where the scenes have one. Splits never share pixels:

    * ``block`` (default): each scene is cut into ``block_size`` squares dealt to train/val/test
      at random (seeded); a window touching blocks of two splits is left out (counted in
      ``left_out`` and logged: at WARNING where it is a quarter of the windows or more);
    * ``scene``: whole scenes (``val_scenes``/``test_scenes``, or dealt at random);
    * ``random``: windows dealt at random, only when asked (overlapping windows leak pixels).

    ``predict`` reads every window of ``predict_scenes`` (default: ``scenes``), for
    :class:`rico_torch.scenes.callback.GeoTIFFPredictionWriter` to stitch into GeoTIFFs.

    Args:
        lmdb_path: the chipped LMDB (or its shard directories).
        source, patch_size, stride, edge, min_valid, labels, label_nodata: instead of ``lmdb_path``,
            read the same windows from the scenes on the fly (``encode scenes``' ``--dataset-dir``,
            ``--patch-size`` ...; :class:`~rico_torch.data.ScenePatchDataset`); every window is read
            once when the module is made (which windows exist, and the statistics).
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
        lmdb_path: str | list[str] | None = None,
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
        source: str | None = None,
        patch_size: int | None = None,
        stride: int | None = None,
        edge: Literal["shift", "pad", "drop"] = "shift",
        min_valid: float = 1,
        labels: str | None = None,
        label_nodata: float | None = None,
    ) -> None:
        self.store = None
        if (lmdb_path is None) == (source is None):
            raise ConfigError("give lmdb_path (chipped scenes) or source (scenes read on the fly), not both or neither")
        if source is not None:
            if patch_size is None:
                raise ConfigError("source: give patch_size (the window size, as encode scenes' --patch-size)")
            from ..live import scene_store

            self.store = scene_store(source, patch_size, stride, edge, min_valid, labels=labels,
                                     label_nodata=label_nodata, statistics=True, readahead=readahead or "auto")
            self._path_manifests = [self.store.manifest()]
        else:
            paths = [Path(p) for p in (lmdb_path if isinstance(lmdb_path, (list, tuple)) else [lmdb_path])]
            self._path_manifests = self._scene_manifests(paths)
        manifest = merge(self._path_manifests)
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
        super().__init__(lmdb_path or source, list(bands), batch_size=batch_size, num_workers=num_workers,
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
        self.left_out = 0  # windows the block split left out (they straddle blocks of two splits)
        self._windows: tuple | None = None

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
    def _scene_manifests(paths: list[Path]) -> list[Manifest]:
        return [windows_manifest(path, "scenes", "chipped scenes", "an LMDB of chipped scenes", "chip scenes with",
                                 CHIP_HINT.format(path=path)) for path in paths]

    def encode_hint(self, path: Path) -> str:
        return CHIP_HINT.format(path=path)

    def check_lmdb(self) -> None:
        if self.store is None:  # read on the fly: nothing encoded to check
            super().check_lmdb()

    # --- splits -------------------------------------------------------------------------

    def _table(self) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray, np.ndarray]:
        """Every stored window scene by scene (names sorted), row by row: (keys, scene names,
        scene index, row, col), arrays from the sidecar (computed once)."""
        if self._windows is None:
            keys, names, scene, rows, cols = self._manifest.windows.table()
            rank = np.argsort(np.argsort(np.array(names, dtype=object)))  # a scene's place by name
            order = np.lexsort((cols, rows, rank[scene] if len(names) else scene))
            ordered = sorted(names)
            self._windows = (keys[order], ordered, rank[scene[order]].astype(np.int32) if len(names) else scene,
                             rows[order], cols[order])
        return self._windows

    def _dealt(self, count: int, rng: np.random.Generator) -> np.ndarray:
        return dealt(count, self.val_fraction, self.test_fraction, rng)

    def splits(self) -> dict[str, np.ndarray]:
        """The keys of train, val and test."""
        keys = self._table()[0]
        return {s: keys[rows] for s, rows in self.split_rows().items()}

    def split_rows(self) -> dict[str, np.ndarray]:
        """Each of train, val and test as an index array into :meth:`_table`, windows of the scenes in
        use only (computed once)."""
        if self._splits is not None:
            return self._splits
        _, names, all_scenes, all_rows, all_cols = self._table()
        used = [i for i, n in enumerate(names) if n in self.scenes]
        chosen = np.flatnonzero(np.isin(all_scenes, used)) if len(used) < len(names) else None
        scene, rows, cols = ((all_scenes, all_rows, all_cols) if chosen is None
                             else (all_scenes[chosen], all_rows[chosen], all_cols[chosen]))
        rng = np.random.default_rng(self.seed)
        if self.split == "random":
            split = self._dealt(len(scene), rng)
        elif self.split == "scene":
            of_scene = np.full(len(names), -1, np.int8)  # scenes not in use: no split
            if self.val_scenes is not None or self.test_scenes is not None:
                for i in used:
                    of_scene[i] = SPLITS.index("val" if names[i] in (self.val_scenes or []) else
                                               "test" if names[i] in (self.test_scenes or []) else "train")
            else:
                of_scene[used] = self._dealt(len(used), rng)
            split = of_scene[scene]
        else:
            size = self.patch_size
            split = block_split(scene, rows, cols, (size, size), self.block_size, lambda n: self._dealt(n, rng))
            self.left_out = count_left_out(self.lmdb_path, split, self.block_size)
        self._splits = {s: np.flatnonzero(split == i) for i, s in enumerate(SPLITS)}
        if chosen is not None:
            self._splits = {s: chosen[r] for s, r in self._splits.items()}
        return self._splits

    def predict_rows(self) -> np.ndarray:
        """The windows of ``predict_scenes`` (None: the scenes in use), as an index array into
        :meth:`_table`."""
        _, names, scene, _, _ = self._table()
        wanted = set(self.predict_scenes or self.scenes)
        return np.flatnonzero(np.isin(scene, [i for i, n in enumerate(names) if n in wanted]))

    def predict_keys(self) -> np.ndarray:
        return self._table()[0][self.predict_rows()]

    def split_items(self, split: str):
        rows = self.predict_rows() if split == "predict" else self.split_rows()[split]
        return self._table()[0][rows], None

    # --- datasets -----------------------------------------------------------------------

    def dataset_kwargs(self) -> dict[str, Any]:
        return {"mask_band": "mask"} if self.use_mask else {}

    def make_dataset(self, split: str) -> LMDBPatchDataset:
        rows = self.predict_rows() if split == "predict" else self.split_rows()[split]
        keys, names, scene, row, col = self._table()
        items = keys[rows]
        if len(items) == 0:
            raise ConfigError(f"{self.lmdb_path}: the {split} split is empty (split={self.split!r}); give more "
                              "scenes, a smaller block_size, or other fractions")
        windows = np.stack([scene[rows], row[rows], col[rows]], axis=1).astype(np.int32)
        return GeoPatchDataset(self.store or self.lmdb_paths, self.bands, keys=items, size=self.output_size,
                               interpolation=self.interpolation, align_corners=self.align_corners,
                               native=self.loads_native, readahead=self.readahead, windows=windows,
                               manifests=self._path_manifests,
                               window_size=self.patch_size,
                               scenes=[self._manifest["scenes"][n] for n in names], **self.dataset_kwargs())

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
