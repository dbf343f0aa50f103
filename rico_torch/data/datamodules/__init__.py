"""One LightningDataModule per dataset, selectable by class path in LightningCLI configs."""

from .base import LMDBDataModule
from .bigearthnet import BigEarthNetDataModule
from .eurosat import EuroSATDataModule
from .hyspecnet import HySpecNetDataModule
from .satlas import SatlasDataModule
from .ucmerced import UCMercedDataModule

__all__ = ["LMDBDataModule", "BigEarthNetDataModule", "EuroSATDataModule", "HySpecNetDataModule", "SatlasDataModule",
           "UCMercedDataModule"]
