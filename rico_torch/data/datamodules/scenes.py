"""GeoPatchDataModule: train on windows chipped from your own scenes, predict whole scenes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ...errors import ConfigError, DatasetNotFoundError
from ..dataset import LMDBPatchDataset
from ...manifest import Manifest, merge
from ..store import read_manifest
from .base import SPLITS, LMDBDataModule

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


def window_bounds(rows: np.ndarray, cols: np.ndarray, size: int, transform: list[float]) -> np.ndarray:
    """(left, bottom, right, top) of windows (N x 4) from their offsets and their scene's
    transform (north-up grids)."""
    a, b, c, d, e, f = transform
    left, top = c + a * cols + b * rows, f + d * cols + e * rows
    right, bottom = left + a * size, top + e * size
    return np.stack([np.minimum(left, right), np.minimum(top, bottom), np.maximum(left, right),
                     np.maximum(top, bottom)], axis=1).astype(np.float64)


class GeoPatchDataModule(LMDBDataModule):
    """Windows of scenes chipped with ``python -m rico_torch.encode scenes``.

    Normalisation comes from the per-band statistics the chipper saved in ``manifest.json``
    (over valid pixels). The label raster's windows (band ``mask``) are the segmentation
    target where the scenes have one. Splits never share pixels:

    * ``block`` (default): each scene is cut into ``block_size`` squares dealt to train/val/test
      at random (seeded); a window touching blocks of two splits is left out;
    * ``scene``: whole scenes (``val_scenes``/``test_scenes``, or dealt at random);
    * ``random``: windows dealt at random, only when asked (overlapping windows leak pixels).

    ``predict`` reads every window of ``predict_scenes`` (default: all), for
    :class:`rico_torch.scenes.callback.GeoTIFFPredictionWriter` to stitch into GeoTIFFs.

    Args:
        lmdb_path: the chipped LMDB (or its shard directories).
        bands: bands in this order; ``None``: those every scene has, in the first scene's order.
        split, val_fraction, test_fraction, val_scenes, test_scenes, block_size: see above;
            ``block_size`` counts finest-grid pixels (default: 4 patch sizes).
        predict_scenes: scenes to predict; ``None``: all.
        mask: use band ``mask`` as the target (when the scenes were chipped with ``--labels``).
        batch_size, num_workers, pin_memory, mean, std, flips, native, size, interpolation,
            readahead, seed: as :class:`~rico_torch.data.LMDBDataModule`.
    """

    name = "scenes"

    def __init__(
        self,
        lmdb_path: str | list[str],
        bands: list[str] | None = None,
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
    ) -> None:
        paths = [Path(p) for p in (lmdb_path if isinstance(lmdb_path, (list, tuple)) else [lmdb_path])]
        self._path_manifests = self._scene_manifests(paths)
        manifest = merge(self._path_manifests)
        scenes = manifest["scenes"]
        if bands is None:
            first = list(next(iter(scenes.values()))["bands"])
            bands = [b for b in first if all(b in s["bands"] for s in scenes.values())]
            if not bands:
                raise ConfigError(f"{paths[0]}: its scenes ({', '.join(scenes)}) share no band; name the bands "
                                  "(data.init_args.bands)")
        super().__init__(lmdb_path, list(bands), batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, mean=mean, std=std, flips=flips, native=native, size=size,
                         interpolation=interpolation, readahead=readahead, seed=seed)
        self._manifest = manifest
        for band in self.bands:
            lacking = [n for n, s in scenes.items() if band not in s["bands"]]
            if lacking:
                raise ConfigError(f"band {band!r} is not in scene {lacking[0]!r} of {self.lmdb_path}; its bands: "
                                  f"{', '.join(scenes[lacking[0]]['bands'])}")
        if split not in ("block", "scene", "random"):
            raise ConfigError(f"split={split!r}: one of block, scene, random")
        for fraction in (val_fraction, test_fraction):
            if not 0 <= fraction < 1 or val_fraction + test_fraction >= 1:
                raise ConfigError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must leave "
                                  "some windows for training")
        for name in (val_scenes or []) + (test_scenes or []) + (predict_scenes or []):
            if name not in scenes:
                raise ConfigError(f"scene {name!r} is not in {self.lmdb_path}; its scenes: {', '.join(scenes)}")
        self.split, self.val_fraction, self.test_fraction = split, val_fraction, test_fraction
        self.val_scenes, self.test_scenes, self.predict_scenes = val_scenes, test_scenes, predict_scenes
        self.block_size = block_size or 4 * manifest["chip"]["patch_size"]
        self.use_mask = mask and all(s.get("labels") for s in scenes.values())
        self._splits: dict[str, np.ndarray] | None = None
        self._windows: tuple | None = None

    @staticmethod
    def _scene_manifests(paths: list[Path]) -> list[Manifest]:
        manifests = []
        for path in paths:
            if not (path / "data.mdb").exists():
                raise DatasetNotFoundError(f"{path}: no chipped scenes here (data.mdb missing); create it with "
                                           + CHIP_HINT.format(path=path))
            manifest = read_manifest(path)
            if not manifest or "scenes" not in manifest:
                raise ConfigError(f"{path}: not an LMDB of chipped scenes (manifest.json has no scenes); "
                                  f"chip scenes with {CHIP_HINT.format(path=path)}")
            manifests.append(manifest)
        return manifests

    def encode_hint(self, path: Path) -> str:
        return CHIP_HINT.format(path=path)

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
        order = rng.permutation(count)
        n_val = int(round(count * self.val_fraction))
        n_test = int(round(count * self.test_fraction))
        split = np.zeros(count, np.int8)
        split[order[:n_val]] = SPLITS.index("val")
        split[order[n_val : n_val + n_test]] = SPLITS.index("test")
        return split

    def splits(self) -> dict[str, np.ndarray]:
        """The keys of train, val and test."""
        keys = self._table()[0]
        return {s: keys[rows] for s, rows in self.split_rows().items()}

    def split_rows(self) -> dict[str, np.ndarray]:
        """Each of train, val and test as an index array into :meth:`_table` (computed once)."""
        if self._splits is not None:
            return self._splits
        keys, names, scene, rows, cols = self._table()
        rng = np.random.default_rng(self.seed)
        if self.split == "random":
            split = self._dealt(len(keys), rng)
        elif self.split == "scene":
            if self.val_scenes is not None or self.test_scenes is not None:
                of_scene = np.array([SPLITS.index("val") if n in (self.val_scenes or []) else SPLITS.index("test")
                                     if n in (self.test_scenes or []) else SPLITS.index("train") for n in names],
                                    dtype=np.int8)
            else:
                of_scene = self._dealt(len(names), rng)
            split = of_scene[scene]
        else:
            b, size = self.block_size, int(self._manifest["chip"]["patch_size"])
            span = int(max(rows.max(initial=0), cols.max(initial=0)) + size) // b + 2

            def corner(k: int) -> np.ndarray:  # block of each window's k-th corner, one corner at a time
                r = np.maximum(rows, 0) if k < 2 else rows + size - 1
                c = np.maximum(cols, 0) if k % 2 == 0 else cols + size - 1
                return (scene.astype(np.int64) * span + r // b) * span + c // b

            blocks = np.unique(np.concatenate([np.unique(corner(k)) for k in range(4)]))  # (scene, row, col)
            of_block = self._dealt(len(blocks), rng)
            split = of_block[np.searchsorted(blocks, corner(0))]
            for k in range(1, 4):
                split[of_block[np.searchsorted(blocks, corner(k))] != split] = -1  # shares pixels: left out
        self._splits = {s: np.flatnonzero(split == i) for i, s in enumerate(SPLITS)}
        return self._splits

    def predict_rows(self) -> np.ndarray:
        """The windows of ``predict_scenes`` (all: None), as an index array into :meth:`_table`."""
        _, names, scene, _, _ = self._table()
        wanted = set(self.predict_scenes or names)
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
        return GeoPatchDataset(self.lmdb_paths, self.bands, keys=items, size=self.output_size,
                               interpolation=self.interpolation, align_corners=self.align_corners,
                               native=self.loads_native, readahead=self.readahead, windows=windows,
                               manifests=self._path_manifests,
                               window_size=int(self._manifest["chip"]["patch_size"]),
                               scenes=[self._manifest["scenes"][n] for n in names], **self.dataset_kwargs())

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std per band from the chipper's statistics (valid pixels of every window)."""
        stats = self._manifest.get("statistics", {})
        if not all(stats.get(b, {}).get("count") for b in self.bands):
            return super().statistics()
        mean = torch.tensor([stats[b]["mean"] for b in self.bands], dtype=torch.float32)
        std = torch.tensor([max(stats[b]["std"], 1e-6) for b in self.bands], dtype=torch.float32)
        return mean, std

    def setup(self, stage: str | None = None) -> None:
        if stage != "predict":
            return super().setup(stage)
        if "predict" not in self.datasets:
            self.check_lmdb()
            self.datasets["predict"] = self.make_dataset("predict")
        if self.loads_native and self.assembler is None:
            self.assembler = self.datasets["predict"].native_assembler()
        if self.mean is None:
            self.mean, self.std = self.statistics()

    def predict_dataloader(self):
        return self._loader("predict", shuffle=False, hook="predict")
