"""Shared DataModule behaviour: loaders, device-side normalisation and flips, statistics, plots."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ...catalog import Dataset, identify
from ...contents import recognise
from ..._process import release_free_heap
from ...errors import ConfigError, DatasetNotFoundError
from ...format import parse_header
from ..dataset import LMDBPatchDataset, NativeAssembler, collate
from ..loader import PatchLoader
from ...manifest import KeyRows, Manifest, merge
from ..store import Store, open_environment, read_manifest

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
#: ``loader`` of every DataModule: rico_torch's PatchLoader or a torch DataLoader.
LoaderKind = Literal["patch", "torch"]


class LMDBDataModule(L.LightningDataModule):
    """Base for the per-dataset DataModules.

    Subclasses implement :meth:`split_items` (the keys and labels of a split) and set the
    class constants. Normalisation (per-band mean/std) and optional flips run on the device
    in :meth:`on_after_batch_transfer`, after the transfer of the compact batch.

    Args:
        lmdb_path: the encoded dataset (``python -m rico_torch.encode ...``), or the list of
            its shard directories.
        bands: band keys in the order wanted.
        batch_size, num_workers, pin_memory: loader settings; workers stay for the whole fit; a
            worker that sends no batch within :attr:`loader_timeout` seconds raises.
        loader: ``patch``: :class:`~rico_torch.data.PatchLoader` (worker processes fill reused
            shared-memory batches; split by rank here under DDP, as Lightning only does that for
            torch DataLoaders); ``torch``: a torch ``DataLoader`` with persistent workers
            (Lightning adds its ``DistributedSampler``), also used for datasets that wrap an
            LMDBPatchDataset (SSL4EO's season views). Every DataModule takes it (Satlas: ``torch``
            only).
        mean, std: per-band statistics; ``None``: computed from the train split (up to
            ``stats_samples`` patches) and cached beside the LMDB.
        flips: random horizontal/vertical flips of training batches.
        native: load bands in their dtype and cast, upsample and normalise them batched on the
            device (the least work per sample in the workers); ``auto``: when the trainer runs on
            a CUDA GPU. On the CPU the workers' own float32 output is faster than one process
            assembling every batch (other accelerators may lack the integer dtypes involved).
        size: output size; ``None``: the largest selected band's size.
        interpolation: ``nearest``, ``bilinear`` or ``bicubic``.
        align_corners: for bilinear/bicubic (ConfigILM uses True; torch's default is False).
        readahead: OS readahead on the LMDB file (helps when it fits in memory).
        seed: seed of generated splits and the statistics sample.
        crop_size: read a window of this size of each patch (random in training, centred in
            validation and test) instead of the whole; loads float32 (not ``native``).
    """

    #: Dataset name, for messages and the statistics cache.
    name = "dataset"
    #: The catalog's description of the dataset (bands, encode and fit commands).
    catalog: Dataset | None = None
    #: Band names for an RGB composite in :meth:`plot`.
    rgb_bands: tuple[str, ...] = ()
    #: Whether labels are multi-hot (BCE) rather than one class index (cross-entropy).
    multilabel = False
    #: Seconds a loader waits for one batch from its workers before raising (a hung worker: a
    #: stalled network file system, a deadlock): far above a batch's usual milliseconds to
    #: seconds, and above a first batch on cold storage. 0: wait for ever.
    loader_timeout: float = 300.0

    def __init__(
        self,
        lmdb_path: str | list[str],
        bands: list[str],
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
        crop_size: int | None = None,
        loader: LoaderKind = "patch",
    ) -> None:
        super().__init__()
        if loader not in ("patch", "torch"):
            raise ConfigError(f"loader={loader!r}: give 'patch' (rico_torch's PatchLoader) or 'torch' (a DataLoader)")
        self.loader = loader
        self._patch_loaders: dict[str, PatchLoader] = {}  # by hook, closed in teardown
        self.crop_size = crop_size
        # several paths: the shards of one dataset (encoded with --shard I/N)
        self.lmdb_paths = [Path(p) for p in (lmdb_path if isinstance(lmdb_path, (list, tuple)) else [lmdb_path])]
        self.lmdb_path = self.lmdb_paths[0]
        self.bands = list(bands)
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.flips, self.native, self.size, self.interpolation = flips, native, size, interpolation
        self.align_corners = align_corners
        self.readahead, self.stats_samples, self.seed = readahead, stats_samples, seed
        self._check_bands()
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std, or neither")
        for stat in (mean, std):
            if stat is not None and len(stat) != len(self.bands):
                raise ConfigError(f"{len(stat)} mean/std values for {len(self.bands)} bands {self.bands}")
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32)
        self.datasets: dict[str, LMDBPatchDataset] = {}
        self.assembler: NativeAssembler | None = None
        self._stored: np.ndarray | None = None

    # --- checks with messages that say what to change --------------------------------------

    def _check_bands(self) -> None:
        if self.catalog is None:
            return
        valid = self.catalog.band_names
        unknown = [b for b in self.bands if b not in valid]
        if unknown:
            raise ConfigError(f"unknown {self.catalog.title} band(s) {unknown}; valid: {list(valid)}")

    def encode_hint(self, path: Path) -> str:
        """The command that creates the LMDB at ``path``."""
        command = f"python -m rico_torch.encode {self.catalog.name if self.catalog else '<dataset>'} ..."
        if self.catalog is not None:
            command = self.catalog.example.rsplit(" --target-dir ", 1)[0]
        return f"`{command} --target-dir {path}`"

    def check_lmdb(self) -> None:
        """Each LMDB path exists and holds this DataModule's dataset (by its manifest, or for
        rico-hdl output by its first patch's key and bands)."""
        for path in self.lmdb_paths:
            if not (path / "data.mdb").exists():
                what = "no encoded dataset here" if path.is_dir() else "no such directory"
                raise DatasetNotFoundError(f"{path}: {what} (data.mdb missing); create it with {self.encode_hint(path)}")
            if self.catalog is None:
                continue
            manifest = self.path_manifests()[self.lmdb_paths.index(path)]  # read once
            found = recognise(open_environment(path, self.readahead), manifest)
            if found is not None and found.dataset.name != self.catalog.name:
                held = found.dataset
                raise ConfigError(
                    f"{path} holds {held.title} (by its {found.how}), but {type(self).__name__} reads "
                    f"{self.catalog.title}; train on it with `{held.fit_command(path)}`, or point lmdb_path "
                    f"at an LMDB of {self.catalog.title}"
                )

    # --- what subclasses provide --------------------------------------------------------

    def manifest(self) -> Manifest | None:
        """The encoder's manifest (merged over shards; read once, its per-key facts mapped), or None
        for rico-hdl output."""
        if not hasattr(self, "_manifest"):
            self._manifest = merge(self.path_manifests())
        return self._manifest

    def path_manifests(self) -> list[Manifest | None]:
        """Each LMDB path's manifest, read once for the DataModule and every dataset it makes (small:
        per-key facts stay in the mapped ``keys.index``)."""
        if not hasattr(self, "_path_manifests"):
            self._path_manifests = [read_manifest(p) for p in self.lmdb_paths]
        return self._path_manifests

    def stored_keys(self) -> np.ndarray:
        """Every key in the LMDB(s), sorted (an ``S`` array): the manifest's, else one pass over the
        keys (values unread)."""
        if self._stored is None:
            manifest = self.manifest()
            if manifest and manifest.has_keys:
                self._stored = np.sort(manifest.key_array())
            else:
                with Store(self.lmdb_paths, self.readahead).reader() as reader:
                    keys = reader.keys()
                self._stored = np.sort(np.array([k.encode() for k in keys], dtype=np.bytes_))
        return self._stored

    def has_keys(self, keys: np.ndarray) -> np.ndarray:
        """Which of ``keys`` (an ``S`` array) the LMDB(s) hold, vectorised (a binary search per key)."""
        keys = np.asarray(keys, dtype=np.bytes_)
        manifest = self.manifest()
        if manifest and manifest.has_keys:
            return manifest.contains(keys)
        stored = self.stored_keys()
        if len(stored) == 0:
            return np.zeros(len(keys), dtype=bool)
        at = np.minimum(np.searchsorted(stored, keys), len(stored) - 1)
        return stored[at] == keys

    def keys_by_source(self) -> dict[str, list[str]]:
        """The stored keys of each of the catalog's sources, sorted: the manifest's, else by the
        sources' key forms (keys of several sources' form, e.g. SSL4EO's L1C and L2A: by the band
        keys of one value per root folder named in them)."""
        manifest = self.manifest()
        if manifest and manifest.has_keys:
            return {name: sorted(keys) for name, keys in manifest.keys_by_source().items()}
        sources = self.catalog.sources if self.catalog else ()
        out: dict[str, list[str]] = {s.name: [] for s in sources}
        undecided: dict[str, list[str]] = {}  # a key of the first form -> keys like it
        for key in sorted(k.decode() for k in self.stored_keys()):
            fits = [s for s in sources if s.matches_key(key)]
            if len(fits) == 1:
                out[fits[0].name].append(key)
            elif fits:
                like = next((k for k in undecided if fits[0].matches_key(key, like=k)), key)
                undecided.setdefault(like, []).append(key)
        if undecided:
            with Store(self.lmdb_paths, self.readahead).reader() as reader:
                for first, keys in undecided.items():
                    found = identify(first, parse_header(reader.get(first.encode()), first))
                    if found is not None and found[1].name in out:
                        out[found[1].name].extend(keys)
        return out

    def source_rows(self, source: str) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows): an ``S`` array holding the stored keys of one of the catalog's sources and
        its rows that are theirs, in sorted key order: the manifest's mapped column where it can
        (:meth:`~rico_torch.manifest.Manifest.sorted_rows`; no per-key Python objects, no copy),
        else :meth:`keys_by_source`'s."""
        manifest = self.manifest()
        if manifest and manifest.has_keys:
            if source in manifest.sources():
                return manifest.sorted_rows([source])
            return np.zeros(0, "S1"), np.zeros(0, np.int64)
        if not hasattr(self, "_by_source"):
            self._by_source = self.keys_by_source()
        listed = self._by_source.get(source, [])
        keys = np.array([k.encode() for k in listed], dtype=np.bytes_) if listed else np.zeros(0, "S1")
        return keys, np.arange(len(keys))

    def key_items(self, keys: np.ndarray, rows: np.ndarray) -> np.ndarray | KeyRows:
        """Items ``keys[rows]`` (rows (n,) or (n, k)) for a dataset: where ``keys`` is the one LMDB's
        mapped key column (:meth:`source_rows`), as :class:`~rico_torch.manifest.KeyRows` (4 bytes
        a key, in this process and pickled to a worker), else a copy of the keys."""
        manifest = self.manifest()
        if manifest and len(manifest.parts) == 1 and keys is manifest.parts[0][1].columns["key"]:
            return KeyRows(manifest, rows)
        return keys[rows]

    def key_rows(self, keys: np.ndarray) -> np.ndarray | None:
        """Each of ``keys``' (an ``S`` array) row in the one LMDB's mapped key column (int32, -1
        where absent), for :class:`~rico_torch.manifest.KeyRows`; None without a one-part manifest."""
        manifest = self.manifest()
        if not (manifest and len(manifest.parts) == 1):
            return None
        index = manifest.parts[0][1]
        return index.find(np.asarray(keys, dtype=np.bytes_), np.int32 if len(index) < 2**31 else np.int64)

    def source_keys(self, source: str) -> np.ndarray:
        """The stored keys of one of the catalog's sources in sorted order, an ``S`` array."""
        keys, rows = self.source_rows(source)
        return keys[rows]

    def split_items(self, split: str) -> tuple[np.ndarray | list, np.ndarray | None]:
        """The items (keys or key tuples) and labels of ``split`` (one of train, val, test)."""
        raise NotImplementedError

    @property
    def classes(self) -> tuple[str, ...]:
        return ()

    def dataset_kwargs(self) -> dict[str, Any]:
        """Extra LMDBPatchDataset arguments (e.g. the mask band)."""
        return {}

    # --- Lightning hooks ------------------------------------------------------------------

    @property
    def num_channels(self) -> int:
        return len(self.bands)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def example_input(self, size: int = 8) -> torch.Tensor:
        """A zero batch of one ``image`` as the model sees it (channels as loaded, ``size`` px): what a
        model's lazy layers need to take their shapes before the summary and the optimiser."""
        return torch.zeros(1, self.num_channels, size, size)

    def make_dataset(self, split: str) -> LMDBPatchDataset:
        items, labels = self.split_items(split)
        if len(items) == 0:
            raise ConfigError(f"{self.lmdb_path}: the {split} split is empty; {self.empty_split_reason(split)}")
        crop = {} if self.crop_size is None else {"crop": self.crop_size,
                                                  "crop_mode": "random" if split == "train" else "center"}
        return LMDBPatchDataset(
            self.lmdb_paths, self.bands, keys=items, labels=labels, size=self.size if crop else self.output_size,
            interpolation=self.interpolation, align_corners=self.align_corners, native=self.loads_native,
            readahead=self.readahead,
            manifests=self.path_manifests(),
            **crop,
            **self.dataset_kwargs(),
        )

    @property
    def output_size(self) -> int | tuple[int, int] | None:
        """``size``, or the largest selected band's shape where the catalog fixes it (so that no
        split's dataset has to survey its items for it); None leaves it to the dataset."""
        if self.size is not None:
            return self.size
        return self.catalog.largest_shape(self.bands) if self.catalog else None

    @property
    def pins_memory(self) -> bool:
        """``pin_memory``, unless the attached trainer runs on a CPU (nothing to pin for: no notice about it)."""
        trainer = self.trainer
        return self.pin_memory and (trainer is None or trainer.strategy.root_device.type == "cuda")

    @property
    def loads_native(self) -> bool:
        """``native``, with ``auto`` resolved from the attached trainer's device."""
        if self.crop_size is not None:  # crops are cut on the CPU
            return False
        if self.native != "auto":
            return bool(self.native)
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def empty_split_reason(self, split: str) -> str:
        """Why ``split`` came out empty and what to change (a DataModule that makes its splits says how)."""
        return "check that the split files or metadata belong to this LMDB"

    def has_split(self, split: str) -> bool:
        """Whether this DataModule makes ``split`` (all three unless a subclass leaves one out)."""
        return True

    def make_splits(self, stage: str | None) -> None:
        """The datasets ``stage`` needs that are not made yet; then the parse's freed memory goes back."""
        if not self.datasets:
            self.check_lmdb()
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        made = [s for s in (wanted.get(stage, SPLITS) if stage else SPLITS)
                if s not in self.datasets and self.has_split(s)]
        for split in made:
            self.datasets[split] = self.make_dataset(split)
        if made:
            release_free_heap()  # the splits' parse temporaries

    def setup(self, stage: str | None = None) -> None:
        self.make_splits(stage)
        if self.loads_native and self.assembler is None:
            self.assembler = next(iter(self.datasets.values())).native_assembler()
        if self.mean is None:
            self.mean, self.std = self.statistics()

    def _loader(self, split: str, shuffle: bool, hook: str) -> PatchLoader | DataLoader:
        dataset = self.datasets[split]
        timeout = self.loader_timeout if self.num_workers > 0 else 0  # a DataLoader refuses one without workers
        if self.loader == "torch" or not isinstance(dataset, LMDBPatchDataset):  # e.g. SSL4EO's season views
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                              pin_memory=self.pins_memory, persistent_workers=self.num_workers > 0, collate_fn=collate,
                              timeout=timeout)
        old = self._patch_loaders.pop(hook, None)
        if old is not None:  # asked again (reload_dataloaders_every_n_epochs, a later trainer.validate)
            old.close()
        sampler = self._rank_sampler(dataset, shuffle, hook)
        loader = PatchLoader(dataset, batch_size=self.batch_size, shuffle=shuffle and sampler is None,
                             sampler=sampler, num_workers=self.num_workers, pin_memory=self.pins_memory,
                             timeout=timeout)
        self._patch_loaders[hook] = loader
        return loader

    def _rank_sampler(self, dataset: LMDBPatchDataset, shuffle: bool, hook: str):
        """This rank's share under a distributed strategy, as Lightning would inject it into a torch
        DataLoader: ``DistributedSampler(shuffle, seed=$PL_GLOBAL_SEED)``, without padding for predict."""
        trainer = self.trainer
        connector = getattr(trainer, "_accelerator_connector", None)
        if trainer is None or trainer.world_size <= 1 or not getattr(connector, "use_distributed_sampler", True):
            return None
        kwargs = dict(trainer.distributed_sampler_kwargs or {})
        if not kwargs:
            return None
        kwargs["shuffle"] = shuffle and not trainer.overfit_batches
        kwargs.setdefault("seed", int(os.getenv("PL_GLOBAL_SEED", 0)))
        if hook == "predict":
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper

            return UnrepeatedDistributedSamplerWrapper(range(len(dataset)), **kwargs)
        return DistributedSampler(range(len(dataset)), **kwargs)

    def train_dataloader(self) -> PatchLoader | DataLoader:
        return self._loader("train", shuffle=True, hook="train")

    def val_dataloader(self) -> PatchLoader | DataLoader:
        return self._loader("val", shuffle=False, hook="val")

    def test_dataloader(self) -> PatchLoader | DataLoader:
        return self._loader("test", shuffle=False, hook="test")

    def predict_dataloader(self) -> PatchLoader | DataLoader:
        return self._loader("test", shuffle=False, hook="predict")

    def teardown(self, stage: str | None = None) -> None:
        """Stop the PatchLoaders' workers (Lightning calls this at the end of fit, validate, test, predict)."""
        for loader in self._patch_loaders.values():
            loader.close()
        self._patch_loaders.clear()

    def assemble(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A native batch's float ``image``, built on the batch's device."""
        if "native" in batch:
            self.assembler = self.assembler.to(next(iter(batch["native"].values())).device)
            batch["image"] = self.assembler(batch.pop("native"))
        return batch

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        batch = self.assemble(batch)
        image = batch["image"]
        mean, std = self.mean.to(image.device), self.std.to(image.device)
        batch["image"] = (image - mean[:, None, None]) / std[:, None, None]
        if "label" in batch and self.multilabel:
            batch["label"] = batch["label"].float()
        if self.flips and self.trainer is not None and self.trainer.training:
            for dim in (-1, -2):
                if torch.rand(()) < 0.5:
                    batch["image"] = batch["image"].flip(dim)
                    if "mask" in batch:
                        batch["mask"] = batch["mask"].flip(dim)
        return batch

    # --- statistics -----------------------------------------------------------------------

    def _stats_cache(self, dataset: LMDBPatchDataset) -> Path:
        ident = json.dumps([self.name, self.bands, list(dataset.size or ()), self.interpolation, self.align_corners,
                            len(dataset),
                            self.stats_samples, self.seed])
        hashed = hashlib.sha256(ident.encode())
        keys = dataset._keys
        for start in range(0, len(keys), 1 << 16):  # a chunk at a time (KeyRows: read from the map)
            hashed.update(np.ascontiguousarray(keys[start : start + (1 << 16)]).tobytes())
        return self.lmdb_path / f"stats-{hashed.hexdigest()[:16]}.json"

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-band mean and std over (a sample of) the train split, cached beside the LMDB."""
        train = self.datasets.get("train") or self.make_dataset("train")
        cache = self._stats_cache(train)
        if cache.exists():
            stats = json.loads(cache.read_text())
            return torch.tensor(stats["mean"]), torch.tensor(stats["std"])
        crop = {} if getattr(train, "crop", None) is None else {"crop": train.crop, "crop_mode": "center"}
        stats_ds = LMDBPatchDataset(self.lmdb_paths, self.bands, keys=train._keys,
                                    size=train.grid if crop else train.size, interpolation=self.interpolation,
                                    align_corners=self.align_corners, **crop)
        rng = np.random.default_rng(self.seed)
        n = min(len(stats_ds), self.stats_samples)
        indices = np.sort(rng.choice(len(stats_ds), size=n, replace=False))
        total = torch.zeros(len(self.bands), dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        count = 0
        for start in range(0, n, 64):
            image = stats_ds.read_batch(indices[start : start + 64].tolist())["image"].double()
            total += image.sum(dim=(0, 2, 3))
            total_sq += (image**2).sum(dim=(0, 2, 3))
            count += image.shape[0] * image.shape[2] * image.shape[3]
        mean = total / count
        std = (total_sq / count - mean**2).clamp_min(0).sqrt().clamp_min(1e-6)
        try:  # atomically: every DDP rank computes and writes the same file at once
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"bands": self.bands, "samples": n, "mean": mean.tolist(), "std": std.tolist()}))
            os.replace(tmp, cache)
        except OSError:  # read-only storage: compute again next time
            log.info("could not cache statistics beside %s", self.lmdb_path)
        return mean.float(), std.float()

    # --- plotting -------------------------------------------------------------------------

    def plot(self, sample: dict[str, Any], title: str | None = None):
        """An RGB composite (2-98 percentile stretch) with the label names and mask, of a sample
        or a batch (float or native; before normalisation).

        Returns:
            a matplotlib Figure (made without pyplot: the backend is left as it is).
        """
        from ..plot import plot_sample

        assembler = self.assembler
        if assembler is None and "image" not in sample and self.datasets:
            assembler = next(iter(self.datasets.values())).native_assembler()
        return plot_sample(sample, self.bands, self.rgb_bands, self.classes, multilabel=self.multilabel, title=title,
                           assembler=assembler)


class SplitOwner:
    """Which split file listed each row (of ``size`` rows) first, so that a patch two split files
    list (the same patch in train and val) is refused, never trained and validated on; split files
    are checked as they are read, O(rows listed) each."""

    def __init__(self, size: int) -> None:
        self.owner = np.full(size, -1, np.int8)

    def claim(self, split: str, rows: np.ndarray, keys: np.ndarray, where: object) -> None:
        """Record ``split``'s rows; ``keys``: the key of each row (for the message), ``where``: the
        split files' folder."""
        if len(rows) == 0:
            return
        seen = self.owner[rows]
        clash = np.flatnonzero((seen >= 0) & (seen != SPLITS.index(split)))
        if len(clash):
            other = SPLITS[int(seen[clash[0]])]
            raise ConfigError(f"{where}: the {other} and {split} split files share {len(clash):,} patches (e.g. "
                              f"{keys[rows[clash[0]]].decode()!r}); a patch must be in one split only")
        self.owner[rows] = SPLITS.index(split)


def windows_manifest(path: Path, part: str, kind: str, noun: str, redo: str, hint: str) -> Manifest:
    """The manifest of an encode of windows at ``path`` (its ``part``: "scenes", "cube"); one line naming
    ``path`` and the command (``hint``) when there is none (``kind``: what is missing) or it is another
    kind of LMDB (``noun``; ``redo``: how to make the right one)."""
    if not (path / "data.mdb").exists():
        raise DatasetNotFoundError(f"{path}: no {kind} here (data.mdb missing); create it with {hint}")
    manifest = read_manifest(path)
    if not manifest or part not in manifest:
        raise ConfigError(f"{path}: not {noun} (manifest.json has no {part}); {redo} {hint}")
    return manifest


def stratified_split(labels: np.ndarray, fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """Indices of a seeded split that keeps each class's share in every part."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(members) * fractions[1]))
        n_test = int(round(len(members) * fractions[2]))
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val : n_val + n_test])
        parts["train"].append(members[n_val + n_test :])
    return {s: np.sort(np.concatenate(p)) if p else np.array([], dtype=int) for s, p in parts.items()}


def dealt(count: int, val_fraction: float, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` things (windows, blocks, scenes) dealt at random to splits: each one's split index."""
    order = rng.permutation(count)
    n_val, n_test = int(round(count * val_fraction)), int(round(count * test_fraction))
    split = np.zeros(count, np.int8)
    split[order[:n_val]] = SPLITS.index("val")
    split[order[n_val : n_val + n_test]] = SPLITS.index("test")
    return split


def block_split(groups: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: tuple[int, int], block: int,
                deal) -> np.ndarray:
    """Each window's split index (-1: left out) when square blocks of ``block`` cells of each group
    (scene, cube) are dealt to splits by ``deal(number of blocks) -> split per block``: a window
    (offsets ``rows``/``cols``, ``size`` (h, w) cells) touching blocks of two splits is left out."""
    (h, w), b = size, block
    span = int(max(rows.max(initial=0) + h, cols.max(initial=0) + w)) // b + 2

    def corner(k: int) -> np.ndarray:  # block of each window's k-th corner, one corner at a time
        r = np.maximum(rows, 0) if k < 2 else rows + h - 1
        c = np.maximum(cols, 0) if k % 2 == 0 else cols + w - 1
        return (groups.astype(np.int64) * span + r // b) * span + c // b

    blocks = np.unique(np.concatenate([np.unique(corner(k)) for k in range(4)]))  # (group, row, col)
    of_block = deal(len(blocks))
    split = of_block[np.searchsorted(blocks, corner(0))]
    for k in range(1, 4):
        split[of_block[np.searchsorted(blocks, corner(k))] != split] = -1  # shares cells: left out
    return split


#: The share of windows a block split leaves out above which it says so at WARNING (else INFO).
LEFT_OUT_WARNING = 0.25


def count_left_out(where: object, split: np.ndarray, block: int) -> int:
    """How many windows :func:`block_split` left out (split -1), logged where there are any: at
    WARNING (shown by Lightning's CLI) where that is :data:`LEFT_OUT_WARNING` of them or more."""
    left_out = int(np.count_nonzero(split < 0))
    if left_out:
        share = left_out / len(split)
        (log.warning if share >= LEFT_OUT_WARNING else log.info)(
            "%s: the block split left out %d of %d windows (%.1f%%) that straddle blocks dealt to two splits; "
            "a larger block_size (now %d px) leaves fewer out", where, left_out, len(split), 100 * share, block)
    return left_out


def group_split(groups: Sequence | np.ndarray, fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """Indices of a seeded split that deals whole groups (e.g. locations, tiles) to train, val
    and test in about ``fractions`` of the groups, so no group straddles two splits. ``groups``:
    one per item, a list or (vectorised, e.g. an ``S`` array of keys) a 1-D array."""
    if isinstance(groups, np.ndarray):
        names, inverse = np.unique(groups, return_inverse=True)  # sorted, as sorted(set(...))
    else:
        names = sorted(set(groups))
        position = {g: i for i, g in enumerate(names)}
        inverse = np.fromiter((position[g] for g in groups), np.int64, len(groups))
    order = np.random.default_rng(seed).permutation(len(names))
    n_val, n_test = (int(round(len(names) * f)) for f in fractions[1:])
    if len(names) >= 3:  # every split non-empty where there are enough groups
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    split_of = np.zeros(len(names), np.int8)  # by rank in the permutation: val, test, then train
    split_of[order[:n_val]] = SPLITS.index("val")
    split_of[order[n_val : n_val + n_test]] = SPLITS.index("test")
    where = split_of[inverse]
    return {s: np.flatnonzero(where == i) for i, s in enumerate(SPLITS)}
