"""The training half: datasets and LightningDataModules over encoded LMDBs."""

from .dataset import LMDBPatchDataset, NativeAssembler, collate, read_manifest
from .loader import EpochSampler, PatchLoader, WorkerError, WorkerLostError
from .datamodules import (
    BigEarthNetDataModule,
    BigEarthNetV1DataModule,
    EuroSATDataModule,
    HySpecNetDataModule,
    LMDBDataModule,
    SatlasDataModule,
    UCMercedDataModule,
)
from .datamodules import HydroDataModule, MajorTOMDataModule, SpectralEarthDataModule, SSL4EODataModule

__all__ = [
    "LMDBPatchDataset", "NativeAssembler", "collate", "read_manifest", "PatchLoader", "EpochSampler", "WorkerError",
    "WorkerLostError", "LMDBDataModule",
    "BigEarthNetDataModule", "BigEarthNetV1DataModule", "EuroSATDataModule", "HySpecNetDataModule", "UCMercedDataModule",
    "SSL4EODataModule", "MajorTOMDataModule", "HydroDataModule", "SpectralEarthDataModule",
    "SatlasDataModule",
]

from .datamodules import CubeDataModule, GeoPatchDataModule  # noqa: E402

__all__ += ["GeoPatchDataModule", "CubeDataModule"]

from .live import CubePatchDataset, ScenePatchDataset  # noqa: E402

__all__ += ["ScenePatchDataset", "CubePatchDataset"]
