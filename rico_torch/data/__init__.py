"""The training half: datasets and LightningDataModules over encoded LMDBs."""

from .dataset import LMDBPatchDataset, NativeAssembler, collate, read_manifest
from .loader import EpochSampler, PatchLoader, WorkerError, WorkerLostError
from .datamodules import (
    BigEarthNetDataModule,
    EuroSATDataModule,
    HySpecNetDataModule,
    LMDBDataModule,
    UCMercedDataModule,
)

__all__ = [
    "LMDBPatchDataset", "NativeAssembler", "collate", "read_manifest", "PatchLoader", "EpochSampler", "WorkerError",
    "WorkerLostError", "LMDBDataModule",
    "BigEarthNetDataModule", "EuroSATDataModule", "HySpecNetDataModule", "UCMercedDataModule",
]

from .datamodules import GeoPatchDataModule  # noqa: E402

__all__ += ["GeoPatchDataModule"]
