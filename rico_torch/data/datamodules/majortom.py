"""Major-TOM-Core DataModule: random crops of 1068 px grid cells, S1/S2 pairs, a grid-cell split."""

from __future__ import annotations

import logging
import re
from datetime import date

from ...catalog import majortom
from ...errors import ConfigError
from ._modalities import modality_bands
from .base import SPLITS, LMDBDataModule, LoaderKind, group_split

log = logging.getLogger(__name__)
MODALITIES = ("s1", "s2")


def cell_position(cell: str) -> tuple[int, int]:
    """A grid cell's (row, column): ``U``p and ``R``ight positive, ``D``own and ``L``eft negative."""
    row, ud, col, lr = re.fullmatch(majortom.GRID_CELL, cell).groups()  # type: ignore[union-attr]
    return int(row) * (1 if ud == "U" else -1), int(col) * (1 if lr == "R" else -1)


class MajorTOMDataModule(LMDBDataModule):
    """Major-TOM-Core: S2L2A (12 bands) and S1RTC (``vh``, ``vv``) products of 1068 px grid cells.

    Each sample is a crop of ``crop_size`` (random in training, centred in val/test) read from the
    stored value without materialising the cell. With both modalities an item pairs each S2
    product with the S1 product of the same grid cell nearest in date (within ``max_days``);
    S2 products without one are left out. The split deals blocks of ``block_size`` x
    ``block_size`` grid cells, then drops every val/test cell that touches (8-neighbourhood) a
    cell of another split, so no two neighbouring cells are in different splits.

    Args:
        lmdb_path: the encoded dataset.
        modalities: ``["s2"]``, ``["s1"]`` or ``["s1", "s2"]``.
        bands: band keys; default: every band of the modalities (S2 bands, then ``vh vv``).
        crop_size: crop edge in 10 m pixels.
        max_days: largest S1/S2 date difference of a pair; None: the nearest, however far.
        block_size: grid cells per split block side.
        fractions: (train, val, test) shares of the blocks.
        (the rest: see :class:`LMDBDataModule`)
    """

    name = "major-tom-core"
    catalog = majortom.DATASET
    rgb_bands = majortom.S2.rgb_bands

    def __init__(
        self,
        lmdb_path: str | list[str],
        modalities: list[str] = ("s2",),  # type: ignore[assignment]
        bands: list[str] | None = None,
        crop_size: int = 256,
        max_days: int | None = None,
        block_size: int = 4,
        fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        batch_size: int = 16,
        num_workers: int = 2,
        pin_memory: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        flips: bool = True,
        readahead: bool = False,
        stats_samples: int = 200,
        seed: int = 0,
        loader: LoaderKind = "patch",
    ) -> None:
        self.modalities, chosen = modality_bands(self.catalog, modalities, MODALITIES, ("s2", "s1"), bands)
        super().__init__(lmdb_path, chosen, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, mean=mean, std=std, flips=flips, native=False, readahead=readahead,
                         stats_samples=stats_samples, seed=seed, crop_size=crop_size, loader=loader)
        self.max_days, self.block_size, self.fractions = max_days, block_size, tuple(fractions)
        self._splits: dict[str, list] | None = None

    def items(self) -> tuple[list, list[str]]:
        """Every item (a key, or an (S2, S1) key pair) and its grid cell."""
        keys = self.keys_by_source()
        if self.modalities != ["s1", "s2"]:
            chosen = keys[self.modalities[0]]
            return chosen, [majortom.KEY.fullmatch(k)["cell"] for k in chosen]
        s1_by_cell: dict[str, list[tuple[date, str]]] = {}
        for k in keys["s1"]:
            m = majortom.KEY.fullmatch(k)
            s1_by_cell.setdefault(m["cell"], []).append((_date(m["date"]), k))
        items, cells = [], []
        for k in keys["s2"]:
            m = majortom.KEY.fullmatch(k)
            when = _date(m["date"])
            candidates = sorted((abs((d - when).days), s1) for d, s1 in s1_by_cell.get(m["cell"], []))
            if candidates and (self.max_days is None or candidates[0][0] <= self.max_days):
                items.append((k, candidates[0][1]))
                cells.append(m["cell"])
        if not items:
            raise ConfigError(f"{self.lmdb_path}: no S2 product has an S1 product of its grid cell"
                              + ("" if self.max_days is None else f" within {self.max_days} days"))
        return items, cells

    def splits(self) -> dict[str, list]:
        if self._splits is None:
            items, cells = self.items()
            position = {c: cell_position(c) for c in set(cells)}
            b = self.block_size
            blocks = [f"{position[c][0] // b}_{position[c][1] // b}" for c in cells]
            parts = group_split(blocks, self.fractions, self.seed)
            split_of_cell = {cells[i]: s for s in SPLITS for i in parts[s]}
            at = {position[c]: s for c, s in split_of_cell.items()}

            def touches_another(cell: str) -> bool:
                (r, c), own = position[cell], split_of_cell[cell]
                return any(at.get((r + dr, c + dc), own) != own for dr in (-1, 0, 1) for dc in (-1, 0, 1))

            self._splits = {}
            for s in SPLITS:
                kept = [i for i in parts[s] if s == "train" or not touches_another(cells[i])]
                if len(kept) < len(parts[s]):
                    log.info("%s: %d %s items left out (their cells touch another split's)", self.lmdb_path,
                             len(parts[s]) - len(kept), s)
                self._splits[s] = [items[i] for i in kept]
        return self._splits

    def split_items(self, split: str):
        return self.splits()[split], None


def _date(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
