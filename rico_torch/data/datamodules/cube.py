"""CubeDataModule: train on windows of a datacube (T x C x H x W), encoded or read on the fly."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ...cube.source import DECODED_CHUNKS_BYTES
from ...errors import ConfigError
from ...manifest import Manifest, merge
from ..dataset import LMDBPatchDataset
from .base import SPLITS, LMDBDataModule, LoaderKind, block_split, count_left_out, dealt, windows_manifest

ENCODE_HINT = "`python -m rico_torch.encode cube --source <cube> --target-dir {path} --patch time=8,y=64,x=64`"
SPLIT_KINDS = ("time", "block", "both")


class CubeDataModule(LMDBDataModule):
    """Windows of a datacube encoded with ``python -m rico_torch.encode cube`` (``lmdb_path``), or
    the same windows read from the cube on the fly (``source`` and the encode's options).

    Batches hold ``image`` B x T x C x H x W, normalised on the device with the encode's
    per-band statistics (over valid cells), ``valid`` (bool, same shape: the cell was neither NaN
    nor a fill/missing value; invalid cells are 0 in ``image``), ``time``, ``bounds``, ``crs``, ``key``.

    Splits never share a cell:

    * ``time`` (default): cut dates ``val_start`` and ``test_start`` (ISO, in the cube's calendar;
      default: the time axis cut at ``1 - val_fraction - test_fraction`` and ``1 - test_fraction``):
      train windows end before ``val_start``, val windows lie in [val_start, test_start), test
      windows start at ``test_start``; a window straddling a cut is left out;
    * ``block``: square blocks of ``block_size`` cells (default 4 patches) dealt at random (seeded)
      to train/val/test in ``val_fraction``/``test_fraction``; a window touching two splits' blocks
      is left out (counted in ``left_out`` and logged: at WARNING where it is a quarter of the
      windows or more);
    * ``both``: a window is in a split only where its time and its block agree.

    ``predict`` reads every window, for :class:`rico_torch.scenes.callback.CubePredictionWriter`.

    Args:
        lmdb_path: the encoded cube (or its shard directories).
        source, patch, stride, edge, variables, dims, time_from_name, min_valid: read on the fly
            instead, with ``encode cube``'s options (``--source``, ``--patch`` ...); statistics are
            then computed from the cube when the module is made (unless mean/std are given).
        chunk_cache: read on the fly: bytes of decoded storage chunks each process keeps
            (:class:`~rico_torch.data.CubePatchDataset`'s; default 256 MB, 0: none).
        bands: variables in this order; ``None``: all, in the encode's order.
        batch_size, num_workers, pin_memory, mean, std, native, readahead, seed, loader: as
            :class:`~rico_torch.data.LMDBDataModule`.
    """

    name = "cube"

    def __init__(
        self,
        lmdb_path: str | list[str] | None = None,
        bands: list[str] | None = None,
        source: str | None = None,
        patch: dict[str, int] | None = None,
        stride: dict[str, int] | None = None,
        edge: str | dict[str, str] = "shift",
        variables: list[str] | None = None,
        dims: dict[str, str] | None = None,
        time_from_name: str | None = None,
        min_valid: float = 1,
        split: Literal["time", "block", "both"] = "time",
        val_start: str | None = None,
        test_start: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        block_size: int | None = None,
        batch_size: int = 16,
        num_workers: int = 2,
        pin_memory: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        native: bool | Literal["auto"] = "auto",
        readahead: bool = False,
        seed: int = 0,
        loader: LoaderKind = "patch",
        chunk_cache: int = DECODED_CHUNKS_BYTES,
    ) -> None:
        if (lmdb_path is None) == (source is None):
            raise ConfigError("give lmdb_path (an encoded cube) or source (a cube read on the fly), not both or neither")
        self.store = None
        if source is not None:
            if patch is None:
                raise ConfigError("source: give patch (the window size per dimension, as encode cube's --patch)")
            from ..live import cube_store

            self.store = cube_store(source, patch, stride, edge, variables, dims, time_from_name, min_valid,
                                    statistics=mean is None, readahead=readahead or "auto", chunk_cache=chunk_cache)
            self._cube_manifest = self.store.manifest()
        else:
            paths = [Path(p) for p in (lmdb_path if isinstance(lmdb_path, (list, tuple)) else [lmdb_path])]
            self._path_manifests = [self._cube_manifest_of(p) for p in paths]
            self._cube_manifest = merge(self._path_manifests)
        cube = self._cube_manifest["cube"]
        super().__init__(lmdb_path if source is None else source, list(bands or cube["bands"]), batch_size=batch_size,
                         num_workers=num_workers, pin_memory=pin_memory, mean=mean, std=std, native=native,
                         readahead=readahead, seed=seed, loader=loader)
        unknown = [b for b in self.bands if b not in cube["bands"]]
        if unknown:
            raise ConfigError(f"unknown band(s) {unknown} of cube {cube['name']}; its variables: {', '.join(cube['bands'])}")
        if split not in SPLIT_KINDS:
            raise ConfigError(f"split={split!r}: one of {', '.join(SPLIT_KINDS)}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ConfigError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must leave some windows "
                              "for training")
        self.split, self.val_fraction, self.test_fraction = split, val_fraction, test_fraction
        self.window = tuple(int(cube["patch"][a]) for a in ("time", "y", "x"))
        self.block_size = block_size or 4 * max(self.window[1:])
        self.val_start, self.test_start = self._cuts(val_start, test_start)
        self._splits: dict[str, np.ndarray] | None = None
        self.left_out = 0  # windows the block split left out (they straddle blocks of two splits)

    @staticmethod
    def _cube_manifest_of(path: Path) -> Manifest:
        return windows_manifest(path, "cube", "encoded cube", "a cube encode", "encode one with",
                                ENCODE_HINT.format(path=path))

    def manifest(self) -> Manifest:
        return self._cube_manifest

    def path_manifests(self) -> list:
        return [None] if self.store is not None else self._path_manifests

    def check_lmdb(self) -> None:
        if self.store is None:
            super().check_lmdb()

    def encode_hint(self, path: Path) -> str:
        return ENCODE_HINT.format(path=path)

    @property
    def num_channels(self) -> int:
        return len(self.bands)

    def example_input(self, size: int = 8) -> torch.Tensor:
        """A zero batch of one window as the model sees it (B x T x C x H x W)."""
        return torch.zeros(1, self.window[0], len(self.bands), size, size)

    # --- splits ---------------------------------------------------------------------------------

    def _cuts(self, val_start: str | None, test_start: str | None) -> tuple[str, str]:
        """The cut dates (ISO strings; compared as strings, so any calendar works)."""
        if self.split == "block":  # none needed: a full aligned stack's windows each hold every date
            return val_start, test_start
        iso = self._cube_manifest["cube"]["time"]["iso"]
        length, steps = len(iso), self.window[0]
        # the last steps go to test, those before to val: each its fraction, and at least one window's steps
        n_test = max(round(length * self.test_fraction), steps) if self.test_fraction else 0
        n_val = max(round(length * self.val_fraction), steps) if self.val_fraction else 0
        if (val_start is None or test_start is None) and length - n_test - n_val < steps:
            raise ConfigError(f"{self.lmdb_path}: {length} time steps hold no train, val and test windows of {steps} "
                              "steps each; give val_start/test_start, or split by block")
        if test_start is None:
            test_start = iso[length - n_test] if n_test else "9999"
        if val_start is None:
            val_start = iso[length - n_test - n_val] if n_val else test_start
        if test_start < val_start:
            raise ConfigError(f"test_start {test_start} is before val_start {val_start}")
        return val_start, test_start

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored window's key and (t, row, col) offsets, in index order."""
        if not hasattr(self, "_table"):
            parts = self._cube_manifest.parts
            keys = np.concatenate([ix.columns["key"] for _, ix in parts])
            offsets = np.concatenate([np.stack([ix.columns[c] for c in ("time", "row", "col")], 1) for _, ix in parts])
            self._table = keys, offsets.astype(np.int64)
        return self._table

    def time_split(self, t: np.ndarray) -> np.ndarray:
        """Each window's split by time (-1: it straddles a cut)."""
        iso = np.array(self._cube_manifest["cube"]["time"]["iso"])
        first, last = iso[t], iso[np.minimum(t + self.window[0], len(iso)) - 1]
        split = np.full(len(t), -1, np.int8)
        split[last < self.val_start] = SPLITS.index("train")
        split[(first >= self.val_start) & (last < self.test_start)] = SPLITS.index("val")
        split[first >= self.test_start] = SPLITS.index("test")
        return split

    def split_rows(self) -> dict[str, np.ndarray]:
        """Train, val and test as index arrays into :meth:`table` (computed once)."""
        if self._splits is None:
            t, rows, cols = self.table()[1].T
            if self.split in ("time", "both"):
                split = self.time_split(t)
            if self.split in ("block", "both"):
                rng = np.random.default_rng(self.seed)
                blocks = block_split(np.zeros(len(t), np.int32), rows, cols, self.window[1:], self.block_size,
                                     lambda n: dealt(n, self.val_fraction, self.test_fraction, rng))
                self.left_out = count_left_out(self.lmdb_path, blocks, self.block_size)
                split = blocks if self.split == "block" else np.where(split == blocks, split, -1)
            self._splits = {s: np.flatnonzero(split == i) for i, s in enumerate(SPLITS)}
        return self._splits

    def splits(self) -> dict[str, np.ndarray]:
        keys = self.table()[0]
        return {s: keys[rows] for s, rows in self.split_rows().items()}

    def split_items(self, split: str):
        keys = self.table()[0]
        return (keys if split == "predict" else keys[self.split_rows()[split]]), None

    def make_dataset(self, split: str) -> LMDBPatchDataset:
        items, _ = self.split_items(split)
        if len(items) == 0:
            raise ConfigError(f"{self.lmdb_path}: the {split} split of the cube is empty (split={self.split!r}, "
                              f"val_start {self.val_start}, test_start {self.test_start}); move the cut dates, give "
                              "other fractions or a smaller block_size")
        return LMDBPatchDataset(self.store or self.lmdb_paths, self.bands, keys=items, native=self.loads_native,
                                readahead=self.readahead, manifests=self.path_manifests() if self.store is None else None)

    def setup(self, stage: str | None = None) -> None:
        if stage != "predict":
            return super().setup(stage)
        if "predict" not in self.datasets:
            self.datasets["predict"] = self.make_dataset("predict")
        if self.loads_native and self.assembler is None:
            self.assembler = self.datasets["predict"].native_assembler()
        if self.mean is None:
            self.mean, self.std = self.statistics()

    def predict_dataloader(self):
        return self._loader("predict", shuffle=False, hook="predict")

    # --- normalisation ----------------------------------------------------------------------------

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std per band from the encode's statistics (valid cells, each counted once)."""
        stats = self._cube_manifest.get("statistics") or {}
        if not all(stats.get(b, {}).get("count") for b in self.bands):
            raise ConfigError(f"{self.lmdb_path}: no statistics for bands {self.bands} (no valid cell); give mean and "
                              "std (data.init_args.mean/std)")
        mean = torch.tensor([stats[b]["mean"] for b in self.bands], dtype=torch.float32)
        std = torch.tensor([max(stats[b]["std"], 1e-6) for b in self.bands], dtype=torch.float32)
        return mean, std

    def invalid_values(self) -> list[list[float]]:
        """Per band, the stored values that mark a cell invalid (besides NaN)."""
        bands = self._cube_manifest["cube"]["bands"]
        return [[float(v) for v in bands[b].get("invalid", []) if v not in ("nan", None)] for b in self.bands]

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        batch = self.assemble(batch)
        image = batch["image"]  # B x T x C x H x W
        valid = torch.isfinite(image)
        for c, values in enumerate(self.invalid_values()):
            for v in values:
                valid[:, :, c] &= image[:, :, c] != torch.tensor(v, dtype=image.dtype)
        mean, std = self.mean.to(image.device), self.std.to(image.device)
        batch["image"] = torch.where(valid, (image - mean[:, None, None]) / std[:, None, None], 0.0)
        batch["valid"] = valid
        return batch
