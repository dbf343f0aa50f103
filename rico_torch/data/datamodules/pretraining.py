"""Self-supervised pretraining sets without labels or split files: Hydro and SpectralEarth."""

from __future__ import annotations

from typing import Literal

import numpy as np

from ...catalog import hydro, spectralearth
from ...manifest import decode_keys
from .base import LMDBDataModule, LoaderKind, group_split


class PretrainingDataModule(LMDBDataModule):
    """Every patch of the LMDB, dealt to train/val/test by a seeded split of whole groups
    (:meth:`group_of`); samples carry ``image`` and ``key``, no label (masked-autoencoder
    style pretraining, e.g. ``rico_torch.models.ConvAutoencoder``).

    Args:
        lmdb_path: the encoded dataset.
        bands: band keys; default: all of the dataset's.
        fractions: (train, val, test) shares of the groups.
        crop_size: train on random crops of this size (centred in val/test); None: whole patches.
        (the rest: see :class:`LMDBDataModule`)
    """

    default_bands: tuple[str, ...] = ()
    groups_name = "patches"  # what :meth:`group_of` names, for messages

    def __init__(
        self,
        lmdb_path: str | list[str],
        bands: list[str] | None = None,
        fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        flips: bool = True,
        native: bool | Literal["auto"] = "auto",
        crop_size: int | None = None,
        readahead: bool = False,
        stats_samples: int = 500,
        seed: int = 0,
        loader: LoaderKind = "patch",
    ) -> None:
        super().__init__(lmdb_path, list(bands or self.default_bands), batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, mean=mean, std=std, flips=flips, native=native, readahead=readahead,
                         stats_samples=stats_samples, seed=seed, crop_size=crop_size, loader=loader)
        self.fractions = tuple(fractions)
        self._splits: tuple[np.ndarray, dict[str, np.ndarray]] | None = None

    def group_of(self, key: str) -> str:
        """The group a patch is split with (its own key: patches split at random)."""
        return key

    def group_array(self, keys: np.ndarray) -> np.ndarray | None:
        """:meth:`group_of` of every key of an ``S`` array, vectorised (an ``S`` array, as UTF-8);
        None: not vectorised here (each key's :meth:`group_of` is asked)."""
        return keys if type(self).group_of is PretrainingDataModule.group_of else None  # each key its own group

    def empty_split_reason(self, split: str) -> str:
        return (f"the seeded split deals whole {self.groups_name} in fractions {list(self.fractions)}, and this LMDB "
                f"has too few of them ({self.group_count()}): encode more patches or change fractions")

    def group_count(self) -> int:
        """How many groups the split deals."""
        keys = self.split_keys_and_groups()[2]
        return len(np.unique(keys)) if isinstance(keys, np.ndarray) else len(set(keys))

    def split_keys_and_groups(self):
        """(column, rows, groups): ``column[rows]`` every key in sorted order and each key's group."""
        manifest = self.manifest()
        if manifest and manifest.has_keys:  # the mapped column and its rows in sorted order
            column, rows = manifest.sorted_rows()
        else:
            column = self.stored_keys()
            rows = np.arange(len(column))
        keys = column[rows]  # sorted (bytes order is the keys' str order)
        groups = self.group_array(keys)
        if groups is None:
            groups = [self.group_of(k) for k in decode_keys(keys)]
        return column, rows, groups

    def split_items(self, split: str):
        if self._splits is None:  # dealt once for all splits
            column, rows, groups = self.split_keys_and_groups()
            self._splits = column, {s: rows[i] for s, i in group_split(groups, self.fractions, self.seed).items()}
        column, rows_of = self._splits
        return self.key_items(column, rows_of[split]), None


class HydroDataModule(PretrainingDataModule):
    """Hydro: 12-band Sentinel-2 256x256 water patches (``B01``..``B12`` with ``B8A``, no B10),
    split at random by patch."""

    name = "hydro"
    catalog = hydro.DATASET
    rgb_bands = hydro.PATCHES.rgb_bands
    default_bands = hydro.BANDS


class SpectralEarthDataModule(PretrainingDataModule):
    """SpectralEarth (EnMAP): 202-band hyperspectral 128x128 patches (``B1``..``B202``), split by
    tile folder so that patches of one tile stay in one split."""

    name = "spectral-earth-enmap"
    catalog = spectralearth.DATASET
    rgb_bands = spectralearth.PATCHES.rgb_bands
    default_bands = spectralearth.BANDS

    groups_name = "tile folders"

    def group_of(self, key: str) -> str:
        return key.rsplit("_", 1)[0]  # <tile>_<n>.tif -> <tile>

    def group_array(self, keys: np.ndarray) -> np.ndarray | None:
        if type(self).group_of is not SpectralEarthDataModule.group_of:
            return super().group_array(keys)
        last = np.strings.rfind(keys, b"_")  # "_" is one byte in UTF-8: the same cut as str.rsplit
        return np.strings.slice(keys, 0, np.where(last < 0, np.strings.str_len(keys), last))
