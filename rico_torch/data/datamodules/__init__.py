"""One LightningDataModule per dataset, selectable by class path in LightningCLI configs."""

from .base import LMDBDataModule
from .bigearthnet import BigEarthNetDataModule
from .bigearthnet_v1 import BigEarthNetV1DataModule
from .eurosat import EuroSATDataModule
from .hyspecnet import HySpecNetDataModule
from .majortom import MajorTOMDataModule
from .satlas import SatlasDataModule
from .pretraining import HydroDataModule, SpectralEarthDataModule
from .ssl4eo import SSL4EODataModule
from .ucmerced import UCMercedDataModule

__all__ = [
    "LMDBDataModule", "BigEarthNetDataModule", "BigEarthNetV1DataModule", "EuroSATDataModule", "HySpecNetDataModule", "UCMercedDataModule",
    "SSL4EODataModule", "MajorTOMDataModule", "HydroDataModule", "SpectralEarthDataModule",
    "GeoPatchDataModule", "SatlasDataModule", "CubeDataModule",
]

from .scenes import GeoPatchDataModule  # noqa: E402
from .cube import CubeDataModule  # noqa: E402
