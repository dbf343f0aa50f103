"""DataModules for datasets whose class is the source folder (EuroSAT-MS, UC Merced)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ...catalog import Dataset
from ...errors import ConfigError, DatasetNotFoundError, UnknownKeyError
from ...manifest import decode_keys
from .base import SPLITS, LMDBDataModule, SplitOwner, stratified_split


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
        keys, labels = self._labelled()
        return {k: self.classes[i] for k, i in zip(decode_keys(keys), labels.tolist())}

    def _labelled(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys, rows, labels): ``keys[rows]`` is every labelled key, sorted, ``labels`` its class
        index; from the manifest's mapped key and label columns (vectorised), else
        :meth:`_named_labels`."""
        manifest = self.manifest()
        labels = manifest.labels() if manifest else None
        if labels is None:
            named = self._named_labels()
            index = {c: i for i, c in enumerate(self.classes)}
            keys = np.array(sorted(named), dtype=np.bytes_)
            labels = np.array([index[named[k.decode()]] for k in keys.tolist()], dtype=np.int64)
            return keys, np.arange(len(keys)), labels
        if len(manifest.parts) == 1:  # the mapped column, its sorter, the labels in that order
            index = manifest.parts[0][1]
            rows = index.columns["sorter"]
            labels = index.columns["label"][rows]
            keep = labels >= 0
            return index.columns["key"], rows[keep], labels[keep].astype(np.int64)
        keys, keep = manifest.key_array(), labels >= 0
        keys, labels = keys[keep], labels[keep]
        order = np.argsort(keys, kind="stable")
        return keys[order], np.arange(len(order)), labels[order].astype(np.int64)

    def _named_labels(self) -> dict[str, str]:
        """key -> class name from keys alone (an LMDB rico-hdl wrote)."""
        known = set(self.classes)
        labels = {k.decode(): _TRAILING_NUMBER.sub("", k.decode()) for k in self.stored_keys()}
        unknown = sorted(k for k, c in labels.items() if c not in known)
        if unknown:
            raise ConfigError(f"{self.lmdb_path}: key {unknown[0]!r} (and {len(unknown) - 1} more) names no "
                              f"{self.catalog.title} class and there is no manifest.json with labels; encode the "
                              f"dataset with {self.encode_hint(self.lmdb_path)}")
        return labels

    def _load_splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        column, sorted_rows, labels = self._labelled()
        if self.split_dir is None:
            parts = stratified_split(labels, (1 - self.val_fraction - self.test_fraction,
                                              self.val_fraction, self.test_fraction), self.seed)
            return {s: (self.key_items(column, sorted_rows[i]), labels[i]) for s, i in parts.items()}
        keys = column[sorted_rows]
        splits, owner = {}, SplitOwner(len(keys))
        for split in SPLITS:
            path = self.split_dir / f"{self.split_prefix}-{split}.txt"
            if not path.exists():
                raise DatasetNotFoundError(f"{path}: split file missing; set split_dir to the folder holding "
                                           f"{self.split_prefix}-{{train,val,test}}.txt, or to null for a seeded split")
            names = [Path(line.strip()).stem for line in path.read_text().splitlines() if line.strip()]
            wanted = np.array([n.encode() for n in names], dtype=np.bytes_)
            rows = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1) if len(keys) else np.zeros(len(names), int)
            found = keys[rows] == wanted if len(keys) else np.zeros(len(names), bool)
            missing = [n for n, ok in zip(names, found.tolist()) if not ok]
            if missing:
                raise UnknownKeyError(f"{path}: {len(missing)} of its {len(names)} patches are not in {self.lmdb_path}, "
                                      f"e.g. {missing[0]!r}; is split_dir this LMDB's dataset?")
            owner.claim(split, rows, keys, self.split_dir)
            splits[split] = (self.key_items(column, sorted_rows[rows]), labels[rows])
        return splits

    def empty_split_reason(self, split: str) -> str:
        if self.split_dir is not None:
            return f"its split file in {self.split_dir} lists no patch"
        sizes = np.bincount(self._labelled()[2], minlength=len(self.classes))
        largest = int(sizes.max(initial=0))
        if split == "train":
            return (f"val_fraction {self.val_fraction} and test_fraction {self.test_fraction} leave train nothing "
                    f"of any class (the largest has {largest} items): lower them")
        fraction = self.val_fraction if split == "val" else self.test_fraction
        return (f"the seeded split takes {split}_fraction {fraction} of each class, rounded, and the largest of the "
                f"{int((sizes > 0).sum())} classes here has {largest} items (too few items per class): raise "
                f"{split}_fraction, encode more patches per class, or give split_dir")

    def split_items(self, split: str):
        if self._splits is None:
            self._splits = self._load_splits()
        return self._splits[split]
