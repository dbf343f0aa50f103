"""DataModules for datasets whose class is the source folder (EuroSAT-MS, UC Merced)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ...catalog import Dataset
from ...errors import ConfigError, DatasetNotFoundError, UnknownKeyError
from .base import SPLITS, LMDBDataModule, stratified_split


_TRAILING_NUMBER = re.compile(r"_?\d+$")


class ClassFolderDataModule(LMDBDataModule):
    """Single-label classification; labels come from the encoder's manifest (or from the keys).

    Splits come from split files (``<prefix>-train.txt``, ``-val.txt``, ``-test.txt`` in
    ``split_dir``, one file name per line, e.g. the Neumann et al. files) when ``split_dir``
    is given, else from a seeded stratified split with ``val_fraction`` and ``test_fraction``.
    Label ``i`` is the i-th name of :attr:`classes` (the dataset's classes, sorted).
    """

    catalog: Dataset
    split_prefix = ""

    def __init__(
        self,
        lmdb_path: str | list[str],
        bands: list[str] | None = None,
        split_dir: str | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        **kwargs,
    ) -> None:
        super().__init__(lmdb_path, bands=list(bands or self.catalog.band_names), **kwargs)
        self.split_dir = None if split_dir is None else Path(split_dir)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._splits: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.catalog.classes)

    def key_labels(self) -> dict[str, str]:
        """key -> class name: the manifest's labels, else (an LMDB rico-hdl wrote) the key without its
        trailing number, as both datasets name each file after its class (``AnnualCrop_12``, ``river07``)."""
        manifest = self.manifest()
        if manifest and manifest.get("labels"):
            return manifest["labels"]
        known = set(self.classes)
        labels = {k.decode(): _TRAILING_NUMBER.sub("", k.decode()) for k in self.stored_keys()}
        unknown = sorted(k for k, c in labels.items() if c not in known)
        if unknown:
            raise ConfigError(f"{self.lmdb_path}: key {unknown[0]!r} (and {len(unknown) - 1} more) names no "
                              f"{self.catalog.title} class and there is no manifest.json with labels; encode the "
                              f"dataset with {self.encode_hint(self.lmdb_path)}")
        return labels

    def _load_splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        key_labels = self.key_labels()
        index = {c: i for i, c in enumerate(self.classes)}
        keys = np.array(sorted(key_labels), dtype=np.bytes_)
        labels = np.array([index[key_labels[k.decode()]] for k in keys], dtype=np.int64)
        if self.split_dir is None:
            parts = stratified_split(labels, (1 - self.val_fraction - self.test_fraction,
                                              self.val_fraction, self.test_fraction), self.seed)
            return {s: (keys[i], labels[i]) for s, i in parts.items()}
        position = {k.decode(): i for i, k in enumerate(keys)}
        splits = {}
        for split in SPLITS:
            path = self.split_dir / f"{self.split_prefix}-{split}.txt"
            if not path.exists():
                raise DatasetNotFoundError(f"{path}: split file missing; set split_dir to the folder holding "
                                           f"{self.split_prefix}-{{train,val,test}}.txt, or to null for a seeded split")
            names = [Path(line.strip()).stem for line in path.read_text().splitlines() if line.strip()]
            missing = [n for n in names if n not in position]
            if missing:
                raise UnknownKeyError(f"{path}: {len(missing)} of its {len(names)} patches are not in {self.lmdb_path}, "
                                      f"e.g. {missing[0]!r}; is split_dir this LMDB's dataset?")
            rows = np.array([position[n] for n in names], dtype=np.int64)
            splits[split] = (keys[rows], labels[rows])
        return splits

    def split_items(self, split: str):
        if self._splits is None:
            self._splits = self._load_splits()
        return self._splits[split]
