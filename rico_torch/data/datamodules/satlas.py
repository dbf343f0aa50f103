"""SatlasPretrain DataModule: image time series of a tile with its raster labels."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ...catalog import satlas
from ...errors import ConfigError, DatasetNotFoundError, FormatError
from ...format import parse_header, view
from ...manifest import decode_keys
from ._text import ascii_ints, json_rows
from ..dataset import LMDBPatchDataset, SampleList, _empty, _unbatch
from .base import LMDBDataModule, LoaderKind

#: Zoom levels between a NAIP tile (zoom 17) and its label tile (zoom 13).
NAIP_LEVELS = 4


@dataclass(frozen=True)
class SatlasItem:
    """One sample: a tile's images (oldest first, at most ``num_images``) and its label key.

    ``window``: for a tile finer than its label tile (NAIP), the label pixels it covers
    ``(row, col, height, width)``.
    """

    name: str
    images: tuple[str, ...]
    label: str | None
    window: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class SatlasItems:
    """A split's items as arrays (no Python object per item, cheap to pickle to workers).

    ``names``: item names (``S``); ``series``: n x T rows of the image keys (``images`` of
    :class:`SatlasTiles`), oldest first, -1 in front where fewer; ``labels``: label keys (``S``,
    ``b""``: none); ``windows``: n x 4 NAIP label windows ``(row, col, height, width)``, or None.
    """

    names: np.ndarray
    series: np.ndarray
    labels: np.ndarray
    windows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names)

    def item(self, index: int, keys: np.ndarray) -> SatlasItem:
        """Item ``index`` as a :class:`SatlasItem`, its images named by ``keys`` (the rows' keys)."""
        rows = self.series[index]
        label = self.labels[index].decode()
        window = None if self.windows is None else tuple(int(v) for v in self.windows[index])
        return SatlasItem(self.names[index].decode(), tuple(keys[r].decode() for r in rows[rows >= 0].tolist()),
                          label or None, window)  # type: ignore[arg-type]


class _ItemView(Sequence):
    """:class:`SatlasTiles`' items as :class:`SatlasItem`, made when asked for."""

    def __init__(self, tiles: "SatlasTiles") -> None:
        self.tiles = tiles

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.tiles.arrays.item(range(len(self))[index], self.tiles.images._keys)


class SatlasTiles(Dataset):
    """Samples of :class:`SatlasItems`: ``image`` T x C x H x W (C x H x W for ``num_images=1``),
    float32 stored values, the most recent image last and zero images in front where fewer
    exist; one target per task (int64 for segmentation, float32 for regression, 0 = invalid,
    all 0 where the label is missing); ``key``: the item's name.

    ``images``: the :class:`~rico_torch.data.LMDBPatchDataset` whose keys the items' rows index
    (it reads the images; ``native``: each (dtype, size) group of bands unresampled, (T x) C_g x
    h x w, for :class:`~rico_torch.data.NativeAssembler` to finish on the device).
    """

    def __init__(self, images: LMDBPatchDataset, items: SatlasItems, tasks: Sequence[str], num_images: int) -> None:
        self.images, self.arrays, self.tasks, self.num_images = images, items, list(tasks), num_images
        self.native = images.native
        self.size = images.size

    @property
    def items(self) -> Sequence[SatlasItem]:
        return _ItemView(self)

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _unbatch(self.read_batch([index]), 0)

    def __getitems__(self, indices: Sequence[int]) -> SampleList:
        batch = self.read_batch(list(indices))
        return SampleList([_unbatch(batch, row) for row in range(len(indices))], batch=batch)

    def read_batch(self, indices: list[int]) -> dict[str, Any]:
        indices = list(indices)
        n, t = len(indices), self.num_images
        series = self.arrays.series[indices]
        if t == 1:  # one image per item: read straight into the batch
            read = self.images.read_batch(series[:, -1].tolist())
            batch: dict[str, Any] = {"native": read["native"]} if self.native else {"image": read["image"]}
        else:
            batch = self._series(series)
        batch["key"] = [self.arrays.names[i].decode() for i in indices]
        for task in self.tasks:
            dtype = np.float32 if satlas.TASKS[task][0] == "regression" else np.int64
            batch[task], array = _empty((n, *self.size), np.dtype(dtype))
            array.fill(0)
        windows = self.arrays.windows
        with self.images.store.reader() as reader:
            for row, index in enumerate(indices):
                label = self.arrays.labels[index]
                if not label:
                    continue
                value = reader.get(label)
                header = parse_header(value, label.decode())
                window = None if windows is None else tuple(windows[index].tolist())
                for task in self.tasks:
                    if task in header:
                        batch[task][row] = self._label(view(value, header[task]), window)
        return batch

    def _series(self, series: np.ndarray) -> dict[str, Any]:
        """T images per item, zero images in front where an item has fewer."""
        n, t = series.shape
        wanted, at = np.unique(series[series >= 0], return_inverse=True)
        where = np.full(series.shape, -1, np.int64)
        where[series >= 0] = at
        read = self.images.read_batch(wanted.tolist())
        parts = read["native"] if self.native else {"image": read["image"]}
        out: dict[str, torch.Tensor] = {}
        for name, part in parts.items():
            tensor, array = _empty((n, t, *part.shape[1:]), part.numpy().dtype)
            for row in range(n):
                present = where[row] >= 0
                pad = t - int(present.sum())
                array[row, :pad] = 0
                array[row, pad:] = part.numpy()[where[row][present]]
            out[name] = tensor
        return {"native": out} if self.native else out

    def _label(self, array: np.ndarray, window: tuple[int, int, int, int] | None) -> torch.Tensor:
        """A label band as a tensor of the output size (a NAIP tile's window of it, nearest)."""
        if window is not None:
            r, c, h, w = window
            array = array[r : r + h, c : c + w]
        label = torch.from_numpy(np.array(array))
        if tuple(label.shape) != tuple(self.size):
            label = F.interpolate(label[None, None].float(), size=self.size, mode="nearest")[0, 0]
        return label


def _load_json(path: Path, what: str, fix: str = ""):
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: SatlasPretrain {what} missing; set metadata_dir to the dataset's "
                                   f"metadata/ folder (the encoder copies it beside data.mdb){fix}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: unreadable JSON ({e})") from None


def _col_row(entry: Any, path: Path) -> tuple[int, int]:
    try:
        col, row = entry[:2]
        return int(col), int(row)
    except (TypeError, ValueError):
        raise FormatError(f"{path}: entry {entry!r} is not [col, row]") from None


#: Bits of each field of a packed (image, col, row) or (col, row) code: tiles up to zoom 18,
#: 2**27 images.
_TILE_BITS = 18
_TILE_LIMIT = 1 << _TILE_BITS
_IMAGE_LIMIT = 1 << (63 - 2 * _TILE_BITS)
_CHUNK = 1 << 16  # keys parsed at once: bounds the temporaries (each a copy of the chunk's keys)


def _pack(*fields: np.ndarray) -> np.ndarray:
    """Fields (each below :data:`_TILE_LIMIT`, the first below :data:`_IMAGE_LIMIT`) as one int64."""
    out = np.asarray(fields[0], np.int64)
    for field in fields[1:]:
        out = (out << _TILE_BITS) | np.asarray(field, np.int64)
    return out


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` by a sort in place (numpy's hashing unique is ~5x slower on millions)."""
    values.sort()
    new = np.ones(len(values), bool)
    new[1:] = values[1:] != values[:-1]
    return values[new]


def _contains(sorted_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    if not len(sorted_codes):
        return np.zeros(len(codes), bool)
    at = np.minimum(np.searchsorted(sorted_codes, codes), len(sorted_codes) - 1)
    return sorted_codes[at] == codes


def _tile_names(col: np.ndarray, row: np.ndarray) -> np.ndarray:
    """``<col>_<row>`` names (``S``) of integer tiles (each below :data:`_TILE_LIMIT`), written
    digit by digit into one byte matrix (no Python int or string per tile)."""
    col, row = np.asarray(col, np.int64), np.asarray(row, np.int64)
    if not len(col):
        return np.zeros(0, "S1")
    digits = len(str(_TILE_LIMIT - 1))
    out = np.zeros((len(col), 2 * digits + 1), np.uint8)
    col_width = _digit_count(col, digits)
    row_width = _digit_count(row, digits)
    lines = np.arange(len(col))
    for k in range(digits):  # the k-th digit from the right of each number, where it has one
        for value, width, start in ((col, col_width, 0), (row, row_width, col_width + 1)):
            has = k < width
            out[lines[has], (start + width - 1 - k)[has]] = value[has] // 10**k % 10 + 48
    out[lines, col_width] = ord("_")
    return out.view(f"S{2 * digits + 1}").ravel()


def _digit_count(values: np.ndarray, most: int) -> np.ndarray:
    width = np.ones(len(values), np.int64)
    for k in range(1, most):
        width += values >= 10**k
    return width


def _tile_fields(names: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of ``S`` names: their :func:`_pack` codes (-1 unless ``<col>_<row>`` in range and the
    tile's own name), which are ``<digits>_<digits>``, and which of those write both numbers
    without leading zeros (``007_5`` is no tile's own name)."""
    if not len(names):
        return np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool)
    col_text, sep, row_text = np.strings.partition(names.astype(f"S{max(names.dtype.itemsize, 1)}"), b"_")
    shaped = (sep == b"_") & np.strings.isdigit(col_text) & np.strings.isdigit(row_text)
    own = shaped & ((np.strings.str_len(col_text) == 1) | ~np.strings.startswith(col_text, b"0")) & (
        (np.strings.str_len(row_text) == 1) | ~np.strings.startswith(row_text, b"0"))
    ok = own & (np.strings.str_len(col_text) <= 6) & (np.strings.str_len(row_text) <= 6)
    col = ascii_ints(np.where(ok, col_text, b"0").astype("S6"))
    row = ascii_ints(np.where(ok, row_text, b"0").astype("S6"))
    ok &= (col < _TILE_LIMIT) & (row < _TILE_LIMIT)
    return np.where(ok, _pack(col, row), -1), shaped, own


def _tile_codes(names: np.ndarray) -> np.ndarray:
    """:func:`_pack` codes of ``<col>_<row>`` names (``S``); -1 for any other form."""
    return _tile_fields(names)[0]


def _lookup(names: np.ndarray, code) -> np.ndarray:
    """``code(name)`` of each of ``names`` (``S``) as int64, called once per distinct name. The
    names are told apart by a 64-bit hash (an integer sort, not a string sort), checked against the
    names themselves."""
    if not len(names):
        return np.zeros(0, np.int64)
    words = -(-max(names.dtype.itemsize, 1) // 8)
    names = names.astype(f"S{8 * words}")  # NUL-padded to whole 8-byte words
    hashed = np.full(len(names), 14695981039346656037, np.uint64)  # FNV-1a, a word at a time
    for word in names.view(np.uint64).reshape(len(names), words).T:
        hashed = (hashed ^ word) * np.uint64(1099511628211)
        hashed ^= hashed >> np.uint64(29)  # mixes a word's high bytes into the low ones
    _, first, inverse = np.unique(hashed, return_index=True, return_inverse=True)
    if not (names[first][inverse.ravel()] == names).all():  # two names, one hash: tell them apart by sorting
        _, first, inverse = np.unique(names, return_index=True, return_inverse=True)
    values = np.array([code(name) for name in names[first].tolist()], np.int64)
    return values[inverse.ravel()]


def _no_items(naip: bool) -> SatlasItems:
    return SatlasItems(np.zeros(0, "S1"), np.zeros((0, 1), np.int64), np.zeros(0, "S1"),
                       np.zeros((0, 4), np.int32) if naip else None)


@dataclass(frozen=True)
class ImageKeys:
    """Image keys ``<modality>/<image>/<col>_<row>`` parsed: their ``rows`` in the key array,
    ``image`` codes (``codes``: image name -> code), tile ``col`` and ``row``, and ``packed``
    (:func:`_pack` of image, col, row)."""

    rows: np.ndarray
    image: np.ndarray
    col: np.ndarray
    row: np.ndarray
    codes: dict[bytes, int]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def packed(self) -> np.ndarray:
        return _pack(self.image, self.col, self.row)

    def take(self, rows: np.ndarray) -> "ImageKeys":
        return ImageKeys(self.rows[rows], self.image[rows], self.col[rows], self.row[rows], self.codes)


def parse_image_keys(keys: np.ndarray, modality: str) -> ImageKeys:
    """The keys of ``modality`` among ``keys`` (an ``S`` array), parsed a chunk at a time. A key
    with a tile that is not its own name (``007_5``) is left out, as no split names it; a key
    outside the rule is a :class:`ConfigError`."""
    prefix = f"{modality}/".encode()
    codes: dict[bytes, int] = {}
    parts = []
    row_type = np.int32 if len(keys) < 2**31 else np.int64
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        mine = np.flatnonzero(np.strings.startswith(chunk, prefix))
        if not len(mine):
            continue
        some = chunk[mine]
        slash = np.strings.find(some, b"/", len(prefix))
        last = np.strings.rfind(some, b"/")
        tile_text = np.strings.slice(some, last + 1, None)
        tile, shaped, own = _tile_fields(tile_text)
        bad = (slash != last) | (slash <= len(prefix)) | ~shaped
        bad |= (tile < 0) & own  # its own name, but beyond the packed range
        if bad.any():
            key = some[np.argmax(bad)].decode(errors="replace")
            raise ConfigError(f"{key!r} is not a SatlasPretrain {modality} image key "
                              f"(<modality>/<image>/<col>_<row>, col and row below {_TILE_LIMIT})")
        keep = tile >= 0
        names = np.strings.slice(some[keep], len(prefix), slash[keep])
        image = _lookup(names, lambda name: codes.setdefault(name, len(codes)))
        parts.append(((mine[keep] + start).astype(row_type), image.astype(np.int32),
                      (tile[keep] >> _TILE_BITS).astype(np.int32), (tile[keep] & (_TILE_LIMIT - 1)).astype(np.int32)))
    if len(codes) >= _IMAGE_LIMIT:
        raise ConfigError(f"{len(codes):,} SatlasPretrain {modality} images: more than {_IMAGE_LIMIT:,} are not "
                          "supported")
    if not parts:
        empty = np.zeros(0, np.int32)
        return ImageKeys(empty, empty, empty, empty, codes)
    return ImageKeys(*(np.concatenate(p) for p in zip(*parts)), codes=codes)


class SatlasDataModule(LMDBDataModule):
    """SatlasPretrain: time series of a modality's images per tile, with raster label tasks.

    Args:
        lmdb_path: the encoded dataset (``python -m rico_torch.encode satlas ...``), or its shards.
        metadata_dir: the dataset's ``metadata/`` folder; default: the copy beside ``data.mdb``.
        modality: ``sentinel2``, ``sentinel1``, ``landsat`` or ``naip``.
        bands: band keys in order; default the modality's usual set (Sentinel-2: the 9 bands
            R, G, B, b05, b06, b07, b08, b11, b12 of the released models).
        tasks: raster label tasks (``land_cover``, ``crop_type``, ``tree_cover``, ``dem`` are
            static; ``water_event``, ``water``, ``cloud``, ``wildfire`` dynamic; not mixed).
        split: which split files: ``lowres`` (``train_lowres.json`` / ``test_lowres.json``),
            ``highres`` or ``event``.
        val_fraction: share of the train split's tiles held out for validation (seeded; at
            least one tile when above 0, at least one left for training).
        good_images: keep only images ``good_images_{lowres,highres}_all.json`` lists for the
            tile (fewer than 20% black or white pixels), as the released code does.
        num_images: images per sample, sorted by time, most recent last (for a dynamic label, the
            image its ``vector.json`` names is the last); zero images in front where fewer exist.
            ``image`` is T x C x H x W, or C x H x W for 1.
        normalise: the released weights' normalisation on the device (tci and other Sentinel-2
            bands / 255, Sentinel-1 / 255, NAIP / 255, Landsat clip((v - 4000) / 16320, 0, 1)).
        native: load bands in their dtype and size and cast, upsample (nearest) and normalise
            them batched on the device; ``auto``: when the trainer runs on a CUDA GPU.
        loader: ``torch`` only: an item is assembled per sample from several LMDB values (the
            series' images, zero-padded in front, and one label tile per task, all 0 where
            missing) by :class:`SatlasTiles`; PatchLoader's workers fill fixed batch slots with
            :class:`LMDBPatchDataset`'s in-place reader, which reads one value (or one tuple of
            values) per item into one image.

    Samples: ``image``, one target per task (segmentation int64 H x W, regression float32
    H x W; 0 = invalid; all 0 where the label file is missing) and ``key``.
    """

    name = "satlas"
    catalog = satlas.DATASET
    rgb_bands = ("tci_r", "tci_g", "tci_b")

    def __init__(
        self,
        lmdb_path: str | list[str],
        metadata_dir: str | None = None,
        modality: str = "sentinel2",
        bands: list[str] | None = None,
        tasks: list[str] | None = None,
        split: str = "lowres",
        val_fraction: float = 0.1,
        good_images: bool = True,
        num_images: int = 1,
        normalise: bool = True,
        native: bool | Literal["auto"] = "auto",
        batch_size: int = 16,
        num_workers: int = 2,
        pin_memory: bool = False,
        flips: bool = False,
        readahead: bool = False,
        seed: int = 0,
        loader: LoaderKind = "torch",
    ) -> None:
        if loader != "torch":
            raise ConfigError(f"SatlasDataModule: loader={loader!r} cannot read SatlasPretrain's series and label "
                              "tiles (assembled per sample); use loader: torch")
        if modality not in satlas.MODALITIES:
            raise ConfigError(f"modality {modality!r} is not one of {list(satlas.MODALITIES)}")
        bands = list(bands or satlas.DEFAULT_BANDS[modality])
        valid = satlas.DATASET.source(modality).band_names
        unknown = [b for b in bands if b not in valid]
        if unknown:
            raise ConfigError(f"unknown SatlasPretrain {modality} band(s) {unknown}; valid: {list(valid)}")
        super().__init__(lmdb_path, bands, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         mean=[0.0] * len(bands), std=[1.0] * len(bands), flips=flips, native=native,
                         readahead=readahead, seed=seed, loader=loader)
        self.tasks = list(tasks if tasks is not None else ["land_cover"])
        bad = [t for t in self.tasks if t not in satlas.TASKS]
        if bad:
            raise ConfigError(f"unknown SatlasPretrain task(s) {bad}; valid: {list(satlas.TASKS)}")
        folders = {satlas.TASKS[t][1] for t in self.tasks}
        if len(folders) > 1:
            raise ConfigError(f"tasks {self.tasks} mix static and dynamic labels; train them separately")
        self.label_folder = folders.pop() if folders else "static"
        if split not in satlas.SPLITS:
            raise ConfigError(f"split {split!r} is not one of {list(satlas.SPLITS)}")
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"val_fraction {val_fraction} is not in [0, 1)")
        if num_images < 1:
            raise ConfigError(f"num_images {num_images} is not >= 1")
        self.metadata_dir = Path(metadata_dir) if metadata_dir is not None else self.lmdb_path / "metadata"
        self.modality, self.split, self.val_fraction = modality, split, val_fraction
        self.good_images, self.num_images, self.normalise = good_images, num_images, normalise
        self._items: dict[str, SatlasItems] | None = None
        self._images: LMDBPatchDataset | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        first = self.tasks[0] if self.tasks else None
        return satlas.TASKS[first][2] if first and satlas.TASKS[first][0] == "segmentation" else ()

    # --- items ----------------------------------------------------------------------------

    def split_tiles(self) -> dict[str, list[str]]:
        """Tiles (``<col>_<row>``, zoom 13) of train, val and test: val is ``val_fraction`` of
        the train file's tiles, drawn with ``seed``."""
        return {split: decode_keys(tiles) for split, tiles in self._split_arrays().items()}

    def _split_arrays(self) -> dict[str, np.ndarray]:
        """:meth:`split_tiles` as sorted ``S`` arrays."""
        tiles = {}
        for part in ("train", "test"):
            path = self.metadata_dir / f"{part}_{self.split}.json"
            if not path.is_file():
                _load_json(path, "split file")  # names the missing file

            def entries(path=path):
                numbers = [_col_row(e, path) for e in _load_json(path, "split file")]
                return np.array(numbers, np.int64).reshape(len(numbers), 2), None

            col_row = json_rows(path, 2, False, lambda numbers, _: numbers, entries)
            tiles[part] = _sorted_unique(_tile_names(col_row[:, 0], col_row[:, 1]))
        train = tiles["train"]
        order = np.random.default_rng(self.seed).permutation(len(train))
        n_val = int(round(len(order) * self.val_fraction))
        if self.val_fraction > 0 and len(order) > 1:
            n_val = min(max(n_val, 1), len(order) - 1)  # a few tiles: still one for val, one for train
        val = np.sort(order[:n_val])
        return {"train": np.delete(train, val), "val": train[val], "test": tiles["test"]}

    def _good(self, codes: dict[bytes, int]) -> np.ndarray | None:
        """The good images (``good_images_*_all.json``) among the stored ones (``codes``: image
        name -> code), as sorted :func:`_pack` codes of (image, col, row); None: no filter."""
        if not self.good_images:
            return None
        kind = "highres" if self.modality == "naip" else "lowres"
        path = self.metadata_dir / f"good_images_{kind}_all.json"
        fix = ", or set good_images: false"
        if not path.is_file():
            _load_json(path, "good-images file", fix)  # names the missing file

        def reduce(numbers: np.ndarray, names: np.ndarray) -> np.ndarray:
            image = _lookup(names, lambda name: codes.get(name, -1))
            col, row = numbers[:, 0], numbers[:, 1]
            keep = (image >= 0) & (col >= 0) & (col < _TILE_LIMIT) & (row >= 0) & (row < _TILE_LIMIT)
            return _pack(image[keep], col[keep], row[keep])

        def entries():
            numbers, names = [], []
            for e in _load_json(path, "good-images file", fix):
                if not isinstance(e, list) or len(e) != 3:
                    raise FormatError(f"{path}: entry {e!r} is not [col, row, image name]")
                numbers.append(_col_row(e, path))
                names.append(str(e[2]).encode())
            return np.array(numbers, np.int64).reshape(len(numbers), 2), np.array(names, dtype=np.bytes_)

        return _sorted_unique(json_rows(path, 2, True, reduce, entries))

    def image_dataset(self) -> LMDBPatchDataset:
        """The dataset of every image key holding the bands, which the items' rows index (one for
        every split; its keys are the manifest's mapped column, not a copy handed to workers)."""
        if self._images is None:
            self._images = LMDBPatchDataset(self.lmdb_paths, self.bands, readahead=self.readahead,
                                            native=self.loads_native, manifests=self.path_manifests())
        return self._images

    def _keys_of(self, prefix: str) -> np.ndarray:
        """The stored keys of a label kind (``static/``, ``dynamic/``), an ``S`` array."""
        manifest = self.manifest()
        name = prefix.rstrip("/")
        if manifest and manifest.has_keys:
            return manifest.key_array([name]) if name in manifest.sources() else np.zeros(0, "S1")
        stored = self.stored_keys()
        return stored[np.strings.startswith(stored, prefix.encode())]

    def build_items(self) -> dict[str, SatlasItems]:
        """Every split's items (see the class docstring), as arrays over :meth:`image_dataset`'s keys."""
        splits = self._split_arrays()
        manifest = self.manifest()
        if manifest and manifest.has_keys and self.modality not in manifest.sources():
            return {split: _no_items(self.modality == "naip") for split in splits}
        keys = self.image_dataset()._keys
        found = parse_image_keys(keys, self.modality)
        if len(self.lmdb_paths) > 1:  # a key in two shards: its first row
            _, first = np.unique(found.packed, return_index=True)
            found = found.take(np.sort(first))
        stored = found if self.label_folder == "dynamic" else None  # a dynamic label's own image: good or not
        good = self._good(found.codes)
        if good is not None:
            found = found.take(np.flatnonzero(_contains(good, found.packed) | (
                _contains(good, _pack(found.image, *self._label_tile(found.col, found.row)))
                if self.modality == "naip" else False)))
        times = satlas.image_times(self.metadata_dir)
        names = list(found.codes)
        when = [satlas.image_time(n.decode(), times) for n in names]  # an image's time, by code
        rank = np.zeros(len(names), np.int64)  # entries sort by (time, image name)
        rank[sorted(range(len(names)), key=lambda c: (when[c], names[c]))] = np.arange(len(names))
        found = found.take(np.lexsort((rank[found.image], _pack(*self._label_tile(found.col, found.row)))))
        if self.label_folder == "dynamic":
            return self._dynamic_items(splits, found, stored, when)
        static = self._keys_of("static/")
        labels = np.sort(_tile_codes(np.strings.slice(static, len("static/"), None)))
        return {split: self._static_items(tiles, found, labels) for split, tiles in splits.items()}

    def _label_tile(self, col: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The zoom-13 label tile of image tiles (NAIP: zoom 17, 4 levels finer)."""
        return (col >> NAIP_LEVELS, row >> NAIP_LEVELS) if self.modality == "naip" else (col, row)

    def _static_items(self, tiles: np.ndarray, found: "ImageKeys", labels: np.ndarray) -> SatlasItems:
        """A split's items: one per image tile of its label tiles (``tiles``, in order; NAIP: a
        label tile's image tiles in name order), holding the tile's last ``num_images`` images
        (``found``: sorted by label tile, then time)."""
        codes = _tile_codes(tiles)
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        label_codes = _pack(*self._label_tile(found.col, found.row))
        at = np.minimum(np.searchsorted(sorted_codes, label_codes), max(len(codes) - 1, 0))
        chosen = np.flatnonzero(sorted_codes[at] == label_codes) if len(codes) else np.zeros(0, np.int64)
        position = order[at[chosen]]  # the label tile's place in the split
        del label_codes, at
        group = position
        if self.modality == "naip":  # then the image tile's place in name order
            unique, inverse = np.unique(_pack(found.col[chosen], found.row[chosen]), return_inverse=True)
            names = _tile_names(unique >> _TILE_BITS, unique & (_TILE_LIMIT - 1))
            name_rank = np.empty(len(unique), np.int64)
            name_rank[np.argsort(names, kind="stable")] = np.arange(len(unique))
            group = position * len(unique) + name_rank[inverse.ravel()]
        sort = np.argsort(group, kind="stable")  # within a group: found's order (by time)
        chosen, group = chosen[sort], group[sort]
        new = np.ones(len(chosen), bool)
        new[1:] = group[1:] != group[:-1]
        starts = np.flatnonzero(new)
        stops = np.append(starts[1:], len(chosen)).astype(np.int64)
        t = self.num_images
        series = np.full((len(starts), t), -1, np.int64)
        for j in range(t):
            at = stops - t + j
            present = at >= starts
            series[present, j] = found.rows[chosen[at[present]]]
        first = chosen[starts]
        label_tiles = tiles[position[sort[starts]]]
        has_label = _contains(labels, _tile_codes(label_tiles))
        windows, names = None, label_tiles
        if self.modality == "naip":
            f, side = 1 << NAIP_LEVELS, 512 >> NAIP_LEVELS
            windows = np.stack([found.row[first] % f * side, found.col[first] % f * side,
                                np.full(len(first), side), np.full(len(first), side)], axis=1).astype(np.int32)
            names = _tile_names(found.col[first], found.row[first])
        return SatlasItems(
            names=np.strings.add(f"{self.modality}/".encode(), names),
            series=series,
            labels=np.where(has_label, np.strings.add(b"static/", label_tiles), b""),
            windows=windows)

    def _dynamic_items(self, splits: dict[str, np.ndarray], found: "ImageKeys", stored: "ImageKeys",
                       when: list[str]) -> dict[str, SatlasItems]:
        """Each dynamic label of a split's tiles, with its image last and up to ``num_images`` - 1
        earlier images of its tile (``found``: sorted by label tile then time) in front."""
        labelled = self._dynamic_labels(self._keys_of("dynamic/"))
        tile_codes = _pack(*self._label_tile(found.col, found.row))
        found_packed = found.packed
        stored_order = np.argsort(stored.packed, kind="stable")
        stored_sorted = stored.packed[stored_order]
        t = self.num_images
        items = {}
        for split, tiles in splits.items():
            names, series = [], []
            for tile in decode_keys(tiles):
                for label, image in labelled.get(tile, []):
                    code = stored.codes.get(image.encode())
                    col, row = map(int, tile.split("_"))
                    if code is None or max(col, row) >= _TILE_LIMIT:
                        continue  # its image is of another modality, or a mosaic ("fake")
                    packed = int(_pack(np.int64(code), np.int64(col), np.int64(row)))
                    at = int(np.searchsorted(stored_sorted, packed))
                    if at == len(stored_sorted) or stored_sorted[at] != packed:
                        continue
                    own = int(stored.rows[stored_order[at]])
                    tile_code = _pack(np.int64(col), np.int64(row))
                    lo, hi = np.searchsorted(tile_codes, [tile_code, tile_code + 1])
                    time = when[code]
                    before = [int(r) for r, c, p in zip(found.rows[lo:hi], found.image[lo:hi], found_packed[lo:hi])
                              if when[c] <= time and p != packed]
                    rows = (*before[-(t - 1):], own) if t > 1 else (own,)
                    names.append(label.encode())
                    series.append([-1] * (t - len(rows)) + list(rows))
            names_array = np.array(names, dtype=np.bytes_) if names else np.zeros(0, "S1")
            items[split] = SatlasItems(names=names_array, series=np.array(series, np.int64).reshape(len(names), t),
                                       labels=names_array)
        return items

    def _dynamic_labels(self, keys: np.ndarray) -> dict[str, list[tuple[str, str]]]:
        """Label tile -> (dynamic label key, the image its vector.json names) for the keys that
        hold one of the tasks."""
        found: dict[str, list[tuple[str, str]]] = {}
        from ..store import Store

        with Store(self.lmdb_paths, self.readahead).reader() as reader:
            for key in sorted(set(decode_keys(keys))):
                value = reader.get(key.encode())
                header = parse_header(value, key)
                if not any(t in header for t in self.tasks) or satlas.VECTOR not in header:
                    continue
                try:
                    vector = json.loads(bytes(view(value, header[satlas.VECTOR])))
                    image = vector["metadata"]["ImageName"]
                except (ValueError, KeyError, TypeError):
                    continue  # no image named: nothing to pair the label with
                found.setdefault(key.split("/")[1], []).append((key, str(image)))
        return found

    def split_items(self, split: str):
        if self._items is None:
            self._items = self.build_items()
        return self._items[split], None

    def make_dataset(self, split: str) -> SatlasTiles:
        items, _ = self.split_items(split)
        if not len(items):
            labelled = f" with {', '.join(self.tasks)} labels" if self.label_folder == "dynamic" else ""
            raise ConfigError(f"{self.lmdb_path}: the {split} split ({self.split}) has no {self.modality} images"
                              f"{labelled}; check split, modality, metadata_dir and val_fraction")
        return SatlasTiles(self.image_dataset(), items, self.tasks, self.num_images)

    def has_split(self, split: str) -> bool:
        return not (split == "val" and self.val_fraction == 0)

    def setup(self, stage: str | None = None) -> None:
        self.make_splits(stage)
        if self.loads_native and self.assembler is None and self.datasets:
            self.assembler = next(iter(self.datasets.values())).images.native_assembler()

    def example_input(self, size: int = 8) -> torch.Tensor:
        """As the base's; a series (``num_images`` > 1) is 1 x T x C x H x W."""
        image = super().example_input(size)
        return image[:, None].expand(1, self.num_images, *image.shape[1:]) if self.num_images > 1 else image

    def val_dataloader(self):
        """No validation with ``val_fraction=0``."""
        return super().val_dataloader() if "val" in self.datasets else []

    def plot(self, sample: dict[str, Any], title: str | None = None):
        """An RGB composite of a sample or batch (a series: its most recent image) beside its first
        task's target, as ``mask`` (before normalisation; float, not native)."""
        from ..plot import plot_sample

        image = sample["image"]
        batched = isinstance(sample.get("key"), list)
        if image.ndim == (5 if batched else 4):  # a series: the most recent image
            image = image[:, -1] if batched else image[-1]
        shown = {"image": image, "key": sample.get("key")}
        if self.tasks and self.tasks[0] in sample:
            shown["mask"] = sample[self.tasks[0]]
        return plot_sample(shown, self.bands, self.rgb_bands, self.classes, title=title)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if "native" in batch:
            groups = batch.pop("native")
            first = next(iter(groups.values()))
            self.assembler = self.assembler.to(first.device)
            if self.num_images > 1:  # N x T x C_g x h x w: assemble the N*T images, then unfold
                n, t = first.shape[:2]
                image = self.assembler({k: v.flatten(0, 1) for k, v in groups.items()})
                batch["image"] = image.unflatten(0, (n, t))
            else:
                batch["image"] = self.assembler(groups)
        if self.normalise:
            offset, scale = satlas.NORMALISATION[self.modality]
            image = batch["image"]  # this batch's own tensor: normalised in place (no temporaries)
            if offset:
                image.sub_(offset)
            image.div_(scale).clamp_(0, 1)
        if self.flips and self.trainer is not None and self.trainer.training:
            for dim in (-1, -2):
                if torch.rand(()) < 0.5:
                    batch["image"] = batch["image"].flip(dim)
                    for task in self.tasks:
                        batch[task] = batch[task].flip(dim)
        return batch
