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
from ..dataset import LMDBPatchDataset, SampleList, _empty, _unbatch
from .base import SPLITS, LMDBDataModule, LoaderKind

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


class SatlasTiles(Dataset):
    """Samples of :class:`SatlasItem`: ``image`` T x C x H x W (C x H x W for ``num_images=1``),
    float32 stored values, the most recent image last and zero images in front where fewer
    exist; one target per task (int64 for segmentation, float32 for regression, 0 = invalid,
    all 0 where the label is missing); ``key``: the item's name.

    ``native``: instead of ``image``, ``native`` holds each (dtype, size) group of bands
    unresampled, (T x) C_g x h x w, for :class:`~rico_torch.data.NativeAssembler` to finish on
    the device (as :class:`~rico_torch.data.LMDBPatchDataset` does).
    """

    def __init__(self, lmdb_paths: Sequence[Path], bands: Sequence[str], items: Sequence[SatlasItem],
                 tasks: Sequence[str], num_images: int, readahead: bool = False, native: bool = False,
                 manifests: Sequence | None = None) -> None:
        self.items, self.tasks, self.num_images, self.native = list(items), list(tasks), num_images, native
        keys = sorted({k for item in self.items for k in item.images})
        self.index = {k: i for i, k in enumerate(keys)}
        self.images = LMDBPatchDataset(list(lmdb_paths), list(bands), keys=keys, readahead=readahead, native=native,
                                       manifests=manifests)
        self.size = self.images.size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _unbatch(self.read_batch([index]), 0)

    def __getitems__(self, indices: Sequence[int]) -> SampleList:
        batch = self.read_batch(list(indices))
        return SampleList([_unbatch(batch, row) for row in range(len(indices))], batch=batch)

    def read_batch(self, indices: list[int]) -> dict[str, Any]:
        items = [self.items[i] for i in indices]
        n, t = len(items), self.num_images
        if t == 1:  # one image per item: read straight into the batch
            read = self.images.read_batch([self.index[item.images[0]] for item in items])
            batch: dict[str, Any] = {"native": read["native"]} if self.native else {"image": read["image"]}
        else:
            batch = self._series(items)
        batch["key"] = [item.name for item in items]
        for task in self.tasks:
            dtype = np.float32 if satlas.TASKS[task][0] == "regression" else np.int64
            batch[task], array = _empty((n, *self.size), np.dtype(dtype))
            array.fill(0)
        with self.images.store.reader() as reader:
            for row, item in enumerate(items):
                if item.label is None:
                    continue
                value = reader.get(item.label.encode())
                header = parse_header(value, item.label)
                for task in self.tasks:
                    if task in header:
                        batch[task][row] = self._label(view(value, header[task]), item.window)
        return batch

    def _series(self, items: list[SatlasItem]) -> dict[str, Any]:
        """T images per item, zero images in front where an item has fewer."""
        n, t = len(items), self.num_images
        wanted = sorted({self.index[k] for item in items for k in item.images})
        at = {index: row for row, index in enumerate(wanted)}
        read = self.images.read_batch(wanted)
        parts = read["native"] if self.native else {"image": read["image"]}
        out: dict[str, torch.Tensor] = {}
        for name, part in parts.items():
            tensor, array = _empty((n, t, *part.shape[1:]), part.numpy().dtype)
            for row, item in enumerate(items):
                pad = t - len(item.images)
                array[row, :pad] = 0
                array[row, pad:] = part.numpy()[[at[self.index[k]] for k in item.images]]
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


def _tile(col_row: Sequence[Any], path: Path) -> str:
    try:
        col, row = col_row[:2]
        return f"{int(col)}_{int(row)}"
    except (TypeError, ValueError):
        raise FormatError(f"{path}: entry {col_row!r} is not [col, row]") from None


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
        self._items: dict[str, list[SatlasItem]] | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        first = self.tasks[0] if self.tasks else None
        return satlas.TASKS[first][2] if first and satlas.TASKS[first][0] == "segmentation" else ()

    # --- items ----------------------------------------------------------------------------

    def split_tiles(self) -> dict[str, list[str]]:
        """Tiles (``<col>_<row>``, zoom 13) of train, val and test: val is ``val_fraction`` of
        the train file's tiles, drawn with ``seed``."""
        tiles = {}
        for part in ("train", "test"):
            path = self.metadata_dir / f"{part}_{self.split}.json"
            entries = _load_json(path, "split file")
            tiles[part] = sorted({_tile(e, path) for e in entries})
        order = np.random.default_rng(self.seed).permutation(len(tiles["train"]))
        n_val = int(round(len(order) * self.val_fraction))
        if self.val_fraction > 0 and len(order) > 1:
            n_val = min(max(n_val, 1), len(order) - 1)  # a few tiles: still one for val, one for train
        val = {tiles["train"][i] for i in order[:n_val]}
        return {"train": [t for t in tiles["train"] if t not in val], "val": sorted(val), "test": tiles["test"]}

    def _good(self) -> set[tuple[str, str]] | None:
        if not self.good_images:
            return None
        kind = "highres" if self.modality == "naip" else "lowres"
        path = self.metadata_dir / f"good_images_{kind}_all.json"
        entries = _load_json(path, "good-images file", ", or set good_images: false")
        good = set()
        for e in entries:
            if not isinstance(e, list) or len(e) != 3:
                raise FormatError(f"{path}: entry {e!r} is not [col, row, image name]")
            good.add((_tile(e, path), str(e[2])))
        return good

    def _label_tile(self, tile: str) -> tuple[str, tuple[int, int, int, int] | None]:
        """The zoom-13 label tile of an image tile, and the window of it the image covers."""
        if self.modality != "naip":
            return tile, None
        col, row = map(int, tile.split("_"))
        f = 1 << NAIP_LEVELS
        side = 512 // f
        return f"{col // f}_{row // f}", ((row % f) * side, (col % f) * side, side, side)

    def build_items(self) -> dict[str, list[SatlasItem]]:
        """Every split's items (see the class docstring)."""
        split_tiles = self.split_tiles()
        manifest = self.manifest()  # a set: no need to sort the keys first
        stored = set(decode_keys(manifest.key_array() if manifest and manifest.has_keys else self.stored_keys()))
        times = satlas.image_times(self.metadata_dir)
        when: dict[str, str] = {}  # image -> its time, worked out once per image
        good = self._good()
        prefix = f"{self.modality}/"
        by_tile: dict[str, list[tuple[str, str, str]]] = {}  # label tile -> (time, image, key)
        windows: dict[str, dict[str, Any]] = {}
        for key in stored:
            if not key.startswith(prefix):
                continue
            _, image, tile = key.split("/")
            label_tile, window = self._label_tile(tile)
            if good is not None and (tile, image) not in good and (label_tile, image) not in good:
                continue
            time = when.get(image)
            if time is None:
                time = when[image] = satlas.image_time(image, times)
            by_tile.setdefault(label_tile, []).append((time, image, key))
            windows.setdefault(label_tile, {})[key] = (tile, window)
        for entries in by_tile.values():
            entries.sort()
        dynamic = self._dynamic_labels(stored) if self.label_folder == "dynamic" else {}
        items: dict[str, list[SatlasItem]] = {}
        for split, tiles in split_tiles.items():
            items[split] = []
            for label_tile in tiles:
                entries = by_tile.get(label_tile, [])
                if self.label_folder == "static":
                    label = f"static/{label_tile}"
                    label = label if label in stored else None
                    if self.modality != "naip":  # the image tile is its label tile: one item, no window
                        if entries:
                            items[split].append(SatlasItem(f"{self.modality}/{label_tile}",
                                                           tuple(k for _, _, k in entries[-self.num_images:]), label))
                        continue
                    for tile in sorted({windows[label_tile][k][0] for _, _, k in entries}):
                        series = [k for _, _, k in entries if windows[label_tile][k][0] == tile]
                        window = windows[label_tile][series[0]][1]
                        items[split].append(SatlasItem(f"{self.modality}/{tile}", tuple(series[-self.num_images:]),
                                                       label, window))
                else:
                    for label, image in dynamic.get(label_tile, []):
                        key = f"{self.modality}/{image}/{label_tile}"
                        if key not in stored:
                            continue  # its image is of another modality, or a mosaic ("fake")
                        time = satlas.image_time(image, times)
                        before = [k for t, _, k in entries if t <= time and k != key]
                        series = (*before[-(self.num_images - 1):], key) if self.num_images > 1 else (key,)
                        items[split].append(SatlasItem(label, tuple(series), label))
        return items

    def _dynamic_labels(self, stored: set[str]) -> dict[str, list[tuple[str, str]]]:
        """Label tile -> (dynamic label key, the image its vector.json names) for the keys that
        hold one of the tasks."""
        found: dict[str, list[tuple[str, str]]] = {}
        keys = sorted(k for k in stored if k.startswith("dynamic/"))
        from ..store import Store

        with Store(self.lmdb_paths, self.readahead).reader() as reader:
            for key in keys:
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
        if not items:
            labelled = f" with {', '.join(self.tasks)} labels" if self.label_folder == "dynamic" else ""
            raise ConfigError(f"{self.lmdb_path}: the {split} split ({self.split}) has no {self.modality} images"
                              f"{labelled}; check split, modality, metadata_dir and val_fraction")
        return SatlasTiles(self.lmdb_paths, self.bands, items, self.tasks, self.num_images, self.readahead,
                           native=self.loads_native, manifests=self.path_manifests())

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.check_lmdb()
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS) if stage else SPLITS:
            if split not in self.datasets and not (split == "val" and self.val_fraction == 0):
                self.datasets[split] = self.make_dataset(split)
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
