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
from .base import SPLITS, LMDBDataModule, LoaderKind

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
    S2 products without one are left out. The split keeps neighbouring grid cells (8-neighbourhood)
    out of different splits (:func:`neighbour_safe_split`): val and test are each one compact
    region of the grid, grown until the items they keep reach their fraction; their cells that
    touch another split's are left out (the rule's cost: a one-cell border around each region).

    Args:
        lmdb_path: the encoded dataset.
        modalities: ``["s2"]``, ``["s1"]`` or ``["s1", "s2"]``.
        bands: band keys; default: every band of the modalities (S2 bands, then ``vh vv``).
        crop_size: crop edge in 10 m pixels.
        max_days: largest S1/S2 date difference of a pair; None: the nearest, however far.
        fractions: (train, val, test) shares of the items asked for; val and test get about theirs,
            train what remains after the left-out border (the split says what it got, at WARNING
            where a share is more than 2 points off).
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
        self.max_days, self.fractions = max_days, tuple(fractions)
        self._items: tuple[list, np.ndarray, np.ndarray] | None = None
        self._positions: tuple[np.ndarray, np.ndarray] | None = None  # each item's grid (row, column)
        self._cell_count = 0  # distinct grid positions of the items
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
        keys, which stay in the manifest's mapped column until a split's dataset takes them. Built
        once (with each item's grid position, :attr:`_positions`, for the split)."""
        if self._items is not None:
            return self._items
        if self.modalities != ["s1", "s2"]:
            ref = self.source_rows(self.modalities[0])
            cells, row, col, _, _ = parse_keys(*ref)
            self._items = [ref], np.arange(len(ref[1]))[:, None], cells
            self._positions = row.astype(np.int32), col.astype(np.int32)
            return self._items
        ref1, ref2 = self.source_rows("s1"), self.source_rows("s2")
        cells1, _, _, day1, ident1 = parse_keys(*ref1)
        cells2, row2, col2, day2, ident2 = parse_keys(*ref2)
        n1, n2 = len(day1), len(day2)
        # a code per distinct cell string: from its number form where every key has one (an int64 sort),
        # else from the strings themselves
        same = np.concatenate([ident1, ident2]) if (ident1 >= 0).all() and (ident2 >= 0).all() else \
            np.concatenate([cells1, cells2])
        code = np.unique(same, return_inverse=True)[1].astype(np.int64)
        code1, code2 = code[:n1], code[n1:]
        del cells1, same, ident1, ident2  # what is not needed further goes as it goes: 3M keys make every array count
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
        self._positions = row2[keep].astype(np.int32), col2[keep].astype(np.int32)
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
            self._splits, self._cell_count = neighbour_safe_split(*self._positions, self.fractions, self.seed)
            report = split_report(self._splits, len(cells), self.fractions, self._cell_count)
            far = any(abs(len(self._splits[s]) / max(len(cells), 1) - f) > FRACTION_TOLERANCE
                      for s, f in zip(SPLITS, self.fractions))
            log.log(logging.WARNING if far else logging.INFO, "%s: %s", self.lmdb_path, report)
        return self._splits

    def empty_split_reason(self, split: str) -> str:
        _, _, cells = self._item_rows()
        return (f"{len(cells)} items in {self._cell_count} grid cells are too few for fractions "
                f"{list(self.fractions)} once val and test cells next to another split's are left out: "
                "use more cells or larger val/test fractions")

    def splits(self) -> dict[str, list]:
        """Each split's items as :meth:`items` gives them (str; for inspection)."""
        items, _ = self.items()
        return {s: [items[i] for i in rows.tolist()] for s, rows in self.split_rows().items()}

    def split_items(self, split: str):
        return self._keys(self.split_rows()[split]), None


_OFFSET = 1 << 21  # grid positions shifted to non-negative, packed in one int64
_MASK = (1 << 23) - 1
FRACTION_TOLERANCE = 0.02  # a share further than this from the one asked is reported at WARNING
_NEIGHBOURS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]


def hilbert_index(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each (x, y)'s (non-negative ints) position along a Hilbert curve over the smallest power-of-two
    square holding them: a run of consecutive positions is a compact region of the grid."""
    x, y = x.astype(np.int64), y.astype(np.int64)
    side = 1 << max(int(max(x.max(initial=0), y.max(initial=0))).bit_length(), 1)
    d = np.zeros(len(x), np.int64)
    s = side >> 1
    while s > 0:
        rx, ry = (x & s) > 0, (y & s) > 0
        d += s * s * ((3 * rx) ^ ry)
        flip = ~ry & rx  # the quadrant's rotation (Wikipedia's xy2d)
        x, y = np.where(flip, side - 1 - x, x), np.where(flip, side - 1 - y, y)
        x, y = np.where(~ry, y, x), np.where(~ry, x, y)
        s >>= 1
    return d


def neighbour_safe_split(row: np.ndarray, col: np.ndarray, fractions: tuple[float, float, float], seed: int
                         ) -> tuple[dict[str, np.ndarray], int]:
    """Each split's items (indices into ``row``/``col``, an item's grid position), such that no two
    neighbouring positions (8-neighbourhood) hold items of different splits; and how many positions
    the items occupy.

    The grid's occupied cells are ordered along a Hilbert curve starting at a seeded cell; val is the
    first run of that order and test a later one (midway along what val leaves), each grown until the
    items it keeps come closest to its fraction of all items (at least one where any can be kept);
    train is the rest. A
    val or test cell next to a cell of another split is left out (with its items): one compact
    region per split keeps that border, the rule's cost, small (~4 / sqrt(cells of the region) of
    the region; on a dense 40 x 40 grid at 80/10/10 ~6% of the items, ~1% at 100,000 cells), where
    blocks dealt at random lose most of a small block (3/4 of a 4 x 4 one)."""
    place = ((row.astype(np.int64) + _OFFSET) << 23) + (col.astype(np.int64) + _OFFSET)
    cells, inverse, counts = np.unique(place, return_inverse=True, return_counts=True)
    del place  # 3M items make every array count: temporaries go as they go, ranks are int32
    n = len(cells)
    r, c = (cells >> 23) - _OFFSET, (cells & _MASK) - _OFFSET
    curve = hilbert_index(r - r.min(initial=0), c - c.min(initial=0))
    del r, c
    rank = np.empty(n, np.int32 if n < 2**31 else np.int64)
    start = int(np.random.default_rng(seed).integers(n)) if n else 0
    rank[np.argsort(curve, kind="stable")] = (np.arange(n) - start) % max(n, 1)
    del curve
    low, high = rank.copy(), rank.copy()  # the smallest and largest rank of a cell and its neighbours
    for dr, dc in _NEIGHBOURS:
        near = cells + (dr << 23) + dc
        j = np.minimum(np.searchsorted(cells, near), max(n - 1, 0))
        hit = np.flatnonzero(cells[j] == near) if n else np.zeros(0, np.int64)  # each cell at most once
        low[hit] = np.minimum(low[hit], rank[j[hit]])
        high[hit] = np.maximum(high[hit], rank[j[hit]])
    total = int(counts.sum())
    # a cell of the run [begin, end) keeps its items iff all its neighbours are in it: begin <= low, high < end
    val_end = _run_end(high, counts, fractions[1] * total, 0, n - 2)  # a cell at least for test and train
    # test starts midway along what val leaves beyond the cells it should need (as many as val's per item),
    # so that train lies between the two regions and test's rim is not also val's
    need = round(val_end * fractions[2] / fractions[1]) if fractions[1] > 0 else 0
    test_begin = val_end + max(n - val_end - need, 0) // 2
    in_test = low >= test_begin
    test_end = _run_end(high[in_test], counts[in_test], fractions[2] * total, test_begin, n - 1)
    split = np.where((rank >= test_end) | ((rank >= val_end) & (rank < test_begin)), 0, -1)  # train; the rest
    split[high < val_end] = SPLITS.index("val")  # val and test cells whose neighbours are all theirs
    split[in_test & (high < test_end)] = SPLITS.index("test")
    of_item = split[inverse]
    return {s: np.flatnonzero(of_item == i) for i, s in enumerate(SPLITS)}, n


def _run_end(high: np.ndarray, counts: np.ndarray, target: float, begin: int, last_end: int) -> int:
    """The end (at most ``last_end``, unless that is before ``begin``) of a run starting at ``begin``
    whose kept items (those of cells with ``high < end``) come closest to ``target`` (the shorter run
    of equally close ones; at least one item where ``target`` > 0 and one can be kept)."""
    high, counts = high[high < last_end], counts[high < last_end]
    order = np.argsort(high, kind="stable")
    ends = high[order] + 1  # the run's end that keeps each cell, ascending
    kept = np.cumsum(counts[order])
    last = np.r_[ends[1:] != ends[:-1], True] if len(ends) else np.zeros(0, bool)
    ends, kept = np.r_[begin, ends[last]], np.r_[0, kept[last]]  # each possible end and what it keeps
    if target > 0 and len(kept) > 1:
        ends, kept = ends[1:], kept[1:]
    return int(ends[np.argmin(np.abs(kept - target))])


def split_report(splits: dict[str, np.ndarray], total: int, fractions: tuple[float, float, float],
                 cells: int) -> str:
    """One line: what each split got against what was asked, and what the neighbour rule left out."""
    got = ", ".join(f"{s} {len(splits[s]) / max(total, 1):.1%} (asked {f:.0%})" for s, f in zip(SPLITS, fractions))
    left = total - sum(len(v) for v in splits.values())
    return (f"split of {total} items in {cells} grid cells: {got}; {left} items ({left / max(total, 1):.1%}) "
            "left out, val/test cells next to another split's (neighbouring cells are never in different "
            "splits; the border costs more on a small or sparse grid: use more cells, or other fractions)")


def parse_keys(keys: np.ndarray, rows: np.ndarray | None = None, cells_only: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each key's (of ``keys[rows]``) grid cell (``S``), its (row, column) (:func:`cell_position`),
    acquisition day (days since 1970; ``majortom.KEY``'s date) and its cell string as one int64
    (equal for equal strings; -1 where a string could spell the number otherwise, e.g. ``03U``),
    vectorised a chunk at a time; a key not in the plain ASCII form is parsed by ``majortom.KEY``
    itself. ``cells_only``: ``keys`` are grid cells (day 0)."""
    keys = np.asarray(keys, dtype=np.bytes_)
    n = len(keys) if rows is None else len(rows)
    if n == 0:
        empty = np.zeros(0, np.int64)
        return np.zeros(0, "S1"), empty, empty, empty, empty
    chunks = [_parse_chunk(keys[i : i + _CHUNK] if rows is None else keys[rows[i : i + _CHUNK]], cells_only)
              for i in range(0, n, _CHUNK)]
    return tuple(np.concatenate(c) for c in zip(*chunks))  # type: ignore[return-value]


_CHUNK = 1 << 16  # keys parsed at once: bounds the temporaries (each a copy of the chunk's keys)


def _parse_chunk(keys: np.ndarray, cells_only: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
    # the cell string as one number (row, U/D, column, L/R), where the string is that number's only spelling
    row_digits, col_digits = _digits(np.abs(row)), _digits(np.abs(col))
    ident = np.where(ok & (ends == row_digits + col_digits + 3),
                     ((np.abs(row) * 2 + (up == b"D")) << 32) + np.abs(col) * 2 + (right == b"L"), -1)
    return cells, row, col, days, ident


_EPOCH = date(1970, 1, 1).toordinal()


def _digits(values: np.ndarray) -> np.ndarray:
    """How many decimal digits each non-negative int has."""
    return 1 + sum((values >= 10**k).astype(np.int64) for k in range(1, 19))


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
