"""SSL4EO-S12 DataModule: a location's seasons as views, for self-supervised pretraining."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ...catalog import ssl4eo
from ...errors import ConfigError
from ..dataset import LMDBPatchDataset, SampleList, _unbatch
from ._modalities import modality_bands
from .base import LMDBDataModule, LoaderKind, group_split

log = logging.getLogger(__name__)
MODALITIES = ("s1", "s2_l1c", "s2_l2a")


class SeasonViews(Dataset):
    """Locations of an :class:`LMDBPatchDataset` whose items are seasons: each read of a location
    draws ``views`` different seasons (``random``; else its first ones) and returns ``image``
    ``(C, H, W)`` for one view, ``(V, C, H, W)`` for several, with ``key`` (per view) and ``crop``."""

    def __init__(self, dataset: LMDBPatchDataset, locations: Sequence[Sequence[int]], views: int, random: bool):
        self.dataset, self.locations, self.views, self.random = dataset, [list(s) for s in locations], views, random

    def __len__(self) -> int:
        return len(self.locations)

    def _seasons(self, index: int) -> list[int]:
        seasons = self.locations[index]
        order = torch.randperm(len(seasons)).tolist() if self.random else range(len(seasons))
        return [seasons[i] for i in list(order)[: self.views]]

    def __getitems__(self, indices: Sequence[int]) -> SampleList:
        chosen = [self._seasons(i) for i in indices]
        reads = [self.dataset.read_batch([c[v] for c in chosen]) for v in range(self.views)]
        if self.views == 1:
            batch = reads[0]
        else:
            batch = {"image": torch.stack([r["image"] for r in reads], 1), "crop": torch.stack([r["crop"] for r in reads], 1),
                     "key": [[r["key"][n] for r in reads] for n in range(len(indices))]}
        return SampleList([_unbatch(batch, row) for row in range(len(indices))], batch=batch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _unbatch(self.__getitems__([index]).batch, 0)

    # what the DataModule's statistics and plots ask of a dataset
    def __getattr__(self, name: str) -> Any:
        if name in ("_keys", "size", "crop", "grid", "bands", "native_assembler", "plot"):
            return getattr(self.__dict__["dataset"], name)
        raise AttributeError(name)


class SSL4EODataModule(LMDBDataModule):
    """SSL4EO-S12: four seasons of Sentinel-1 / Sentinel-2 L1C / L2A at ~250,000 locations.

    A sample is a location; each epoch it shows one season drawn at random (``views=2``: two
    different seasons, ``image`` ``(2, C, H, W)``, for contrastive methods), as a crop of
    ``crop_size`` (random in training, centred in val/test; patches differ by a pixel, 264 or
    265 at 10 m). Modalities are combined per season (the i-th acquisitions by date); L1C and
    L2A share band names and so cannot be combined. The split deals whole locations.

    Args:
        lmdb_path: the encoded dataset.
        modalities: any of ``s1``, ``s2_l1c``, ``s2_l2a`` (not both S2 levels).
        bands: band keys; default: every band of the modalities (S2 first, then ``VH VV``).
        views: seasons per sample (1 to 4).
        crop_size: crop edge in 10 m pixels.
        fractions: (train, val, test) shares of the locations.
        (the rest: see :class:`LMDBDataModule`)
    """

    name = "ssl4eo-s12"
    catalog = ssl4eo.DATASET
    rgb_bands = ssl4eo.S2_L1C.rgb_bands

    def __init__(
        self,
        lmdb_path: str | list[str],
        modalities: list[str] = ("s2_l1c",),  # type: ignore[assignment]
        bands: list[str] | None = None,
        views: int = 1,
        crop_size: int = 224,
        fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        flips: bool = True,
        readahead: bool = False,
        stats_samples: int = 500,
        seed: int = 0,
        loader: LoaderKind = "patch",
    ) -> None:
        order = ("s2_l1c", "s2_l2a", "s1")
        self.modalities, chosen = modality_bands(self.catalog, modalities, MODALITIES, order, bands)
        if {"s2_l1c", "s2_l2a"} <= set(self.modalities):
            raise ConfigError("modalities s2_l1c and s2_l2a share band names (B1 ... B12); combine one of them with s1")
        if not 1 <= views <= ssl4eo.SEASONS:
            raise ConfigError(f"views={views}: a location has {ssl4eo.SEASONS} seasons; give 1 to {ssl4eo.SEASONS}")
        super().__init__(lmdb_path, chosen, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, mean=mean, std=std, flips=flips, native=False, readahead=readahead,
                         stats_samples=stats_samples, seed=seed, crop_size=crop_size, loader=loader)
        order = [m for m in order if m in self.modalities]
        self.order, self.views, self.fractions = order, views, tuple(fractions)
        self._locations: dict[str, list[tuple[str, ...]]] | None = None

    def locations(self) -> dict[str, list[tuple[str, ...]]]:
        """Location id -> its seasons, each the keys of the modalities' i-th acquisition by date."""
        if self._locations is None:
            keys = self.keys_by_source()
            per: dict[str, dict[str, list[str]]] = {}
            for m in self.order:
                pattern = self.catalog.source(m)._key_regex  # type: ignore[attr-defined]
                for k in keys.get(m, []):
                    match = pattern.fullmatch(k)
                    per.setdefault(match["location"], {}).setdefault(m, []).append(k)
            self._locations = {}
            for location, by in sorted(per.items()):
                if len(by) < len(self.order):
                    continue  # a modality missing at this location
                ordered = [sorted(by[m], key=_acquired) for m in self.order]
                seasons = list(zip(*ordered))
                if len(seasons) >= self.views:
                    self._locations[location] = seasons
            if not self._locations:
                raise ConfigError(f"{self.lmdb_path}: no location has {self.views} season(s) of {self.order}")
        return self._locations

    def split_items(self, split: str):
        locations = self.locations()
        names = list(locations)
        chosen = group_split(names, self.fractions, self.seed)[split]
        return [locations[names[i]] for i in chosen], None

    def make_dataset(self, split: str) -> SeasonViews:  # type: ignore[override]
        per_location, _ = self.split_items(split)
        if not per_location:
            raise ConfigError(f"{self.lmdb_path}: the {split} split is empty (too few locations)")
        flat = [s if len(s) > 1 else s[0] for seasons in per_location for s in seasons]
        inner = LMDBPatchDataset(self.lmdb_paths, self.bands, keys=flat, size=self.size, crop=self.crop_size,
                                 crop_mode="random" if split == "train" else "center", readahead=self.readahead,
                                 interpolation=self.interpolation, manifests=self.path_manifests())
        starts = np.cumsum([0] + [len(s) for s in per_location])
        locations = [range(a, b) for a, b in zip(starts[:-1], starts[1:])]
        return SeasonViews(inner, locations, self.views, random=split == "train")


def _acquired(key: str) -> str:
    found = ssl4eo.ACQUIRED.search(key.split("_", 2)[-1])
    return found.group() if found else key
