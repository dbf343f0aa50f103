"""BigEarthNet v2 DataModule: S1, S2 or both, official splits and 19-class labels."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from ...catalog import bigearthnet
from ...errors import ConfigError, DatasetNotFoundError
from ...manifest import KeyRows
from ..bigearthnet_index import clc_to_class_lut, load_bigearthnet_index
from .base import LMDBDataModule, LoaderKind

log = logging.getLogger(__name__)
#: Our split names -> the metadata's.
METADATA_SPLITS = {"train": "train", "val": "validation", "test": "test"}
IGNORE_INDEX = 255


def resolve_bands(bands: list[str] | int | str) -> list[str]:
    """Band names, or one of ConfigILM's channel sets: a size (2, 3, 4, 10, 12, 14) or a name
    (S1, S2, ALL, RGB, 10m, 20m, 60m, 10m_20m, S1_10m_20m)."""
    if isinstance(bands, int):
        if bands not in bigearthnet.CHANNEL_SETS:
            raise ConfigError(f"no BigEarthNet channel set of {bands} bands; valid sizes: "
                              f"{sorted(bigearthnet.CHANNEL_SETS)}, names: {list(bigearthnet.NAMED_CHANNEL_SETS)}")
        return list(bigearthnet.CHANNEL_SETS[bands])
    if isinstance(bands, str):
        if bands in bigearthnet.NAMED_CHANNEL_SETS:
            return list(bigearthnet.NAMED_CHANNEL_SETS[bands])
        bands = [bands]
    valid = (*bigearthnet.S1.band_names, *bigearthnet.S2.band_names)
    unknown = [b for b in bands if b not in valid]
    if unknown:
        raise ConfigError(f"unknown BigEarthNet band(s) {unknown}; valid: {list(valid)}, or a channel set: "
                          f"{sorted(bigearthnet.CHANNEL_SETS)} or {list(bigearthnet.NAMED_CHANNEL_SETS)}")
    return list(bands)


class BigEarthNetDataModule(LMDBDataModule):
    """BigEarthNet v2 (reBEN) multi-label classification, optionally with reference-map masks.

    Args:
        lmdb_path: LMDB holding the S1 and/or S2 patches (and reference maps for ``mask``).
        metadata_dir: folder with the official ``metadata.parquet`` (and the snow/cloud file).
        bands: band names (S1 ``VV VH``, S2 ``B01``..``B12``, ``B8A``) or a ConfigILM channel set
            by size: 2 = VV VH; 3 = B04 B03 B02; 4 = B02 B03 B04 B08; 10 = the 10/20 m S2 bands;
            12 = VV VH + those 10; 14 = VV VH and all 12 S2 bands; or by name: S1, S2, ALL (14),
            RGB, 10m, 20m, 60m, 10m_20m, S1_10m_20m. S2 patches are paired with
            their S1 partner (``s1_name``) when both sensors are selected.
        include_snow_cloud: also use the patches with seasonal snow, clouds or shadows
            (excluded by default, as ConfigILM does).
        class_order: ``alphabetical`` (ConfigILM's multi-hot order, the default) or ``paper``.
        mask: return the reference map as ``mask``: each pixel's class index in that order,
            ``255`` where the CLC code belongs to no class.

    Batches carry ``label`` as a float multi-hot of length 19 after transfer.
    """

    name = "bigearthnet"
    catalog = bigearthnet.DATASET
    rgb_bands = bigearthnet.S2.rgb_bands
    multilabel = True

    def __init__(
        self,
        lmdb_path: str | list[str],
        metadata_dir: str,
        bands: list[str] | int | str = 12,
        include_snow_cloud: bool = False,
        class_order: str = "alphabetical",
        mask: bool = False,
        batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        flips: bool = False,
        native: bool | Literal["auto"] = "auto",
        size: int | None = None,
        interpolation: str = "nearest",
        align_corners: bool = False,
        readahead: bool = False,
        stats_samples: int = 1000,
        seed: int = 0,
        loader: LoaderKind = "patch",
    ) -> None:
        super().__init__(lmdb_path, resolve_bands(bands), batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, mean=mean, std=std, flips=flips, native=native, size=size,
                         interpolation=interpolation, align_corners=align_corners, readahead=readahead, stats_samples=stats_samples, seed=seed, loader=loader)
        self.metadata_dir = Path(metadata_dir)
        self.include_snow_cloud, self.class_order, self.mask = include_snow_cloud, class_order, mask
        self.uses_s1 = any(b in bigearthnet.S1.band_names for b in self.bands)
        self.uses_s2 = any(b in bigearthnet.S2.band_names for b in self.bands)
        if class_order not in ("alphabetical", "paper"):
            raise ConfigError(f"class_order {class_order!r} is not 'alphabetical' or 'paper'")
        self._classes = tuple(bigearthnet.CLASSES_ALPHABETICAL if class_order == "alphabetical"
                              else bigearthnet.CLASSES_PAPER)

    @property
    def classes(self) -> tuple[str, ...]:
        return self._classes

    def encode_hint(self, path: Path) -> str:
        return f"{super().encode_hint(path)} (or, for the demo, `python -m rico_torch.encode demo --target-dir {path}`)"

    @property
    def metadata_file(self) -> Path:
        return self.metadata_dir / "metadata.parquet"

    def check_lmdb(self) -> None:
        super().check_lmdb()
        if not self.metadata_file.is_file():
            where = "no such folder" if not self.metadata_dir.is_dir() else "not in that folder"
            beside = [p for p in self.lmdb_paths if (p / "metadata.parquet").is_file()]
            fix = (f"set metadata_dir to {beside[0]}, where a metadata.parquet lies beside data.mdb (as the demo "
                   "writes it)" if beside else "set metadata_dir to the folder holding the official metadata.parquet")
            raise DatasetNotFoundError(f"{self.metadata_file}: BigEarthNet v2 metadata not found ({where}); {fix}")

    def dataset_kwargs(self):
        if not self.mask:
            return {}
        return {"mask_band": bigearthnet.REFERENCE_MAP_BAND, "mask_lut": clc_to_class_lut(self.class_order, IGNORE_INDEX)}

    def split_items(self, split: str):
        index = load_bigearthnet_index(
            self.metadata_file,
            split=METADATA_SPLITS[split],
            include_snow_cloud=self.include_snow_cloud,
            class_order=self.class_order,
        )
        columns = []
        if self.uses_s2 or not self.uses_s1:
            columns.append(index.s2_keys)
        if self.uses_s1:
            columns.append(index.s1_keys)
        if self.mask:
            columns.append(np.char.add(index.s2_keys, b"_reference_map"))
        return self.present_items(columns, index.labels, f"{METADATA_SPLITS[split]} patches of {self.metadata_file}",
                                  "point metadata_dir at this LMDB's metadata")

    def present_items(self, columns: list[np.ndarray], labels: np.ndarray, what: str, fix: str):
        """Items (one key per column: S2, S1, reference map) whose keys are all in the LMDB, and their
        labels; ``what`` and ``fix`` word the error where none is."""
        width = max(c.dtype.itemsize for c in columns)
        items = np.stack([c.astype(f"S{width}") for c in columns], axis=1) if len(columns) > 1 else columns[0]
        rows = self.key_rows(items.ravel())  # each key's row in the mapped column (one LMDB)
        found = (rows >= 0) if rows is not None else self.has_keys(items.ravel())
        keep = self._present(found.reshape(items.shape))
        if len(items) and not keep.any():
            raise ConfigError(
                f"{self.lmdb_path}: none of the {len(items)} {what} (with the {self._sensors()} keys the bands need) "
                f"are in the LMDB; {fix}, or choose bands the LMDB holds"
            )
        if rows is not None:  # the split's keys as rows of the column: 4 bytes a key
            return KeyRows(self.manifest(), rows.reshape(items.shape)[keep]), labels[keep]
        return items[keep], labels[keep]

    def _sensors(self) -> str:
        return " and ".join(n for n, used in (("S2", self.uses_s2 or not self.uses_s1), ("S1", self.uses_s1),
                                              ("reference map", getattr(self, "mask", False))) if used)

    def _present(self, found: np.ndarray) -> np.ndarray:
        """Items whose keys are all in the LMDB (``found``: each key's, shaped as the items),
        logging what is missing."""
        keep = found.all(axis=1) if found.ndim == 2 else found
        if not keep.all():
            log.warning("%s: %d of %d patches of the split are not in the LMDB and are left out",
                        self.lmdb_path, int((~keep).sum()), len(keep))
        return keep
