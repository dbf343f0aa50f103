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
from ...manifest import decode_keys
from ..dataset import LMDBPatchDataset, SampleList, _unbatch
from ._modalities import modality_bands
from .base import LMDBDataModule, LoaderKind, group_split

log = logging.getLogger(__name__)
MODALITIES = ("s1", "s2_l1c", "s2_l2a")


class SeasonViews(Dataset):
    """Locations of an :class:`LMDBPatchDataset` whose items are seasons: location ``i`` is items
    ``starts[i]`` to ``starts[i + 1]``; each read of a location draws ``views`` different seasons
    (``random``; else its first ones) and returns ``image`` ``(C, H, W)`` for one view,
    ``(V, C, H, W)`` for several, with ``key`` (per view) and ``crop``."""

    def __init__(self, dataset: LMDBPatchDataset, starts: np.ndarray, views: int, random: bool):
        self.dataset, self.starts, self.views, self.random = dataset, np.asarray(starts, np.int64), views, random

    def __len__(self) -> int:
        return len(self.starts) - 1

    def _seasons(self, index: int) -> list[int]:
        index = range(len(self))[index]
        seasons = range(int(self.starts[index]), int(self.starts[index + 1]))
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
        self._locations: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def locations(self) -> dict[str, list[tuple[str, ...]]]:
        """Location id -> its seasons, each the keys of the modalities' i-th acquisition by date (str;
        for inspection: the datasets get :meth:`season_arrays`)."""
        names, starts, _ = self.season_arrays()
        keys = self._keys(np.arange(starts[-1]))
        rows = [tuple(k.decode() for k in row) for row in (keys if keys.ndim == 2 else keys[:, None]).tolist()]
        return {name: rows[a:b] for name, a, b in zip(decode_keys(names), starts[:-1].tolist(), starts[1:].tolist())}

    def season_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(location ids, sorted, as ``S``; offsets: location ``i``'s seasons are ``starts[i]`` to
        ``starts[i + 1]``; each season's rows in the modalities' keys (:meth:`source_rows`), a column
        per modality of :attr:`order`): every location with a key of each modality and at least
        :attr:`views` seasons, a season being the modalities' i-th acquisitions by date
        (:func:`_acquired`, ties in key order). The keys stay in the manifest's mapped column until a
        split's dataset takes them (:meth:`split_seasons`)."""
        if self._locations is not None:
            return self._locations
        per = []  # per modality: its keys and sorted rows, their locations and acquisition times
        for m in self.order:
            keys, rows = self.source_rows(m)
            per.append((keys, rows, *_parse(keys, rows, self.catalog.source(m)._key_regex)))  # type: ignore
        names, codes = np.unique(np.concatenate([p[2] for p in per]), return_inverse=True)
        counts = np.full(len(names), np.iinfo(np.int64).max)
        at, ordered = 0, []
        for keys, rows, location, acquired in per:
            code = codes[at : at + len(rows)]
            at += len(rows)
            _, rank = np.unique(acquired, return_inverse=True)
            order = np.lexsort((np.arange(len(rows)), rank, code))
            counts = np.minimum(counts, np.bincount(code, minlength=len(names)))
            ordered.append((rows[order], np.searchsorted(code[order], np.arange(len(names)))))
        del per, codes
        kept = np.flatnonzero(counts >= max(self.views, 1))
        if not len(kept):
            raise ConfigError(f"{self.lmdb_path}: no location has {self.views} season(s) of {self.order}")
        seasons = counts[kept]
        starts = np.concatenate([[0], np.cumsum(seasons)])
        location = np.repeat(kept, seasons)
        within = np.arange(starts[-1]) - np.repeat(starts[:-1], seasons)
        positions = np.stack([rows[first[location] + within] for rows, first in ordered], axis=1)
        self._locations = names[kept], starts, positions
        return self._locations

    def _keys(self, seasons: np.ndarray) -> np.ndarray:
        """The keys of ``seasons`` (rows of :meth:`season_arrays`' positions), a column per modality
        where more than one: rows of the mapped key column (:meth:`key_items`), or an ``S`` array."""
        _, _, positions = self.season_arrays()
        columns = [self.source_rows(m)[0] for m in self.order]
        if all(c is columns[0] for c in columns):  # one column: rows of it
            return self.key_items(columns[0], positions[seasons] if len(columns) > 1 else positions[seasons, 0])
        out = np.empty((len(seasons), len(columns)), f"S{max(c.dtype.itemsize for c in columns)}")
        for j, keys in enumerate(columns):  # a column and a chunk at a time: no full-size temporaries
            for i in range(0, len(seasons), _CHUNK):
                out[i : i + _CHUNK, j] = keys[positions[seasons[i : i + _CHUNK], j]]
        return out

    def split_seasons(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The seasons' keys of ``split``'s locations (dealt whole by :func:`group_split`) and their
        offsets per location."""
        names, starts, _ = self.season_arrays()
        chosen = group_split(names, self.fractions, self.seed)[split]
        first, last = starts[chosen], starts[chosen + 1]
        lengths = last - first
        picked = np.repeat(first - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
        return self._keys(picked), np.concatenate([[0], np.cumsum(lengths)])

    def split_items(self, split: str):
        """``split``'s locations, each a list of its seasons' key tuples (str; for inspection)."""
        names, _, _ = self.season_arrays()
        chosen = group_split(names, self.fractions, self.seed)[split]
        locations = self.locations()
        listed = decode_keys(names)
        return [locations[listed[i]] for i in chosen], None

    def make_dataset(self, split: str) -> SeasonViews:  # type: ignore[override]
        keys, starts = self.split_seasons(split)
        if len(starts) < 2:
            raise ConfigError(f"{self.lmdb_path}: the {split} split is empty (too few locations)")
        inner = LMDBPatchDataset(self.lmdb_paths, self.bands, keys=keys, size=self.size, crop=self.crop_size,
                                 crop_mode="random" if split == "train" else "center", readahead=self.readahead,
                                 interpolation=self.interpolation, manifests=self.path_manifests())
        return SeasonViews(inner, starts, self.views, random=split == "train")


def _parse(keys: np.ndarray, rows: np.ndarray, pattern) -> tuple[np.ndarray, np.ndarray]:
    """Each key's (of ``keys[rows]``) location id (``pattern``'s, the source's key rule) and acquisition sort key
    (:func:`_acquired`), vectorised where a key is plain ASCII with a root folder name without
    ``_``; any other key by the regular expressions themselves."""
    if len(rows) == 0:
        return np.zeros(0, "S1"), np.zeros(0, "S1")
    chunks = [_parse_chunk(keys[rows[i : i + _CHUNK]], pattern) for i in range(0, len(rows), _CHUNK)]
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


_CHUNK = 1 << 16  # keys parsed at once: bounds the temporaries (each a copy of the chunk's keys)


def _parse_chunk(keys: np.ndarray, pattern) -> tuple[np.ndarray, np.ndarray]:
    n = len(keys)
    ascii_ = ~(np.ascontiguousarray(keys).view(np.uint8).reshape(n, keys.dtype.itemsize) >= 128).any(1)
    first = np.strings.find(keys, b"_")
    second = np.strings.find(keys, b"_", first + 1)
    location = np.strings.slice(keys, first + 1, second).astype(f"S{max(int((second - first).max()), 1)}")
    tail = np.strings.slice(keys, second + 1, None)
    s1 = pattern.pattern.endswith("S1[AB]_.+)")
    head = np.strings.slice(tail, 0, 4).astype("S4")
    stamp = np.strings.slice(tail, 0, 16).astype("S16").view(np.uint8).reshape(n, 16)
    digits = (stamp >= 48) & (stamp <= 57)
    acquisition_ok = ((head == b"S1A_") | (head == b"S1B_")) if s1 else \
        (digits[:, :8].all(1) & (stamp[:, 8] == 84) & digits[:, 9:15].all(1) & (stamp[:, 15] == 95))
    ok = (ascii_ & (first > 0) & (second > first + 1) & np.strings.isdigit(location) & acquisition_ok
          & (np.strings.str_len(tail) > (4 if s1 else 16)) & (np.strings.find(keys, b"/") < 0)
          & (np.strings.find(keys, b"\n") < 0) & (np.strings.find(keys, b"\r") < 0))
    # the acquisition time: the first <8 digits>T<6 digits> after the key's second "_"
    acquired = np.strings.slice(tail, 0, 0).astype("S15")
    found = np.zeros(n, bool)
    mark = np.strings.find(tail, b"T", 8)
    for _ in range(8):
        open_ = np.flatnonzero(ok & ~found & (mark >= 8))
        if not len(open_):
            break
        at, some = mark[open_], tail[open_]
        near = np.strings.slice(some, at - 8, at + 7).astype("S15")
        chars = near.view(np.uint8).reshape(len(open_), 15)
        near_digits = (chars >= 48) & (chars <= 57)
        hit = near_digits[:, :8].all(1) & (chars[:, 8] == 84) & near_digits[:, 9:].all(1)
        found[open_[hit]], acquired[open_[hit]] = True, near[hit]
        mark[open_[~hit]] = np.strings.find(some[~hit], b"T", at[~hit] + 1)
    ok &= found | (mark < 0)  # no time in it: sorted by the key itself
    timeless = ~found & ok
    if timeless.any() or not ok.all():  # sorted by the key itself (or the regular expression's time)
        width = max(keys.dtype.itemsize, 15)
        acquired = np.where(found, acquired.astype(f"S{width}"), keys.astype(f"S{width}"))
    for i in np.flatnonzero(~ok).tolist():
        key = keys[i].decode()
        match = pattern.fullmatch(key)
        if match is None:
            raise ConfigError(f"{key!r} is not an SSL4EO-S12 key of its source (<root>_<location>_<acquisition>)")
        if len(match["location"].encode()) > location.dtype.itemsize:
            location = location.astype(f"S{len(match['location'].encode())}")
        location[i], acquired[i] = match["location"].encode(), _acquired(key).encode()
    return location, acquired


def _acquired(key: str) -> str:
    found = ssl4eo.ACQUIRED.search(key.split("_", 2)[-1])
    return found.group() if found else key
