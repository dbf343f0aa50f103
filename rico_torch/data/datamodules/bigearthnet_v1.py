"""BigEarthNet v1.0 DataModule: the official train/val/test lists, 19 or 43 classes, S2, S1 or both."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from ...catalog import bigearthnet_v1 as v1
from ...errors import ConfigError, DatasetNotFoundError
from .base import LMDBDataModule, LoaderKind
from .bigearthnet import BigEarthNetDataModule, resolve_bands


class BigEarthNetV1DataModule(BigEarthNetDataModule):
    """BigEarthNet v1.0 multi-label classification on the official lists (BigEarthNet-19 splits).

    Args:
        lmdb_path: LMDB from ``python -m rico_torch.encode bigearthnet-v1 ...`` or ``convert-pickled``
            (labels and S1/S2 pairs come from its ``keys.index``).
        splits: folder with the official ``train.csv``, ``val.csv``, ``test.csv`` (or ``.csv.bz2``):
            one S2 patch name a line, or ``s2,s1`` pairs (BigEarthNet-MM); without the S1 name an S2
            patch's partner is the one its S1 JSON named at encode time.
        num_classes: 19 (BigEarthNet-19, the paper's order) or 43 (the original CLC classes, in the
            original order); each patch's 43 labels are merged into 19 by the official mapping.
        bands: as :class:`BigEarthNetDataModule` (band names or a ConfigILM channel set); S1 and S2
            together is BigEarthNet-MM.

    The other arguments are :class:`~rico_torch.data.LMDBDataModule`'s; ``mean``/``std`` left unset are
    computed from the train split. Batches carry ``label`` as a float multi-hot after transfer.
    """

    name = "bigearthnet-v1"
    catalog = v1.DATASET

    def __init__(
        self,
        lmdb_path: str | list[str],
        splits: str,
        num_classes: Literal[19, 43] = 19,
        bands: list[str] | int | str = 12,
        batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        flips: bool = False,
        native: bool | Literal["auto"] = "auto",
        size: int | None = None,
        interpolation: str = "nearest",
        align_corners: bool = False,
        readahead: bool = False,
        stats_samples: int = 1000,
        seed: int = 0,
        loader: LoaderKind = "patch",
    ) -> None:
        LMDBDataModule.__init__(
            self, lmdb_path, resolve_bands(bands), batch_size=batch_size, num_workers=num_workers,
            pin_memory=pin_memory, mean=mean, std=std, flips=flips, native=native, size=size,
            interpolation=interpolation, align_corners=align_corners, readahead=readahead,
            stats_samples=stats_samples, seed=seed, loader=loader)
        if num_classes not in (19, 43):
            raise ConfigError(f"num_classes={num_classes!r}: BigEarthNet v1 has 19 or 43 classes")
        self.splits, self.class_count = Path(splits), num_classes
        self.mask = False
        self.uses_s1 = any(b in v1.S1.band_names for b in self.bands)
        self.uses_s2 = any(b in v1.S2.band_names for b in self.bands)
        self._classes = v1.CLASSES_19 if num_classes == 19 else v1.CLASSES_43

    def encode_hint(self, path: Path) -> str:
        return LMDBDataModule.encode_hint(self, path)

    def split_file(self, split: str) -> Path:
        """The official list of ``split`` (``.csv``, else ``.csv.bz2``)."""
        plain = self.splits / v1.SPLIT_FILES[split]
        packed = plain.with_name(plain.name + ".bz2")
        return packed if not plain.is_file() and packed.is_file() else plain

    def check_lmdb(self) -> None:
        LMDBDataModule.check_lmdb(self)
        missing = [self.split_file(s).name for s in v1.SPLIT_FILES if not self.split_file(s).is_file()]
        if missing:
            where = "no such folder" if not self.splits.is_dir() else f"{', '.join(missing)} not in that folder"
            raise DatasetNotFoundError(f"{self.splits}: BigEarthNet v1 split lists not found ({where}); set splits "
                                       "to the folder holding the official train.csv, val.csv and test.csv")
        if self.manifest() is None or not self.manifest().has_column(v1.LABEL_COLUMN):
            raise ConfigError(f"{self.lmdb_path}: no BigEarthNet v1 labels in its keys.index; encode it with "
                              f"{self.encode_hint(self.lmdb_path)} or convert-pickled")

    def split_items(self, split: str):
        path = self.split_file(split)
        lines = [line.split(",") for line in v1.read_name_list(path)]
        s2 = np.array([line[0].strip().encode() for line in lines], dtype=np.bytes_)
        manifest = self.manifest()
        hot = manifest.labels(s2)
        labels = v1.to_19(hot) if self.class_count == 19 else hot
        columns = [s2]
        if self.uses_s1 and "s1_s2" not in manifest.sources():  # a BigEarthNet-MM value holds both sensors
            columns = [s2] if self.uses_s2 else []
            columns.append(self._s1_keys(s2, lines, path))
        what = f"{'val' if split == 'val' else split} patches of {path}"
        return self.present_items(columns, labels, what, "point splits at this LMDB's official lists")

    def _s1_keys(self, s2: np.ndarray, lines: list[list[str]], path: Path) -> np.ndarray:
        """The S1 partner of each S2 key: the list's second column, else the encode's pairing."""
        if lines and all(len(line) > 1 for line in lines):
            return np.array([line[1].strip().encode() for line in lines], dtype=np.bytes_)
        manifest = self.manifest()
        if len(manifest.parts) != 1:
            raise ConfigError(f"{path}: gives S2 names only; for shards, list `s2,s1` pairs")
        partner = manifest.lookup(v1.PARTNER_COLUMN, s2)
        keys = manifest.parts[0][1].columns["key"]
        return np.where(partner >= 0, keys[np.maximum(partner, 0)] if len(keys) else b"", b"").astype(np.bytes_)
