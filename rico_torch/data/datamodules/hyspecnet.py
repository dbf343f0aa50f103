"""HySpecNet-11k DataModule."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from ...catalog import hyspecnet
from ...errors import ConfigError, DatasetNotFoundError, UnknownKeyError
from ...manifest import KeyRows, decode_keys
from .base import LMDBDataModule, LoaderKind, SplitOwner


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
        self._owner: SplitOwner | None = None  # which split file listed each row first

    def split_items(self, split: str):
        path = self.split_dir / self.difficulty / f"{split}.csv"
        if not path.exists():
            raise DatasetNotFoundError(f"{path}: HySpecNet-11k split file missing; set split_dir to the dataset's "
                                       "splits/ folder (holding easy/ and hard/)")
        keys = split_file_keys(path)
        rows = self.key_rows(keys)
        missing = decode_keys(keys[~self.has_keys(keys) if rows is None else rows < 0])
        if missing:
            raise UnknownKeyError(f"{path}: {len(missing)} of its {len(keys)} patches are not in {self.lmdb_path}, "
                                  f"e.g. {missing[0]!r}; is split_dir this LMDB's dataset?")
        # each split file's rows against those read before: rows of the mapped key column, or of
        # the sorted stored keys (no manifest: rico-hdl's LMDB)
        column = KeyRows(self.manifest(), rows).column() if rows is not None else self.stored_keys()
        if self._owner is None:
            self._owner = SplitOwner(len(column))
        self._owner.claim(split, rows if rows is not None else np.searchsorted(column, keys), column, path.parent)
        return (keys if rows is None else KeyRows(self.manifest(), rows)), None


_PLAIN = np.zeros(256, bool)
_PLAIN[0x21:0x7F] = True  # printable ASCII without the space
_PLAIN[0x0A] = True
_PLAIN_BYTES = bytes(np.flatnonzero(_PLAIN).astype(np.uint8))  # bytes.translate deletes these


def split_file_keys(path: Path) -> np.ndarray:
    """The keys a split file lists, in its order, as an ``S`` array: each non-blank line
    ``<tile>/<patch>/<patch>-DATA.npy`` gives its parent folder's name, the patch key (as
    ``Path(line.strip()).parent.name``). Read a block of lines at a time; lines of three plain path
    parts are cut out of the block's bytes at once, any other line is read with ``Path`` itself, and
    a file with spaces, other line breaks or non-ASCII bytes line by line as before.

    The keys are held once, written into one array sized from the first block's keys per byte
    (exact where every line is as long, as in the dataset's files; grown once, to a count of the
    remaining lines, where a later block holds more), not joined from the blocks' arrays at the end
    (which held them twice: 2.1M keys of 94 B, 400 MB); widened, a copy, only where a later block
    holds a longer key."""
    size = path.stat().st_size
    out, filled, rest = None, 0, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            data = rest + block
            end = len(data) if not block else data.rfind(b"\n") + 1
            data, rest = data[:end], data[end:]
            if data:
                keys = _block_keys(data)
                if keys is None:
                    del out
                    names = [Path(line.strip()).parent.name for line in path.read_text().splitlines() if line.strip()]
                    return np.array(names, dtype=np.bytes_) if names else np.zeros(0, "S1")
                if out is None:
                    out = np.zeros(size * len(keys) // len(data) + 1, keys.dtype)
                if filled + len(keys) > len(out):  # shorter lines further on: count the rest once
                    position = f.tell()
                    chunks = iter(lambda: f.read(_BLOCK), b"")
                    more = rest.count(b"\n") + 1 + sum(chunk.count(b"\n") + 1 for chunk in chunks)
                    f.seek(position)
                    out.resize(filled + len(keys) + more + 1, refcheck=False)
                if keys.itemsize > out.itemsize:
                    out = out.astype(keys.dtype)
                out[filled : filled + len(keys)] = keys
                filled += len(keys)
            if not block:
                break
    if out is None:  # an empty file
        return np.zeros(0, "S1")
    if filled < len(out):  # blank lines, or the estimate's spare rows: shrink in place (no copy of the keys)
        out.resize(filled, refcheck=False)
    return out


_BLOCK = 4 << 20  # bytes of a split file read and cut at once
_CHUNK = 1 << 12  # lines whose keys are cut out at once (an index array of _CHUNK x the key width)


def _block_keys(data: bytes) -> np.ndarray | None:
    """:func:`split_file_keys` of whole lines; None where the bytes are not plain."""
    buf = np.frombuffer(data, np.uint8)
    if data.translate(None, _PLAIN_BYTES):  # some byte is not plain (one C pass, no bool array)
        return None
    same = _same_form_keys(buf, data)
    if same is not None:
        return same
    breaks = np.flatnonzero(buf == 0x0A)
    starts, ends = np.r_[0, breaks + 1], np.r_[breaks, len(buf)]
    lines = ends > starts
    starts, ends = starts[lines], ends[lines]
    slashes = np.flatnonzero(buf == 0x2F)
    first = np.searchsorted(slashes, starts)
    count = np.searchsorted(slashes, ends) - first
    one = slashes[np.minimum(first, max(len(slashes) - 1, 0))] if len(slashes) else np.zeros(len(starts), np.int64)
    two = slashes[np.minimum(first + 1, max(len(slashes) - 1, 0))] if len(slashes) else np.zeros(len(starts), np.int64)

    def is_dot(a, b):  # the part [a, b) is "."
        return (b - a == 1) & (buf[np.minimum(a, len(buf) - 1)] == 0x2E)

    plain = (count == 2) & (one > starts) & (two > one + 1) & (ends > two + 1) & \
        ~is_dot(starts, one) & ~is_dot(one + 1, two) & ~is_dot(two + 1, ends)
    width = max(int((two - one - 1)[plain].max()) if plain.any() else 1, 1)
    keys = np.zeros(len(starts), f"S{width}")
    length = two - one - 1
    full = np.flatnonzero(plain & (length == width))  # most lines: the key is ``width`` bytes, none past the line
    for at in range(0, len(full), _CHUNK):  # the middle part, cut out a chunk of lines at a time
        chunk = full[at : at + _CHUNK]
        keys[chunk] = buf[(one[chunk] + 1)[:, None] + np.arange(width)].view(f"S{width}").ravel()
    short = np.flatnonzero(plain & (length < width))
    for at in range(0, len(short), _CHUNK):  # shorter keys: padded with zeros
        chunk = short[at : at + _CHUNK]
        index = one[chunk, None] + 1 + np.arange(width)
        inside = index < two[chunk, None]
        chars = np.where(inside, buf[np.minimum(index, len(buf) - 1)], 0).astype(np.uint8)
        keys[chunk] = np.ascontiguousarray(chars).view(f"S{width}").ravel()
    other = np.flatnonzero(~plain)
    if len(other):
        names = [Path(data[a:b].decode().strip()).parent.name.encode()
                 for a, b in zip(starts[other].tolist(), ends[other].tolist())]
        keys = keys.astype(f"S{max(width, max(map(len, names)), 1)}")
        keys[other] = names
    return keys


def _same_form_keys(buf: np.ndarray, data: bytes) -> np.ndarray | None:
    """:func:`_block_keys` of plain lines that are all as long as the first, with its two slashes
    at the same places (the dataset's files: fixed-width tile and patch names): the middle part is
    one column range of the lines' byte matrix. None for any other block."""
    width = data.find(b"\n")
    if width < 1 or len(data) % (width + 1):
        return None
    one = data.find(b"/", 0, width)
    two = data.find(b"/", one + 1, width)
    if not (one >= 2 and two >= one + 3 and width >= two + 3) or data.find(b"/", two + 1, width) >= 0:
        return None  # not three parts, or a part of one byte (perhaps ".")
    lines = buf.reshape(-1, width + 1)
    if not ((lines[:, width] == 0x0A).all() and (lines[:, one] == 0x2F).all() and (lines[:, two] == 0x2F).all()
            and np.count_nonzero(buf == 0x2F) == 2 * len(lines)):
        return None
    return np.ascontiguousarray(lines[:, one + 1 : two]).view(f"S{two - one - 1}").ravel()
