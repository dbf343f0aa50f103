"""One LightningDataModule per dataset, selectable by class path in LightningCLI configs."""

from .base import LMDBDataModule
from .bigearthnet import BigEarthNetDataModule
from .eurosat import EuroSATDataModule
from .hyspecnet import HySpecNetDataModule
from .ucmerced import UCMercedDataModule

__all__ = ["LMDBDataModule", "BigEarthNetDataModule", "EuroSATDataModule", "HySpecNetDataModule", "UCMercedDataModule"]

from .scenes import GeoPatchDataModule  # noqa: E402

__all__ += ["GeoPatchDataModule"]
