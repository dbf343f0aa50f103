"""The training half: datasets and LightningDataModules over encoded LMDBs."""

from .dataset import LMDBPatchDataset, NativeAssembler, collate, read_manifest
from .datamodules import (
    BigEarthNetDataModule,
    EuroSATDataModule,
    HySpecNetDataModule,
    LMDBDataModule,
    UCMercedDataModule,
)
from .datamodules import HydroDataModule, MajorTOMDataModule, SpectralEarthDataModule, SSL4EODataModule

__all__ = [
    "LMDBPatchDataset", "NativeAssembler", "collate", "read_manifest", "LMDBDataModule",
    "BigEarthNetDataModule", "EuroSATDataModule", "HySpecNetDataModule", "UCMercedDataModule",
    "SSL4EODataModule", "MajorTOMDataModule", "HydroDataModule", "SpectralEarthDataModule",
]
