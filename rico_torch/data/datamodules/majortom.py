"""Major-TOM-Core DataModule: random crops of 1068 px grid cells, S1/S2 pairs, a grid-cell split."""

from __future__ import annotations

import logging
import re
from datetime import date

import numpy as np

from ...catalog import majortom
from ...errors import ConfigError
from ...manifest import decode_keys
from ._modalities import modality_bands
from ._text import ascii_ints
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
        self._items: tuple[list, np.ndarray, np.ndarray] | None = None
        self._splits: dict[str, np.ndarray] | None = None

    def items(self) -> tuple[list, list[str]]:
        """Every item (a key, or an (S2, S1) key pair) and its grid cell, as str (for inspection; the
        datasets get :meth:`item_arrays`)."""
        items, cells = self.item_arrays()
        listed = [k.decode() for k in items.tolist()] if items.ndim == 1 else \
            [tuple(k.decode() for k in row) for row in items.tolist()]
        return listed, decode_keys(cells)

    def item_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every item as an ``S`` array (a key per row, or an (S2, S1) key pair per row, S2 keys in
        sorted order; a pair's S1 product is the one of its grid cell nearest in date, the smaller
        key of equally near ones) and each item's grid cell."""
        _, at, cells = self._item_rows()
        return self._keys(np.arange(len(at))), cells

    def _item_rows(self) -> tuple[list, np.ndarray, np.ndarray]:
        """(per modality of an item, S2 first: :meth:`source_rows`), each item's positions in their
        sorted orders (a column per modality) and each item's grid cell: the items without their
        keys, which stay in the manifest's mapped column until a split's dataset takes them."""
        if self._items is not None:
            return self._items
        if self.modalities != ["s1", "s2"]:
            ref = self.source_rows(self.modalities[0])
            self._items = [ref], np.arange(len(ref[1]))[:, None], parse_keys(*ref)[0]
            return self._items
        ref1, ref2 = self.source_rows("s1"), self.source_rows("s2")
        cells1, *_, day1 = parse_keys(*ref1)
        cells2, *_, day2 = parse_keys(*ref2)
        n1, n2 = len(day1), len(day2)
        code = np.unique(np.concatenate([cells1, cells2]), return_inverse=True)[1].astype(np.int64)
        code1, code2 = code[:n1], code[n1:]
        del cells1  # what is not needed further goes as it goes: 3M keys make every array count
        order = np.lexsort((np.arange(n1), day1, code1))  # by cell, date, key
        sorted_comp = ((code1 << 32) + day1 + (1 << 31))[order]
        sorted_code, sorted_day = code1[order], day1[order]
        del code1, day1
        at = np.searchsorted(sorted_comp, (code2 << 32) + day2 + (1 << 31))  # the first S1 of the cell on or after
        after = at < n1
        after[after] = sorted_code[at[after]] == code2[after]
        before = at > 0  # the last S1 of the cell before it (its first key of that date)
        before[before] = sorted_code[at[before] - 1] == code2[before]
        del sorted_code, code, code2
        first = np.zeros(n2, np.int64)
        first[before] = np.searchsorted(sorted_comp, sorted_comp[at[before] - 1])
        big = np.iinfo(np.int64).max
        gap_after = np.where(after, sorted_day[np.minimum(at, n1 - 1)] - day2, big) if n1 else np.full(n2, big)
        gap_before = np.where(before, day2 - sorted_day[np.maximum(first, 0)], big) if n1 else np.full(n2, big)
        key_after = order[np.minimum(at, max(n1 - 1, 0))] if n1 else np.zeros(n2, np.int64)
        key_before = order[first] if n1 else np.zeros(n2, np.int64)
        take_before = (gap_before < gap_after) | ((gap_before == gap_after) & (key_before < key_after))
        gap = np.where(take_before, gap_before, gap_after)
        partner = np.where(take_before, key_before, key_after)
        keep = (gap < big) & (True if self.max_days is None else gap <= self.max_days)
        if not keep.any():
            raise ConfigError(f"{self.lmdb_path}: no S2 product has an S1 product of its grid cell"
                              + ("" if self.max_days is None else f" within {self.max_days} days"))
        self._items = [ref2, ref1], np.stack([np.flatnonzero(keep), partner[keep]], axis=1), cells2[keep]
        return self._items

    def _keys(self, items: np.ndarray) -> np.ndarray:
        """The keys of ``items`` (rows of :meth:`item_arrays`), (n, 2) for pairs: rows of the mapped key
        column (:meth:`key_items`), or an ``S`` array."""
        refs, at, _ = self._item_rows()
        if len(refs) == 1:
            keys, order = refs[0]
            return self.key_items(keys, order[at[items, 0]])
        if all(keys is refs[0][0] for keys, _ in refs):  # one mapped column: rows of it (KeyRows)
            rows = np.stack([order[at[items, j]] for j, (_, order) in enumerate(refs)], axis=1)
            return self.key_items(refs[0][0], rows)
        width = max(keys.dtype.itemsize for keys, _ in refs)
        out = np.empty((len(items), len(refs)), f"S{width}")
        for j, (keys, order) in enumerate(refs):  # a column and a chunk at a time: no full-size temporaries
            for i in range(0, len(items), _CHUNK):
                out[i : i + _CHUNK, j] = keys[order[at[items[i : i + _CHUNK], j]]]
        return out

    def split_rows(self) -> dict[str, np.ndarray]:
        """Each split's rows of :meth:`item_arrays` (see the class docstring), ascending."""
        if self._splits is None:
            _, _, cells = self._item_rows()
            _, row, col, _ = parse_keys(cells, cells_only=True)
            b = self.block_size
            block, inverse = np.unique(((row // b + _OFFSET) << 23) + (col // b + _OFFSET), return_inverse=True)
            names = np.array([f"{(k >> 23) - _OFFSET}_{(k & _MASK) - _OFFSET}".encode() for k in block.tolist()],
                             dtype=np.bytes_)  # a str per block, "<row>_<col>" as before
            parts = group_split(names[inverse], self.fractions, self.seed)
            split = np.zeros(len(cells), np.int64)  # every cell's items are in one block: one split
            for i, s in enumerate(SPLITS):
                split[parts[s]] = i
            place = ((row + _OFFSET) << 23) + (col + _OFFSET)
            # a position's split: its last cell's (split by split, item by item), as a dict would keep
            last = np.lexsort((split * len(cells) + np.arange(len(cells)), place))
            ends = np.r_[place[last][1:] != place[last][:-1], True]
            spots, spot_split = place[last][ends], split[last][ends]
            touches = np.zeros(len(cells), bool)
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    near = place + (dr << 23) + dc
                    j = np.minimum(np.searchsorted(spots, near), len(spots) - 1)
                    touches |= (spots[j] == near) & (spot_split[j] != split)
            self._splits = {}
            for s in SPLITS:
                kept = parts[s] if s == "train" else parts[s][~touches[parts[s]]]
                if len(kept) < len(parts[s]):
                    log.info("%s: %d %s items left out (their cells touch another split's)", self.lmdb_path,
                             len(parts[s]) - len(kept), s)
                self._splits[s] = kept
        return self._splits

    def splits(self) -> dict[str, list]:
        """Each split's items as :meth:`items` gives them (str; for inspection)."""
        items, _ = self.items()
        return {s: [items[i] for i in rows.tolist()] for s, rows in self.split_rows().items()}

    def split_items(self, split: str):
        return self._keys(self.split_rows()[split]), None


_OFFSET = 1 << 21  # grid positions shifted to non-negative, packed in one int64
_MASK = (1 << 23) - 1


def parse_keys(keys: np.ndarray, rows: np.ndarray | None = None, cells_only: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each key's (of ``keys[rows]``) grid cell (``S``), its (row, column) (:func:`cell_position`)
    and acquisition day (days since 1970; ``majortom.KEY``'s date), vectorised a chunk at a time; a
    key not in the plain ASCII form is parsed by ``majortom.KEY`` itself. ``cells_only``: ``keys``
    are grid cells (day 0)."""
    keys = np.asarray(keys, dtype=np.bytes_)
    n = len(keys) if rows is None else len(rows)
    if n == 0:
        empty = np.zeros(0, np.int64)
        return np.zeros(0, "S1"), empty, empty, empty
    chunks = [_parse_chunk(keys[i : i + _CHUNK] if rows is None else keys[rows[i : i + _CHUNK]], cells_only)
              for i in range(0, n, _CHUNK)]
    return tuple(np.concatenate(c) for c in zip(*chunks))  # type: ignore[return-value]


_CHUNK = 1 << 16  # keys parsed at once: bounds the temporaries (each a copy of the chunk's keys)


def _parse_chunk(keys: np.ndarray, cells_only: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n = len(keys)
    first = np.strings.find(keys, b"_")
    ends = np.strings.str_len(keys) if cells_only else np.strings.find(keys, b"_", first + 1)
    cells = np.strings.slice(keys, 0, ends).astype(f"S{max(int(ends.max()), 1)}")
    up = np.strings.slice(keys, first - 1, first).astype("S1")
    right = np.strings.slice(keys, ends - 1, ends).astype("S1")
    rows = np.strings.slice(keys, 0, first - 1).astype(f"S{max(int(first.max()), 1)}")
    cols = np.strings.slice(keys, first + 1, ends - 1).astype(f"S{max(int((ends - first).max()), 1)}")
    ok = (first > 0) & (ends > first) & ((up == b"U") | (up == b"D")) & ((right == b"L") | (right == b"R")) & \
        np.strings.isdigit(rows) & np.strings.isdigit(cols)
    days = np.zeros(n, np.int64)
    if not cells_only:
        product = ends + 1
        head = np.strings.slice(keys, product, product + 4).astype("S4")
        ok &= np.isin(head, [b"S1A_", b"S1B_", b"S2A_", b"S2B_"]) & (np.strings.find(keys, b"\n") < 0)
        # the lazy \w+? ends at the first "_" after it where "_<8 digits>T<6 digits>_" follows
        mark = np.strings.find(keys, b"_", product + 5)
        found = np.zeros(n, bool)
        for _ in range(8):
            open_ = np.flatnonzero(~found & (mark > 0))
            if not len(open_):
                break
            at, some = mark[open_], keys[open_]
            stamp = np.strings.slice(some, at, at + 17).astype("S17").view(np.uint8).reshape(len(open_), 17)
            digits = (stamp >= 48) & (stamp <= 57)
            hit = ((stamp[:, 0] == 95) & digits[:, 1:9].all(1) & (stamp[:, 9] == 84) & digits[:, 10:16].all(1)
                   & (stamp[:, 16] == 95))  # "_" 8 digits "T" 6 digits "_"
            found[open_[hit]] = True
            mark[open_[~hit]] = np.strings.find(some[~hit], b"_", at[~hit] + 1)
        word = np.strings.replace(np.strings.slice(keys, product + 4, mark), b"_", b"")
        ok &= found & np.strings.isalnum(word)
        date = np.strings.slice(keys, mark + 1, mark + 9).astype("S8")
        days[ok] = _days(ascii_ints(np.where(ok, date, b"19700101")))[ok]
    row = np.where(ok, np.where(up == b"U", 1, -1) * ascii_ints(rows), 0)
    col = np.where(ok, np.where(right == b"R", 1, -1) * ascii_ints(cols), 0)
    for i in np.flatnonzero(~ok).tolist():  # anything else: the catalog's own rule
        key = keys[i].decode()
        m = re.fullmatch(majortom.GRID_CELL, key) if cells_only else majortom.KEY.fullmatch(key)
        if m is None:
            raise ConfigError(f"{key!r} is not a Major-TOM-Core {'grid cell' if cells_only else 'key'}")
        cell = key if cells_only else m["cell"]
        if len(cell.encode()) > cells.dtype.itemsize:
            cells = cells.astype(f"S{len(cell.encode())}")
        cells[i] = cell.encode()
        row[i], col[i] = cell_position(cell)
        if not cells_only:
            days[i] = _date(m["date"]).toordinal() - _EPOCH
    return cells, row, col, days


_EPOCH = date(1970, 1, 1).toordinal()


def _days(yyyymmdd: np.ndarray) -> np.ndarray:
    """Days since 1970 of ``yyyymmdd`` integers (as ``datetime.date``; an invalid date raises)."""
    y, m, d = yyyymmdd // 10000, yyyymmdd // 100 % 100, yyyymmdd % 100
    months = ((y - 1970) * 12 + m - 1).astype("datetime64[M]")
    days = (months.astype("datetime64[D]") + (d - 1)).astype(np.int64)
    bad = (m < 1) | (m > 12) | (d < 1) | (days.astype("datetime64[D]").astype("datetime64[M]") != months)
    if bad.any():
        raise ValueError(f"day is out of range for month: {int(yyyymmdd[np.argmax(bad)])}")
    return days


def _date(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
