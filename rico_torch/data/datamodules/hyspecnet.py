"""HySpecNet-11k DataModule."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from ...catalog import hyspecnet
from ...errors import ConfigError, DatasetNotFoundError, UnknownKeyError
from ...manifest import decode_keys
from .base import LMDBDataModule, LoaderKind


class HySpecNetDataModule(LMDBDataModule):
    """HySpecNet-11k: 224-band EnMAP patches for self-supervised learning / compression.

    Args:
        lmdb_path: the encoded dataset.
        split_dir: the dataset's ``splits`` folder, holding ``easy/`` and ``hard/`` with
            ``train.csv``, ``val.csv`` and ``test.csv`` (lines ``<tile>/<patch>/<patch>-DATA.npy``).
        difficulty: ``easy`` (patches split at random) or ``hard`` (tiles split).
        bands: defaults to the 202 bands left after dropping the water-vapour bands
            126-140 and 160-166.

    No labels: samples carry ``image`` and ``key``.
    """

    name = "hyspecnet-11k"
    catalog = hyspecnet.DATASET
    rgb_bands = hyspecnet.PATCHES.rgb_bands

    def __init__(
        self,
        lmdb_path: str | list[str],
        split_dir: str,
        difficulty: str = "easy",
        bands: list[str] | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        flips: bool = False,
        native: bool | Literal["auto"] = "auto",
        readahead: bool = False,
        stats_samples: int = 500,
        seed: int = 0,
        loader: LoaderKind = "patch",
    ) -> None:
        super().__init__(lmdb_path, list(bands or hyspecnet.DEFAULT_BANDS), batch_size=batch_size,
                         num_workers=num_workers, pin_memory=pin_memory, mean=mean, std=std, flips=flips,
                         native=native, readahead=readahead, stats_samples=stats_samples, seed=seed, loader=loader)
        if difficulty not in ("easy", "hard"):
            raise ConfigError(f"difficulty {difficulty!r} is not 'easy' or 'hard'")
        self.split_dir, self.difficulty = Path(split_dir), difficulty

    def split_items(self, split: str):
        path = self.split_dir / self.difficulty / f"{split}.csv"
        if not path.exists():
            raise DatasetNotFoundError(f"{path}: HySpecNet-11k split file missing; set split_dir to the dataset's "
                                       "splits/ folder (holding easy/ and hard/)")
        # <tile>/<patch>/<patch>-DATA.npy -> the patch directory name, which is the key
        keys = np.array([Path(line.strip()).parent.name for line in path.read_text().splitlines() if line.strip()],
                        dtype=np.bytes_)
        missing = decode_keys(keys[~self.has_keys(keys)])
        if missing:
            raise UnknownKeyError(f"{path}: {len(missing)} of its {len(keys)} patches are not in {self.lmdb_path}, "
                                  f"e.g. {missing[0]!r}; is split_dir this LMDB's dataset?")
        return keys, None
