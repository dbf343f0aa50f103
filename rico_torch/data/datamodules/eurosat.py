"""EuroSAT-MS DataModule."""

from __future__ import annotations

from ...catalog import eurosat
from .classfolder import ClassFolderDataModule


class EuroSATDataModule(ClassFolderDataModule):
    """EuroSAT-MS: 13-band Sentinel-2 64x64 patches, 10 classes.

    ``bands`` defaults to all 13 (``B01``..``B12``, ``B08A``). Split files:
    ``eurosat-{train,val,test}.txt`` (Neumann et al., 16,200 / 5,400 / 5,400).
    """

    name = "eurosat-ms"
    catalog = eurosat.DATASET
    split_prefix = "eurosat"
    rgb_bands = eurosat.IMAGES.rgb_bands
