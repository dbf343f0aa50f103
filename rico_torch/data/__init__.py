"""The training half: datasets and LightningDataModules over encoded LMDBs."""

from .dataset import LMDBPatchDataset, NativeAssembler, collate, read_manifest
from .datamodules import (
    BigEarthNetDataModule,
    EuroSATDataModule,
    HySpecNetDataModule,
    LMDBDataModule,
    SatlasDataModule,
    UCMercedDataModule,
)

__all__ = [
    "LMDBPatchDataset", "NativeAssembler", "collate", "read_manifest", "LMDBDataModule",
    "BigEarthNetDataModule", "EuroSATDataModule", "HySpecNetDataModule", "SatlasDataModule",
    "UCMercedDataModule",
]
