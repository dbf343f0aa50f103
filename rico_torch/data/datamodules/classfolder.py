"""DataModules for datasets whose class is the source folder (EuroSAT-MS, UC Merced)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...catalog import Dataset
from ...errors import ConfigError, DatasetNotFoundError, UnknownKeyError
from .base import SPLITS, LMDBDataModule, stratified_split


class ClassFolderDataModule(LMDBDataModule):
    """Single-label classification; labels come from the encoder's manifest.

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

    def _load_splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        manifest = self.manifest()
        if not manifest or not manifest.get("labels"):
            raise ConfigError(f"{self.lmdb_path}: no class labels in manifest.json (an LMDB rico-hdl wrote has no "
                              f"manifest); encode the dataset with {self.encode_hint(self.lmdb_path)}")
        index = {c: i for i, c in enumerate(self.classes)}
        keys = np.array(sorted(manifest["labels"]), dtype=np.bytes_)
        labels = np.array([index[manifest["labels"][k.decode()]] for k in keys], dtype=np.int64)
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
